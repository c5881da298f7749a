"""Where the cluster's state lives in etcd, under SAGE_ETCD_PREFIX (default /sage).

    nodes/<node id>                      NodeReport (protobuf), under the agent's lease
    engines/<engine id>                  Engine (protobuf), under its node agent's lease
    schedulers/<instance>                the replica's gRPC address, under its lease
    election/scheduler/<lease id>        candidates for the autoscaler/placement leader
    lifecycle/<node id>/engines/<id>     lifecycle's engine registry (JSON, no lease)
    gpu/<node id>/reservations/<id>      gpu_manager's reservations (JSON, no lease)

Leased keys are what dies with a process; the rest is what must outlive one.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from sage.common.config.settings import SageSettings

from .client import EtcdClient, EtcdTls


@dataclass(frozen=True)
class ClusterKeys:
    """Key names under one prefix."""

    prefix: str = "/sage"

    @property
    def nodes(self) -> str:
        """Prefix of node reports."""
        return f"{self.prefix}/nodes/"

    @property
    def engines(self) -> str:
        """Prefix of routable engines."""
        return f"{self.prefix}/engines/"

    @property
    def schedulers(self) -> str:
        """Prefix of scheduler replicas' addresses."""
        return f"{self.prefix}/schedulers/"

    @property
    def scheduler_election(self) -> str:
        """Prefix of the scheduler leader election."""
        return f"{self.prefix}/election/scheduler/"

    def node(self, node_id: str) -> str:
        """One node's report."""
        return self.nodes + node_id

    def engine(self, engine_id: str) -> str:
        """One engine's record."""
        return self.engines + engine_id

    def scheduler(self, instance: str) -> str:
        """One scheduler replica."""
        return self.schedulers + instance

    def lifecycle_engines(self, node_id: str) -> str:
        """Prefix of one node's lifecycle registry."""
        return f"{self.prefix}/lifecycle/{node_id}/engines/"

    def gpu_reservations(self, node_id: str) -> str:
        """Prefix of one node's GPU reservations."""
        return f"{self.prefix}/gpu/{node_id}/reservations/"


def node_id_of(settings: SageSettings) -> str:
    """This host's node id: SAGE_NODE_ID, or the hostname (what keys under nodes/, lifecycle/
    and gpu/ are named by, so a restarted process finds its own state)."""
    return settings.cluster.node_id or socket.gethostname()


_WILDCARD = ("", "0.0.0.0", "::", "[::]")


def advertise_host_of(settings: SageSettings, bind_host: str | None = None) -> str:
    """The host other hosts reach this process at: SAGE_ADVERTISE_HOST, else the bind host
    (`bind_host`, else SAGE_HOST; the hostname when it is a wildcard address, which no
    other host can dial)."""
    if settings.cluster.advertise_host:
        return settings.cluster.advertise_host
    bound = settings.host if bind_host is None else bind_host
    return socket.gethostname() if bound in _WILDCARD else bound


def cluster_keys(settings: SageSettings) -> ClusterKeys:
    """The key names for these settings."""
    return ClusterKeys(settings.cluster.etcd_prefix)


def etcd_client(settings: SageSettings) -> EtcdClient:
    """A client for SAGE_ETCD_ENDPOINTS (with its TLS files when set)."""
    c = settings.cluster
    return EtcdClient(
        c.etcd_endpoints,
        tls=EtcdTls(c.etcd_ca_file, c.etcd_cert_file, c.etcd_key_file),
    )
