"""The node agent side of several hosts: lifecycle describes its node (GPUs from
gpu_manager, ready engines, reachable addresses) and heart-beats it to the scheduler."""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from sage.common.config.settings import SageSettings
from sage.rpc.common.v1 import common_pb2
from sage.rpc.gpu_manager.v1 import gpu_manager_pb2
from sage.rpc.scheduler.v1 import scheduler_pb2

from .backends import BACKENDS
from .manager import EngineLifecycleManager
from .store import READY

if TYPE_CHECKING:
    from sage.rpc.gpu_manager.v1.gpu_manager_pb2_grpc import GpuManagerServiceAsyncStub
    from sage.rpc.scheduler.v1.scheduler_pb2_grpc import SchedulerServiceAsyncStub

log = logging.getLogger("sage.lifecycle")

_WILDCARD = ("", "0.0.0.0", "::", "[::]")


def node_id_of(settings: SageSettings) -> str:
    """SAGE_NODE_ID, or the hostname."""
    return settings.cluster.node_id or socket.gethostname()


def advertise_host_of(settings: SageSettings) -> str:
    """The address other hosts reach this node at: SAGE_ADVERTISE_HOST, else the bind host
    (the hostname when bound to a wildcard address, which no other host can dial)."""
    if settings.cluster.advertise_host:
        return settings.cluster.advertise_host
    if settings.host in _WILDCARD:
        return socket.gethostname()
    return settings.host


class NodeAgent:
    """Builds this node's report and keeps it registered with the scheduler."""

    def __init__(
        self,
        settings: SageSettings,
        manager: EngineLifecycleManager,
        gpu_stub: GpuManagerServiceAsyncStub,
        scheduler_stub: SchedulerServiceAsyncStub,
        lifecycle_port: Callable[[], int],
    ) -> None:
        self.node_id = node_id_of(settings)
        self.advertise_host = advertise_host_of(settings)
        self.interval_s = settings.cluster.heartbeat_s
        self.rpc_timeout_s = min(settings.rpc_timeout_s, max(1.0, settings.cluster.heartbeat_s * 2))
        self.instance = uuid.uuid4().hex[:12]
        self._manager = manager
        self._gpus = gpu_stub
        self._scheduler = scheduler_stub
        self._port = lifecycle_port
        self._registered = False
        self._last_error = ""
        self._task: asyncio.Task[None] | None = None

    async def report(self) -> common_pb2.NodeReport:
        """This node now; an unreachable gpu_manager reports zero GPUs."""
        gpus: list[common_pb2.NodeGpu] = []
        try:
            reply = await self._gpus.ListGpus(
                gpu_manager_pb2.ListGpusRequest(), timeout=self.rpc_timeout_s
            )
            gpus = [
                common_pb2.NodeGpu(
                    index=g.index,
                    name=g.name,
                    memory_total_bytes=g.memory_total_bytes,
                    memory_free_bytes=max(0, g.memory_available_bytes),
                )
                for g in reply.gpus
            ]
        except grpc.RpcError:
            pass
        return common_pb2.NodeReport(
            node_id=self.node_id,
            lifecycle_addr=f"{self.advertise_host}:{self._port()}",
            advertise_host=self.advertise_host,
            gpu_count=len(gpus),
            gpus=gpus,
            engine_ids=[r.engine_id for r in self._manager.instances() if r.state == READY],
            agent_instance=self.instance,
            cpu_backends=sorted(b.name for b in BACKENDS.values() if not b.uses_gpu),
        )

    async def beat(self) -> None:
        """One heartbeat (registering first, or again after the scheduler forgot us)."""
        report = await self.report()
        try:
            if self._registered:
                await self._scheduler.NodeHeartbeat(
                    scheduler_pb2.NodeHeartbeatRequest(report=report), timeout=self.rpc_timeout_s
                )
            else:
                await self._scheduler.RegisterNode(
                    scheduler_pb2.RegisterNodeRequest(report=report), timeout=self.rpc_timeout_s
                )
                self._registered = True
                log.info("node registered", extra={"node_id": self.node_id})
            self._last_error = ""
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                self._registered = False  # the scheduler restarted: register next time
            message = f"{err.code().name}: {err.details()}"
            if message != self._last_error:  # log each new problem once, not every beat
                level = (
                    logging.ERROR
                    if err.code() == grpc.StatusCode.ALREADY_EXISTS
                    else logging.WARNING
                )
                log.log(
                    level,
                    "node heartbeat refused",
                    extra={"node_id": self.node_id, "error": message},
                )
                self._last_error = message

    def start(self) -> None:
        """Heart-beat every node_heartbeat_s until `aclose`."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await self.beat()
            except Exception:  # never let one bad beat end the agent
                log.exception("node heartbeat failed", extra={"node_id": self.node_id})
            await asyncio.sleep(self.interval_s)

    async def aclose(self) -> None:
        """Stop heart-beating."""
        if self._task is not None:
            self._task.cancel()
