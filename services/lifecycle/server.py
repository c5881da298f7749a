"""gRPC transport of the lifecycle service, and its clients of gpu_manager and scheduler."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import grpc
import psutil

from sage.common.config.settings import SageSettings
from sage.common.etcd import EtcdClient, cluster_keys, etcd_client, node_id_of
from sage.common.exceptions import NotFoundError
from sage.common.grpc import (
    Registration,
    SageServer,
    create_channel,
    create_server,
    rpc_errors_as_sage,
)
from sage.common.grpc.engine_enums import kind_name, kind_value, role_name, role_value
from sage.rpc.common.v1 import common_pb2
from sage.rpc.gpu_manager.v1 import gpu_manager_pb2, gpu_manager_pb2_grpc
from sage.rpc.lifecycle.v1 import lifecycle_pb2 as pb
from sage.rpc.lifecycle.v1 import lifecycle_pb2_grpc as pb_grpc
from sage.rpc.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

from .agent import EtcdNodeAgent, NodeAgent, NodeReporter
from .external_engines import ExternalEnginePolicy
from .manager import EngineLifecycleManager, RestartPolicy
from .policy import LaunchPolicy, engine_bind_host
from .spec import EngineSpec
from .store import (
    FAILED,
    READY,
    STARTING,
    STOPPED,
    STOPPING,
    EngineRecord,
    EngineRegistry,
    EtcdEngineStore,
)

if TYPE_CHECKING:
    from sage.rpc.scheduler.v1.scheduler_pb2_grpc import SchedulerServiceAsyncStub

log = logging.getLogger("sage.lifecycle")

_STATE_TO_PB = {
    STARTING: common_pb2.ENGINE_STATE_STARTING,
    READY: common_pb2.ENGINE_STATE_READY,
    STOPPING: common_pb2.ENGINE_STATE_DRAINING,
    STOPPED: common_pb2.ENGINE_STATE_STOPPED,
    FAILED: common_pb2.ENGINE_STATE_FAILED,
}
# How often ready engines are registered again, so a restarted scheduler relearns them.
RESYNC_INTERVAL_S = 5.0


def engine_pb(record: EngineRecord, node_id: str = "") -> common_pb2.Engine:
    """Lifecycle's record as the shared Engine message (on node `node_id`)."""
    spec = record.spec
    return common_pb2.Engine(
        engine_id=record.engine_id,
        model=spec.model,
        kind=kind_value(spec.kind),
        base_url=record.base_url,
        role=role_value(spec.role),
        state=_STATE_TO_PB[record.state],
        backend=record.backend,
        aliases=list(spec.aliases),
        gpu_indexes=record.gpu_ids,
        pid=record.pid,
        port=record.port,
        # The scheduler caps in-flight requests at the engine's own concurrency.
        labels=(
            {**spec.labels, **record.labels, "max_concurrent_requests": str(concurrency)}
            if (concurrency := spec.declared_concurrency(record.backend)) > 0
            else {**spec.labels, **record.labels}
        ),
        label=spec.label,
        restart_count=record.restart_count,
        error=record.error,
        started_at=record.started_at,
        metadata=spec.metadata,
        host=record.host,
        node_id=node_id,
        adapters=[
            common_pb2.LoraAdapter(name=name, path=path) for name, path in record.adapters.items()
        ],
        lora_enabled=spec.enable_lora,
    )


def spec_from_pb(request: pb.StartEngineRequest, host: str) -> EngineSpec:
    """StartEngineRequest → EngineSpec with defaults applied."""
    return EngineSpec(
        model=request.model,
        kind=kind_name(request.kind, default="llm"),
        backend="" if request.backend == "auto" else request.backend,
        port=request.port,
        host=host,
        engine_id=request.engine_id,
        base_url=request.base_url,
        tensor_parallel_size=request.tensor_parallel_size or 1,
        pipeline_parallel_size=request.pipeline_parallel_size or 1,
        gpu_memory_utilization=request.gpu_memory_utilization,
        required_memory_gb=request.required_memory_gb,
        use_gpu=request.use_gpu if request.HasField("use_gpu") else None,
        max_concurrent_requests=request.max_concurrent_requests,
        max_model_len=request.max_model_len,
        label=request.label,
        extra_args=tuple(request.extra_args),
        startup_timeout_s=float(request.startup_timeout_s or 300),
        aliases=tuple(request.aliases),
        role=role_name(request.role),
        metadata=dict(request.metadata),
        join_existing_model=request.join_existing_model,
        enable_lora=request.enable_lora,
        max_lora_rank=request.max_lora_rank,
    )


