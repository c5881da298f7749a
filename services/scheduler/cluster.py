"""One scheduler replica in etcd mode (SAGE_ETCD_ENDPOINTS).

Node agents publish nodes/<id> (NodeReport) and engines/<id> (Engine) under their leases;
every replica mirrors both into its own NodeTable and EngineRegistry, so all replicas route
the same engines without being told over gRPC, and a dead agent's engines leave routing when
etcd expires its lease. Each replica also publishes schedulers/<instance> = its gRPC address
under its own lease and stands in the scheduler election: the leader runs the autoscaler and
answers PlaceEngine; a follower forwards PlaceEngine to the leader's address.

Until its first listing has landed a replica routes nothing (the registry answers 503 naming
why), and while etcd cannot be reached at start it keeps trying with a log line per attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sage.common.config.settings import SageSettings
from sage.common.etcd import (
    ClusterKeys,
    Election,
    EtcdClient,
    KeptLease,
    PrefixMirror,
    advertise_host_of,
)
from sage.common.exceptions import NotFoundError, SageError, ServiceUnavailableError
from sage.common.grpc import create_channel, rpc_errors_as_sage
from sage.rpc.common.v1 import common_pb2
from sage.rpc.scheduler.v1 import scheduler_pb2 as pb
from sage.rpc.scheduler.v1 import scheduler_pb2_grpc as pb_grpc

from .breaker import CircuitBreakers
from .convert import node_report_from_pb, record_from_pb
from .nodes import NodeTable
from .registry import EngineRecord, EngineRegistry, EngineState

if TYPE_CHECKING:
    from sage.rpc.scheduler.v1.scheduler_pb2_grpc import SchedulerServiceAsyncStub

log = logging.getLogger("sage.scheduler.cluster")

# Set on a PlaceEngine a follower forwards: the receiver answers it itself or refuses, and
# never forwards it again (two replicas that disagree about the leader must not ping-pong).
FORWARDED_BY = "x-sage-forwarded-by"


def advertised_address(settings: SageSettings, port: int, bind_host: str | None = None) -> str:
    """host:port other hosts reach this replica at (advertise_host_of; `bind_host`: --host)."""
    return f"{advertise_host_of(settings, bind_host)}:{port}"


def new_instance_id() -> str:
    """A replica id unique per process: the host, the pid and a random tail (a restarted
    process with a recycled pid is still a new instance)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class EtcdReplica:
    """This replica's mirrors, lease, election and link to the leader."""

    def __init__(
        self,
        client: EtcdClient,
        keys: ClusterKeys,
        *,
        nodes: NodeTable,
        registry: EngineRegistry,
        breakers: CircuitBreakers,
        address: str,
        instance: str,
        ttl_s: int,
        rpc_timeout_s: float = 10.0,
        retry_max_s: float = 5.0,
    ) -> None:
        self.client = client
        self.keys = keys
        self.nodes = nodes
        self.registry = registry
        self.breakers = breakers
        self.address = address
        self.instance = instance
        self.ttl_s = ttl_s
        self.rpc_timeout_s = rpc_timeout_s
        self.retry_max_s = retry_max_s
        self.synced = asyncio.Event()
        self.attempts = 0  # connection attempts until the first sync
        self.last_error = ""
        self.leader_changes = 0
        self.lease: KeptLease | None = None
        self.election: Election | None = None
        self._mirrors: list[PrefixMirror] = []
        self._replicas: PrefixMirror | None = None
        self._task: asyncio.Task[None] | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._leader_since = 0.0
        # Engines of the first listing, registered together once it is complete.
        self._listing: list[EngineRecord] | None = None
        self.registry.unsynced = self._unsynced_reason()

    # -- state -------------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        """True while this replica is the elected leader and its lease is surely alive: cut
        off from etcd for a TTL, another replica may lead by now, so this one stops placing
        and autoscaling (it keeps routing with what it last saw)."""
        election, lease = self.election, self.lease
        return election is not None and election.is_leader and lease is not None and lease.held()

    @property
    def leader_address(self) -> str:
        """The leader's gRPC address ("" while none is known)."""
        return self.election.leader_value if self.election is not None else ""

    @property
    def replicas(self) -> int:
        """Scheduler replicas registered in etcd (this one included once synced)."""
        return len(self._replicas.items) if self._replicas is not None else 0

    def _unsynced_reason(self) -> str:
        why = f": {self.last_error}" if self.last_error else ""
        return (
            f"this scheduler replica ({self.address}) has not synced engines from etcd "
            f"({', '.join(self.client.endpoints)}) yet{why}"
        )

    # -- start and stop ----------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background, retrying until etcd answers; never raises."""
        self._task = asyncio.get_running_loop().create_task(self._connect(), name="etcd-replica")

    async def _connect(self) -> None:
        delay = 0.5
        while True:
            self.attempts += 1
            try:
                await self._join()
            except asyncio.CancelledError:
                await self._leave(revoke=True)
                raise
            except Exception as exc:  # etcd down, no quorum, refused: retry, never crash
                self.last_error = str(exc) or type(exc).__name__
                self.registry.unsynced = self._unsynced_reason()
                log.warning(
                    "etcd not reachable (attempt %d, endpoints %s): %s; this replica routes "
                    "nothing until it has synced, retrying in %.1fs",
                    self.attempts,
                    ",".join(self.client.endpoints),
                    self.last_error,
                    delay,
                )
                await self._leave(revoke=True)
                await asyncio.sleep(delay)
                delay = min(self.retry_max_s, delay * 2)
                continue
            self.registry.unsynced = ""
            self.synced.set()
            log.warning(
                "scheduler replica %s at %s synced from etcd: %d nodes, %d engines, %d "
                "replicas; leader %s",
                self.instance,
                self.address,
                len(self.nodes.nodes()),
                len(self.registry.engines()),
                self.replicas,
                "is this replica" if self.is_leader else (self.leader_address or "not elected"),
            )
            return

    async def _join(self) -> None:
        """Lease, own key, mirrors (nodes before engines, so an engine of a node known to
        be down is admitted drained), then the election."""
        lease = self.lease = KeptLease(self.client, self.ttl_s, name=f"scheduler-{self.instance}")
        await lease.start()
        await lease.put(self.keys.scheduler(self.instance), self.address.encode())
        for prefix, on_put, on_delete in (
            (self.keys.nodes, self._node_put, self._node_delete),
            (self.keys.engines, self._engine_put, self._engine_delete),
            (self.keys.schedulers, self._replica_put, self._replica_delete),
        ):
            mirror = PrefixMirror(self.client, prefix, on_put=on_put, on_delete=on_delete)
            self._listing = [] if prefix == self.keys.engines else None
            try:
                await mirror.start()
            finally:
                listed, self._listing = self._listing, None
            if listed:
                self.registry.register_many(listed)
            self._mirrors.append(mirror)
        self._replicas = self._mirrors[-1]
        election = self.election = Election(
            self.client,
            self.keys.scheduler_election,
            self.address,
            lease=lease,
            on_change=self._on_leadership,
            on_leader=self._on_leader,
        )
        await election.start()

    async def _leave(self, *, revoke: bool) -> None:
        """Stop the election, mirrors and lease; `revoke` False leaves the keys to expire
        with the lease, as a crash would."""
        if self.election is not None:
            if revoke:
                await self.election.resign()
            else:
                await self.election.stop()
            self.election = None
        for mirror in self._mirrors:
            await mirror.close()
        self._mirrors.clear()
        self._replicas = None
        if self.lease is not None:
            await self.lease.close(revoke=revoke)
            self.lease = None

    async def aclose(self, *, revoke: bool = True) -> None:
        """Leave the cluster: a clean stop revokes the lease (the next leader takes over at
        once); `revoke=False` simulates a crash (the keys expire after the TTL)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._leave(revoke=revoke)
        for channel in self._channels.values():
            await channel.close(None)
        self._channels.clear()

    # -- mirrors -----------------------------------------------------------------------

    def _node_put(self, name: str, value: bytes) -> None:
        try:
            report = node_report_from_pb(common_pb2.NodeReport.FromString(value))
            if report.node_id != name:
                raise ValueError(f"the report says it is node {report.node_id!r}")
            before = {n.node_id: n.state for n in self.nodes.nodes()}.get(name)
            node = self.nodes.report(report, register=True, from_store=True)
        except (DecodeError, ValueError, SageError) as exc:
            log.warning("ignored node key %s%s in etcd: %s", self.keys.nodes, name, exc)
            return
        if before is not node.state:
            log.info(
                "node %s is %s (from etcd)%s",
                name,
                node.state.value,
                f": {node.reason}" if node.reason else "",
            )

    def _node_delete(self, name: str, value: bytes) -> None:
        self.nodes.mark_unreachable(
            name,
            f"its etcd key {self.keys.node(name)} was deleted "
            "(the agent's lease expired or the agent stopped)",
        )
        log.warning("node down (its etcd key is gone); its engines are drained: %s", name)

    def _engine_put(self, name: str, value: bytes) -> None:
        try:
            engine = common_pb2.Engine.FromString(value)
            if engine.engine_id != name:
                raise ValueError(f"the record says it is engine {engine.engine_id!r}")
            record = self.nodes.admit_engine(record_from_pb(engine))
            self.registry.validate(record)
            if self._listing is not None:
                self._listing.append(record)
            else:
                self.registry.register(record)
        except (DecodeError, ValueError, SageError) as exc:
            log.warning("ignored engine key %s%s in etcd: %s", self.keys.engines, name, exc)
            return
        log.debug("engine %s (%s on %s) from etcd", name, record.model, record.node_id)

    def _engine_delete(self, name: str, value: bytes) -> None:
        with contextlib.suppress(NotFoundError):
            record = self.registry.deregister(name)
            if record.state is EngineState.READY:  # no drain notice: its node may be lost
                self.nodes.engine_vanished(record)
        self.breakers.forget(name)
        log.info("engine %s left routing (its etcd key is gone)", name)

    def _replica_put(self, name: str, value: bytes) -> None:
        if name == self.instance:
            return
        address = value.decode(errors="replace")
        if address == self.address:
            # Followers forward placement to the leader's address: two replicas behind one
            # address cannot be told apart (network namespaces share a hostname, say).
            log.error(
                "scheduler replica %s advertises %s too, as this one (%s) does: set "
                "SAGE_ADVERTISE_HOST (or bind each to its own address)",
                name,
                address,
                self.instance,
            )
            return
        log.info("scheduler replica %s at %s joined", name, address)

    def _replica_delete(self, name: str, value: bytes) -> None:
        log.warning("scheduler replica %s at %s left", name, value.decode(errors="replace"))

    # -- leadership --------------------------------------------------------------------

    def _on_leadership(self, leader: bool) -> None:
        self.leader_changes += 1
        if leader:
            self._leader_since = time.monotonic()
            log.warning(
                "scheduler replica %s at %s is now the leader: the autoscaler and placement "
                "run here",
                self.instance,
                self.address,
            )
        else:
            log.warning(
                "scheduler replica %s at %s is no longer the leader after %.1fs",
                self.instance,
                self.address,
                time.monotonic() - self._leader_since,
            )

    def _on_leader(self, value: str) -> None:
        if value != self.address:
            log.warning(
                "scheduler leader is now %s (this replica %s follows)",
                value or "nobody",
                self.address,
            )

    # -- the leader's placement --------------------------------------------------------

    def leader_stub(self) -> SchedulerServiceAsyncStub:
        """A stub for the leader's SchedulerService (UNAVAILABLE while none is elected)."""
        if not self.synced.is_set():
            raise ServiceUnavailableError(self._unsynced_reason())
        if self.lease is None or not self.lease.held():
            raise ServiceUnavailableError(
                f"this scheduler replica ({self.address}) has not reached etcd for a lease TTL "
                f"({self.ttl_s}s), so it cannot tell who leads; placement waits until it can"
            )
        leader = self.leader_address
        if not leader:
            raise ServiceUnavailableError("no scheduler leader is elected yet; retry shortly")
        channel = self._channels.get(leader)
        if channel is None:
            channel = self._channels[leader] = create_channel(
                leader, default_timeout=self.rpc_timeout_s
            )
        return pb_grpc.SchedulerServiceStub(channel)  # type: ignore[return-value]

    async def place_on_leader(
        self, request: pb.PlaceEngineRequest, context: Any
    ) -> pb.PlaceEngineResponse:
        """PlaceEngine as the leader answers it; the leader's error comes back unchanged."""
        forwarded = _metadata(context, FORWARDED_BY)
        if forwarded:
            raise ServiceUnavailableError(
                f"placement forwarded by {forwarded} reached {self.address}, which does not "
                f"lead either (leader: {self.leader_address or 'none'}); retry shortly"
            )
        stub = self.leader_stub()
        with rpc_errors_as_sage():
            reply: pb.PlaceEngineResponse = await stub.PlaceEngine(
                request, timeout=self.rpc_timeout_s, metadata=((FORWARDED_BY, self.address),)
            )
        return reply


