"""etcd as the cluster's store (SAGE_ETCD_ENDPOINTS): a client over etcd's gRPC API, leases
kept alive, leader election and in-memory mirrors of key prefixes."""

from .client import CompactedError, EtcdClient, EtcdTls, KeyValue, WatchEvent, parse_endpoints
from .election import Election
from .keys import ClusterKeys, advertise_host_of, cluster_keys, etcd_client, node_id_of
from .lease import KeptLease
from .mirror import PrefixMirror

__all__ = [
    "ClusterKeys",
    "CompactedError",
    "Election",
    "EtcdClient",
    "EtcdTls",
    "KeptLease",
    "KeyValue",
    "PrefixMirror",
    "WatchEvent",
    "advertise_host_of",
    "cluster_keys",
    "etcd_client",
    "node_id_of",
    "parse_endpoints",
]