class GrpcGpuAllocator:
    """GpuAllocator over gpu_manager; an unreachable gpu_manager counts as zero GPUs."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = gpu_manager_pb2_grpc.GpuManagerServiceStub(channel)

    async def gpu_count(self) -> int:
        try:
            reply = await self._stub.ListGpus(gpu_manager_pb2.ListGpusRequest())
        except grpc.RpcError as err:
            log.warning(
                "gpu_manager unreachable; treating host as CPU-only", extra={"error": err.details()}
            )
            return 0
        return len(reply.gpus)

    async def reserve(
        self, engine_id: str, count: int, memory_per_gpu_bytes: int, memory_fraction: float
    ) -> list[int]:
        with rpc_errors_as_sage():
            reply = await self._stub.Reserve(
                gpu_manager_pb2.ReserveRequest(
                    engine_id=engine_id,
                    gpu_count=count,
                    memory_per_gpu_bytes=memory_per_gpu_bytes,
                    memory_fraction=memory_fraction,
                )
            )
        return sorted(r.gpu_index for r in reply.reservations)

    async def release(self, engine_id: str) -> None:
        try:
            with rpc_errors_as_sage():
                await self._stub.Release(gpu_manager_pb2.ReleaseRequest(engine_id=engine_id))
        except NotFoundError:
            return  # nothing was held
        except Exception as exc:  # a leak is reconciled later; stopping must go on
            log.warning(
                "could not release GPU reservation",
                extra={"engine_id": engine_id, "error": str(exc)},
            )

    async def reserved_engine_ids(self) -> list[str]:
        try:
            reply = await self._stub.ListReservations(gpu_manager_pb2.ListReservationsRequest())
        except grpc.RpcError:
            return []
        return sorted({r.engine_id for r in reply.reservations})

    async def set_owner(self, engine_id: str, pid: int) -> None:
        try:
            started_at = psutil.Process(pid).create_time()
            with rpc_errors_as_sage():
                await self._stub.SetOwner(
                    gpu_manager_pb2.SetOwnerRequest(
                        engine_id=engine_id, owner_pid=pid, owner_started_at=started_at
                    )
                )
        except Exception as exc:  # the reservation keeps its owner; stop still releases it
            log.warning(
                "could not hand the GPU reservation to its process",
                extra={"engine_id": engine_id, "pid": pid, "error": str(exc)},
            )


class LifecycleServicer(pb_grpc.LifecycleServiceServicer):
    """LifecycleService over EngineLifecycleManager."""

    def __init__(
        self,
        manager: EngineLifecycleManager,
        engine_host: str,
        node_id: str = "",
        agent: NodeReporter | None = None,
    ) -> None:
        self.manager = manager
        self.engine_host = engine_host
        self.node_id = node_id
        self.agent = agent

    async def StartEngine(
        self, request: pb.StartEngineRequest, context: Any
    ) -> pb.StartEngineResponse:
        if request.like_engine_id:
            template = self.manager.get(request.like_engine_id).spec
            spec = dataclasses.replace(template, engine_id="", port=0, label="")
        else:
            spec = spec_from_pb(request, self.engine_host)
        record = await self.manager.start(spec, wait=not request.no_wait)
        return pb.StartEngineResponse(engine=engine_pb(record, self.node_id))

    async def StopEngine(
        self, request: pb.StopEngineRequest, context: Any
    ) -> pb.StopEngineResponse:
        record = await self.manager.stop(
            request.engine_id,
            drain=request.drain,
            drain_timeout_s=float(request.drain_timeout_s or 30),
        )
        return pb.StopEngineResponse(engine=engine_pb(record, self.node_id))

    async def GetEngine(self, request: pb.GetEngineRequest, context: Any) -> pb.GetEngineResponse:
        return pb.GetEngineResponse(
            engine=engine_pb(self.manager.get(request.engine_id), self.node_id)
        )

    async def ListEngines(
        self, request: pb.ListEnginesRequest, context: Any
    ) -> pb.ListEnginesResponse:
        return pb.ListEnginesResponse(
            engines=[engine_pb(r, self.node_id) for r in self.manager.instances()]
        )

    async def TailLogs(self, request: pb.TailLogsRequest, context: Any) -> pb.TailLogsResponse:
        return pb.TailLogsResponse(
            lines=self.manager.tail_logs(request.engine_id, request.lines or 100)
        )

    async def PruneEngines(
        self, request: pb.PruneEnginesRequest, context: Any
    ) -> pb.PruneEnginesResponse:
        return pb.PruneEnginesResponse(engine_ids=self.manager.prune())

    async def ListBackends(
        self, request: pb.ListBackendsRequest, context: Any
    ) -> pb.ListBackendsResponse:
        return pb.ListBackendsResponse(
            backends=[
                pb.Backend(
                    name=str(b["name"]),
                    kinds=[kind_value(k) for k in sorted(b["kinds"])],  # type: ignore[call-overload]
                    uses_gpu=bool(b["uses_gpu"]),
                    available=bool(b["available"]),
                    reason=str(b.get("reason", "")),
                )
                for b in self.manager.backends()
            ]
        )

    async def LoadAdapter(
        self, request: pb.LoadAdapterRequest, context: Any
    ) -> pb.LoadAdapterResponse:
        record = await self.manager.load_adapter(
            request.engine_id, request.adapter.name, request.adapter.path
        )
        return pb.LoadAdapterResponse(engine=engine_pb(record, self.node_id))

    async def UnloadAdapter(
        self, request: pb.UnloadAdapterRequest, context: Any
    ) -> pb.UnloadAdapterResponse:
        record = await self.manager.unload_adapter(request.engine_id, request.name)
        return pb.UnloadAdapterResponse(engine=engine_pb(record, self.node_id))

    async def DescribeNode(
        self, request: pb.DescribeNodeRequest, context: Any
    ) -> pb.DescribeNodeResponse:
        if self.agent is None:
            raise NotFoundError("this lifecycle runs no node agent", param="node")
        return pb.DescribeNodeResponse(report=await self.agent.report())


class _Wiring:
    """How lifecycle reaches the rest of the cluster: the scheduler over gRPC (one machine,
    or several hosts without etcd), or etcd (SAGE_ETCD_ENDPOINTS)."""

    def __init__(self, settings: SageSettings) -> None:
        self.settings = settings
        self.node_id = node_id_of(settings)
        self.etcd: EtcdClient | None = None
        self.sched_channel: grpc.aio.Channel | None = None
        self.scheduler: SchedulerServiceAsyncStub | None = None
        self.store: EngineRegistry | None = None  # None: the manager's engines.json
        self.etcd_agent: EtcdNodeAgent | None = None
        if settings.cluster.etcd_mode:
            self.etcd = etcd_client(settings)
            self.store = EtcdEngineStore(
                self.etcd, cluster_keys(settings).lifecycle_engines(self.node_id)
            )
        else:
            self.sched_channel = create_channel(
                settings.address("scheduler"), default_timeout=settings.rpc_timeout_s
            )
            self.scheduler = scheduler_pb2_grpc.SchedulerServiceStub(self.sched_channel)

    async def register(self, record: EngineRecord) -> None:
        """Make a ready engine routable."""
        if self.etcd_agent is not None:
            await self.etcd_agent.publish(engine_pb(record, self.node_id))
            return
        assert self.scheduler is not None
        with rpc_errors_as_sage():
            await self.scheduler.RegisterEngine(
                scheduler_pb2.RegisterEngineRequest(engine=engine_pb(record, self.node_id))
            )

    async def deregister(self, engine_id: str, drain_timeout_s: float = 0.0) -> None:
        """Take an engine out of routing (with the scheduler's drain when over gRPC)."""
        if self.etcd_agent is not None:
            await self.etcd_agent.withdraw(engine_id, drain_timeout_s)
            return
        assert self.scheduler is not None
        with rpc_errors_as_sage():
            await self.scheduler.DeregisterEngine(
                scheduler_pb2.DeregisterEngineRequest(
                    engine_id=engine_id, drain_timeout_s=drain_timeout_s
                ),
                timeout=self.settings.rpc_timeout_s + drain_timeout_s,
            )

    async def managed_elsewhere(self, names: frozenset[str]) -> list[str]:
        """Engines other lifecycles (other nodes) started that serve one of `names`, as the
        scheduler (or etcd's engines/) knows them; an unreachable one leaves this node's own
        check."""
        engines: list[common_pb2.Engine] = []
        try:
            if self.etcd is not None:
                kvs, _ = await self.etcd.get_prefix(cluster_keys(self.settings).engines)
                for kv in kvs:
                    engine = common_pb2.Engine()
                    engine.ParseFromString(kv.value)
                    engines.append(engine)
            elif self.scheduler is not None:
                reply = await self.scheduler.ListEngines(scheduler_pb2.ListEnginesRequest())
                engines = list(reply.engines)
        except Exception as exc:
            log.warning(
                "cluster's engines unreachable; checked this node's engines only",
                extra={"error": str(exc)},
            )
            return []
        return [
            e.engine_id
            for e in engines
            if e.backend not in ("", "external") and names.intersection((e.model, *e.aliases))
        ]

    async def aclose(self) -> None:
        """Close the channels (after the agent and the manager)."""
        if isinstance(self.store, EtcdEngineStore):
            await self.store.aclose()
        if self.etcd is not None:
            await self.etcd.close()
        if self.sched_channel is not None:
            await self.sched_channel.close(None)


def build_server(settings: SageSettings, addr: str | None = None) -> tuple[SageServer, int]:
    """The lifecycle server; ready engines are registered with the scheduler over gRPC, or
    kept in etcd (with the engine registry) in etcd mode."""
    gpu_channel = create_channel(
        settings.address("gpu_manager"), default_timeout=settings.rpc_timeout_s
    )
    wiring = _Wiring(settings)
    node_id = wiring.node_id
    manager = EngineLifecycleManager(
        settings.llm_state_dir,
        register=wiring.register,
        deregister=wiring.deregister,
        gpus=GrpcGpuAllocator(gpu_channel),
        restart=RestartPolicy(
            initial_s=settings.lifecycle.restart_backoff_s,
            max_crashes=settings.lifecycle.max_crashes,
        ),
        advertise_host=settings.cluster.advertise_host,
        policy=LaunchPolicy.from_settings(settings),
        external_policy=ExternalEnginePolicy.from_settings(settings),
        managed_elsewhere=wiring.managed_elsewhere,
        store=wiring.store,
    )
    bound: dict[str, int] = {}
    gpu_stub = gpu_manager_pb2_grpc.GpuManagerServiceStub(gpu_channel)
    agent: NodeAgent | EtcdNodeAgent
    if wiring.etcd is not None:
        agent = wiring.etcd_agent = EtcdNodeAgent(
            settings,
            manager,
            gpu_stub,
            lambda: bound["port"],
            wiring.etcd,
            cluster_keys(settings),
        )
    else:
        assert wiring.scheduler is not None
        agent = NodeAgent(settings, manager, gpu_stub, wiring.scheduler, lambda: bound["port"])
    server, port = create_server(
        addr or f"{settings.host}:{settings.lifecycle.port}",
        [
            Registration(
                pb.DESCRIPTOR.services_by_name["LifecycleService"].full_name,
                pb_grpc.add_LifecycleServiceServicer_to_server,
                LifecycleServicer(
                    manager,
                    engine_bind_host(settings.host, settings.cluster.advertise_host),
                    node_id,
                    agent,
                ),
            )
        ],
    )
    bound["port"] = port
    tasks: list[asyncio.Task[None]] = []

    async def resync_forever() -> None:
        while True:
            await asyncio.sleep(RESYNC_INTERVAL_S)
            await manager.resync()

    async def _start() -> None:
        if wiring.etcd is None:
            await manager.recover()
            tasks.append(asyncio.get_running_loop().create_task(resync_forever()))
            agent.start()
            return
        # etcd mode: keys are state, not a cache to refill, so no resync. Lifecycle serves
        # even while etcd does not answer; its registry is read (and engines re-adopted)
        # once it does.
        agent.start()
        recovery = asyncio.get_running_loop().create_task(manager.recover())
        tasks.append(recovery)
        done, _ = await asyncio.wait({recovery}, timeout=settings.rpc_timeout_s)
        if recovery in done:
            recovery.result()
        else:
            log.error(
                "serving before the engine registry could be read from etcd; engines are "
                "re-adopted once etcd answers",
                extra={"node_id": node_id, "endpoints": settings.cluster.etcd_endpoints},
            )

    async def _close() -> None:
        await agent.aclose()
        for task in tasks:
            task.cancel()
        await manager.shutdown(stop_engines=settings.lifecycle.stop_engines_on_exit)
        await wiring.aclose()
        await gpu_channel.close(None)

    server.on_start(_start)
    server.on_stop(_close)
    return server, port
