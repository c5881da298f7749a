"""The scheduler process's composition root: build the domain objects from settings, wire
them to the gRPC servicer, the clients and the background loops, and return the server.

The transport lives in servicer.py, protobuf mapping in convert.py, outbound gRPC clients in
clients.py and background pollers in loops.py; their names are re-exported here for callers
that imported them from this module.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc

from sage.common.apikeys import load_key_table
from sage.common.config.settings import SageSettings
from sage.common.etcd import cluster_keys, etcd_client
from sage.common.grpc import Registration, SageServer, create_channel, create_server
from sage.rpc.common.v1 import common_pb2
from sage.rpc.scheduler.v1 import scheduler_pb2 as pb
from sage.rpc.scheduler.v1 import scheduler_pb2_grpc as pb_grpc

from .adapters import AdapterPlacer
from .admission import AdmissionController
from .autoscaler import Autoscaler
from .breaker import CircuitBreakers
from .clients import GrpcEmbeddingBackend, LifecycleAdapterLoader, LifecycleScalerActions
from .cluster import EtcdReplica, ReplicaMetrics, advertised_address, new_instance_id
from .convert import (
    limits_from_pb,
    node_report_from_pb,
    node_to_pb,
    record_from_pb,
    record_to_pb,
    ticket_from_pb,
)
from .core import Scheduler
from .executor import HttpExecutionCoordinator
from .load import EngineLoadTracker
from .loops import NodeWatcher
from .metrics import SchedulerMetrics
from .nodes import NodeTable, StaticNode
from .rebuild import rebuild_from_lifecycle
from .registry import EngineKind, EngineRegistry, EngineState
from .routing import KvEventsRouter, create_router
from .servicer import SchedulerServicer

__all__ = [
    "GrpcEmbeddingBackend",
    "LifecycleScalerActions",
    "NodeWatcher",
    "SchedulerApp",
    "SchedulerServicer",
    "build_scheduler",
    "build_server",
    "limits_from_pb",
    "node_report_from_pb",
    "node_to_pb",
    "record_from_pb",
    "record_to_pb",
    "ticket_from_pb",
]


log = logging.getLogger("sage.scheduler")


@dataclass(frozen=True)
class SchedulerApp:
    """A built scheduler: its server and bound port, and in etcd mode its place in the
    cluster (tests stop a replica's lease without revoking it, as a crash would)."""

    server: SageServer
    port: int
    replica: EtcdReplica | None = None
    autoscaler: Autoscaler | None = None


def build_server(settings: SageSettings, addr: str | None = None) -> tuple[SageServer, int]:
    """The scheduler server with its dependencies wired from settings."""
    app = build_scheduler(settings, addr)
    return app.server, app.port


def build_scheduler(settings: SageSettings, addr: str | None = None) -> SchedulerApp:
    """The scheduler with its dependencies wired from settings. With SAGE_ETCD_ENDPOINTS it
    is one replica of several: nodes and engines come from etcd (no heartbeat sweep, no
    static polling, no rebuild from lifecycle) and the elected leader autoscales and places.
    """
    executor = HttpExecutionCoordinator(request_timeout_s=settings.request_timeout_s)
    embedding_channel = create_channel(
        settings.address("embedding_service"), default_timeout=settings.request_timeout_s
    )
    own = settings.scheduler
    breakers = CircuitBreakers(
        own.breaker_failures, own.breaker_cooldown_s, max_cooldown_s=own.breaker_max_cooldown_s
    )
    metrics = SchedulerMetrics(breakers=breakers)
    load = EngineLoadTracker(
        scrape_interval_s=max(0.1, own.scrape_interval_s), scrape_budget=own.scrape_budget
    )
    admission = AdmissionController(
        own.policy,
        per_engine=own.max_inflight_per_engine,
        max_queue=own.max_queue,
        predict=metrics.predict,
        measured=load.capacity,
        measured_version=lambda: load.capacity_version,
    )
    metrics.queue_depth = lambda: admission.stats.queued
    routing = own.routing
    registry = EngineRegistry()
    router = create_router(routing, load)
    scheduler = Scheduler(
        registry,
        router,
        executor,
        GrpcEmbeddingBackend(embedding_channel, settings.request_timeout_s, settings.rpc_timeout_s),
        admission=admission,
        load=load,
        breakers=breakers,
        metrics=metrics,
        embedding_max_tokens=settings.embedding_max_tokens_per_request,
    )
    cluster = settings.cluster
    etcd_mode = cluster.etcd_mode
    static_nodes = [StaticNode(n.id, n.address) for n in cluster.nodes]
    if etcd_mode and static_nodes:
        log.warning("SAGE_NODES is ignored in etcd mode: node agents publish themselves")
        static_nodes = []
    node_table = NodeTable(
        registry,
        timeout_s=cluster.timeout_s,
        static=static_nodes,
        on_lost=scheduler.engines_lost,
    )
    adapter_loader = LifecycleAdapterLoader(
        node_table.nodes, settings.address("lifecycle"), settings.rpc_timeout_s
    )
    scheduler.adapters = AdapterPlacer(
        registry, adapter_loader, load, timeout_s=own.adapter_load_timeout_s
    )
    node_watcher = NodeWatcher(
        node_table,
        min(cluster.heartbeat_s, cluster.timeout_s / 4),
        settings.rpc_timeout_s,
    )
    servicer = SchedulerServicer(
        scheduler,
        f"{own.policy}/{routing}",
        node_table,
        request_timeout_s=settings.request_timeout_s,
        # The edge's table (same settings): tenants and limits are resolved here from the
        # caller's key, never taken from a request.
        api_keys=load_key_table(settings.auth.api_keys, settings.auth.api_keys_file),
    )
    server, port = create_server(
        addr or f"{settings.host}:{settings.scheduler.port}",
        [
            Registration(
                pb.DESCRIPTOR.services_by_name["SchedulerService"].full_name,
                pb_grpc.add_SchedulerServiceServicer_to_server,
                servicer,
            )
        ],
    )

    servicer.address = advertised_address(settings, port, addr.rsplit(":", 1)[0] if addr else None)
    server.on_drain(servicer.mux.drain)

    replica: EtcdReplica | None = None
    if etcd_mode:
        # The lease is the liveness: no sweep, no polling, no rebuild; etcd is the truth.
        replica = EtcdReplica(
            etcd_client(settings),
            cluster_keys(settings),
            nodes=node_table,
            registry=registry,
            breakers=breakers,
            address=servicer.address,
            instance=new_instance_id(),
            ttl_s=cluster.etcd_lease_ttl_s,
            rpc_timeout_s=settings.rpc_timeout_s,
        )
        servicer.replica = replica

        async def _join() -> None:
            assert replica is not None
            replica.start()

        async def _leave() -> None:
            assert replica is not None
            await replica.aclose()
            await replica.client.close()

        server.on_start(_join)
        server.on_stop(_leave)
    else:

        async def _watch_nodes() -> None:
            node_watcher.start()

        server.on_start(_watch_nodes)

        # A restarted scheduler routes lifecycle's ready engines at once (see rebuild.py).
        rebuilding: list[asyncio.Task[int]] = []

        async def _register_pb(engine: common_pb2.Engine) -> None:
            await servicer.RegisterEngine(pb.RegisterEngineRequest(engine=engine), None)

        async def _rebuild() -> None:
            rebuilding.append(
                asyncio.get_running_loop().create_task(
                    rebuild_from_lifecycle(
                        settings.address("lifecycle"),
                        _register_pb,
                        timeout_s=settings.rpc_timeout_s,
                    )
                )
            )

        async def _stop_rebuild() -> None:
            for task in rebuilding:
                task.cancel()

        server.on_start(_rebuild)
        server.on_stop(_stop_rebuild)

    # Engines' /metrics feed load-aware routers and measure undeclared capacities; with
    # neither in use (round robin under a fixed or no cap) nothing is scraped.
    if routing != "round_robin" or settings.scheduler.max_inflight_per_engine < 0:

        async def _scrape() -> None:
            load.start(lambda: registry.ready(EngineKind.LLM))

        server.on_start(_scrape)

    if isinstance(router, KvEventsRouter):
        # Subscribes to the ready engines' KV-event publishers; its counters join /metrics.
        metrics.registry.register(router)

        async def _subscribe() -> None:
            router.start(
                lambda: [
                    e
                    for e in registry.engines()
                    if e.kind is EngineKind.LLM and e.state is EngineState.READY
                ]
            )

        server.on_start(_subscribe)
        server.on_stop(router.aclose)

    autoscaler: Autoscaler | None = None
    scaler_actions: LifecycleScalerActions | None = None
    lifecycle_channel: grpc.aio.Channel | None = None
    scaling = settings.autoscaler
    if scaling.models:
        lifecycle_channel = create_channel(
            settings.address("lifecycle"), default_timeout=settings.rpc_timeout_s
        )

        def _replicas(model: str) -> list[str]:
            return [
                e.engine_id
                for e in registry.engines(model)
                if e.model == model and e.state is EngineState.READY
            ]

        def _node_of(engine_id: str) -> str:
            return next((e.node_id for e in registry.engines() if e.engine_id == engine_id), "")

        scaler_actions = LifecycleScalerActions(
            lifecycle_channel,
            settings.rpc_timeout_s,
            settings.request_timeout_s,
            # etcd mode: the node agents' lifecycles, not this host's (it may run none).
            nodes=node_table.nodes if etcd_mode else None,
            node_of=_node_of if etcd_mode else None,
        )
        autoscaler = Autoscaler(
            scaling,
            scaler_actions,
            replicas=_replicas,
            queued=admission.queued_for,
            in_flight=load.in_flight,
            slo_attainment=metrics.slo_attainment,
            # etcd mode: only the elected replica decides; the others' loops idle.
            active=(lambda: replica.is_leader) if replica is not None else (lambda: True),
        )

        async def _autoscale() -> None:
            assert autoscaler is not None
            autoscaler.start()

        server.on_start(_autoscale)

    scaler = autoscaler
    metrics.registry.register(
        ReplicaMetrics(replica, (lambda: scaler.decisions) if scaler is not None else None)
    )

    async def _close() -> None:
        await node_watcher.aclose()
        await adapter_loader.aclose()
        if autoscaler is not None:
            await autoscaler.aclose()
        if scaler_actions is not None:
            await scaler_actions.aclose()
        if lifecycle_channel is not None:
            await lifecycle_channel.close(None)
        await load.aclose()
        await executor.aclose()
        await embedding_channel.close(None)

    server.on_stop(_close)
    return SchedulerApp(server, port, replica, autoscaler)
