"""gRPC transport of the lifecycle service."""

from __future__ import annotations

from typing import Any

from sage.common.config.settings import SageSettings
from sage.common.grpc import (
    Registration,
    SageServer,
    create_channel,
    create_server,
    rpc_errors_as_sage,
)
from sage.common.grpc.engine_enums import (
    kind_name,
    kind_value,
    role_name,
    role_value,
    state_value,
)
from sage.rpc.common.v1 import common_pb2
from sage.rpc.lifecycle.v1 import lifecycle_pb2 as pb
from sage.rpc.lifecycle.v1 import lifecycle_pb2_grpc as pb_grpc
from sage.rpc.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

from .commands import EngineSpec
from .manager import EngineInstance, EngineLifecycleManager


def engine_pb(instance: EngineInstance) -> common_pb2.Engine:
    """Lifecycle's view of an engine as the shared Engine message."""
    spec = instance.spec
    return common_pb2.Engine(
        engine_id=instance.engine_id,
        model=spec.model,
        kind=kind_value(spec.kind),
        base_url=instance.base_url,
        role=role_value(spec.role),
        state=state_value(instance.state),
        backend=instance.backend,
        aliases=list(spec.aliases),
        pid=instance.pid,
        port=instance.port,
        labels=spec.labels,
    )


def spec_from_pb(request: pb.StartEngineRequest, host: str) -> EngineSpec:
    """StartEngineRequest → EngineSpec with defaults applied."""
    return EngineSpec(
        model=request.model,
        kind=kind_name(request.kind, default="llm"),
        backend=request.backend,
        port=request.port,
        host=host,
        engine_id=request.engine_id,
        base_url=request.base_url,
        tensor_parallel_size=request.tensor_parallel_size or 1,
        gpu_memory_utilization=request.gpu_memory_utilization,
        extra_args=tuple(request.extra_args),
        startup_timeout_s=float(request.startup_timeout_s or 300),
        aliases=tuple(request.aliases),
        role=role_name(request.role),
    )


class LifecycleServicer(pb_grpc.LifecycleServiceServicer):
    """LifecycleService over EngineLifecycleManager."""

    def __init__(self, manager: EngineLifecycleManager, engine_host: str) -> None:
        self.manager = manager
        self.engine_host = engine_host

    async def StartEngine(
        self, request: pb.StartEngineRequest, context: Any
    ) -> pb.StartEngineResponse:
        instance = await self.manager.start(spec_from_pb(request, self.engine_host))
        return pb.StartEngineResponse(engine=engine_pb(instance))

    async def StopEngine(
        self, request: pb.StopEngineRequest, context: Any
    ) -> pb.StopEngineResponse:
        instance = await self.manager.stop(request.engine_id, float(request.drain_timeout_s or 10))
        return pb.StopEngineResponse(engine=engine_pb(instance))

    async def GetEngine(self, request: pb.GetEngineRequest, context: Any) -> pb.GetEngineResponse:
        return pb.GetEngineResponse(engine=engine_pb(self.manager.get(request.engine_id)))

    async def ListEngines(
        self, request: pb.ListEnginesRequest, context: Any
    ) -> pb.ListEnginesResponse:
        return pb.ListEnginesResponse(engines=[engine_pb(i) for i in self.manager.instances()])

    async def TailLogs(self, request: pb.TailLogsRequest, context: Any) -> pb.TailLogsResponse:
        return pb.TailLogsResponse(
            lines=self.manager.tail_logs(request.engine_id, request.lines or 100)
        )


def build_server(settings: SageSettings, addr: str | None = None) -> tuple[SageServer, int]:
    """The lifecycle server; ready engines are registered with the scheduler over gRPC."""
    channel = create_channel(settings.address("scheduler"), default_timeout=settings.rpc_timeout_s)
    scheduler = scheduler_pb2_grpc.SchedulerServiceStub(channel)

    async def register(instance: EngineInstance) -> None:
        with rpc_errors_as_sage():
            await scheduler.RegisterEngine(
                scheduler_pb2.RegisterEngineRequest(engine=engine_pb(instance))
            )

    async def deregister(engine_id: str) -> None:
        with rpc_errors_as_sage():
            await scheduler.DeregisterEngine(
                scheduler_pb2.DeregisterEngineRequest(engine_id=engine_id)
            )

    manager = EngineLifecycleManager(
        settings.llm_state_dir / "logs", register=register, deregister=deregister
    )
    server, port = create_server(
        addr or f"{settings.host}:{settings.lifecycle_port}",
        [
            Registration(
                pb.DESCRIPTOR.services_by_name["LifecycleService"].full_name,
                pb_grpc.add_LifecycleServiceServicer_to_server,
                LifecycleServicer(manager, settings.host),
            )
        ],
    )

    async def _close() -> None:
        await manager.shutdown()
        await channel.close(None)

    server.on_stop(_close)
    return server, port