def _metadata(context: Any, key: str) -> str:
    """One invocation metadata value ("" when absent or without a context)."""
    if context is None:
        return ""
    for item in context.invocation_metadata() or ():
        if item[0] == key:
            return str(item[1])
    return ""


class ReplicaMetrics(Collector):
    """sage_scheduler_is_leader / _replicas / _etcd_synced and the autoscaler's decisions,
    for /metrics (the one-machine scheduler: leader 1, replicas 1, synced 1)."""

    def __init__(
        self,
        replica: EtcdReplica | None,
        decisions: Callable[[], dict[tuple[str, str], int]] | None = None,
    ) -> None:
        self.replica = replica
        self.decisions = decisions

    def collect(self) -> Iterator[Metric]:
        """The families, read at scrape time."""
        replica = self.replica
        leader = replica.is_leader if replica is not None else True
        yield GaugeMetricFamily(
            "sage_scheduler_is_leader",
            "1 on the replica that runs the autoscaler and placement (etcd election).",
            value=1.0 if leader else 0.0,
        )
        yield GaugeMetricFamily(
            "sage_scheduler_replicas",
            "Scheduler replicas registered in etcd, as this replica sees them.",
            value=float(replica.replicas if replica is not None else 1),
        )
        yield GaugeMetricFamily(
            "sage_scheduler_etcd_synced",
            "1 once this replica has listed nodes and engines from etcd (it routes nothing "
            "before).",
            value=1.0 if replica is None or replica.synced.is_set() else 0.0,
        )
        if self.decisions is not None:
            family = CounterMetricFamily(
                "sage_scheduler_autoscale_decisions",
                "Scale decisions this replica's autoscaler took (dry-run ones included).",
                labels=("model", "direction"),
            )
            for (model, direction), count in sorted(self.decisions().items()):
                family.add_metric((model, direction), float(count))
            yield family
