"""The node agent side of several hosts: lifecycle describes its node (GPUs from
gpu_manager, ready engines, reachable addresses) and either heart-beats it to the scheduler
(NodeAgent) or, in etcd mode, keeps it and its ready engines in etcd under one lease
(EtcdNodeAgent)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import grpc

from sage.common.config.settings import SageSettings
from sage.common.etcd import ClusterKeys, EtcdClient, KeptLease, advertise_host_of, node_id_of
from sage.rpc.common.v1 import common_pb2
from sage.rpc.gpu_manager.v1 import gpu_manager_pb2
from sage.rpc.scheduler.v1 import scheduler_pb2

from .backends import BACKENDS
from .manager import EngineLifecycleManager
from .store import FAILED, READY, STOPPED

if TYPE_CHECKING:
    from sage.rpc.gpu_manager.v1.gpu_manager_pb2_grpc import GpuManagerServiceAsyncStub
    from sage.rpc.scheduler.v1.scheduler_pb2_grpc import SchedulerServiceAsyncStub

log = logging.getLogger("sage.lifecycle")


class NodeReporter:
    """Builds this node's report (what both agents publish, and DescribeNode answers)."""

    def __init__(
        self,
        settings: SageSettings,
        manager: EngineLifecycleManager,
        gpu_stub: GpuManagerServiceAsyncStub,
        lifecycle_port: Callable[[], int],
    ) -> None:
        self.node_id = node_id_of(settings)
        self.advertise_host = advertise_host_of(settings)
        self.interval_s = settings.cluster.heartbeat_s
        self.rpc_timeout_s = min(settings.rpc_timeout_s, max(1.0, settings.cluster.heartbeat_s * 2))
        self.instance = uuid.uuid4().hex[:12]
        self._manager = manager
        self._gpus = gpu_stub
        self._port = lifecycle_port

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


class NodeAgent(NodeReporter):
    """Keeps this node registered with the scheduler by heart-beating its report."""

    def __init__(
        self,
        settings: SageSettings,
        manager: EngineLifecycleManager,
        gpu_stub: GpuManagerServiceAsyncStub,
        scheduler_stub: SchedulerServiceAsyncStub,
        lifecycle_port: Callable[[], int],
    ) -> None:
        super().__init__(settings, manager, gpu_stub, lifecycle_port)
        self._scheduler = scheduler_stub
        self._registered = False
        self._last_error = ""
        self._task: asyncio.Task[None] | None = None

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


# A GPU's free memory moves all the time; the report is written again for a move of at
# least this share of the GPU's memory (or for any other change), not for every wobble.
FREE_MEMORY_STEP = 0.05


def report_changed(old: common_pb2.NodeReport | None, new: common_pb2.NodeReport) -> bool:
    """Whether `new` is worth writing over `old`: anything but free GPU memory differs, or
    some GPU's free memory moved by FREE_MEMORY_STEP of its total or more."""
    if old is None:
        return True
    if len(old.gpus) != len(new.gpus):
        return True
    a, b = common_pb2.NodeReport(), common_pb2.NodeReport()
    a.CopyFrom(old)
    b.CopyFrom(new)
    for ga, gb in zip(a.gpus, b.gpus, strict=True):
        step = max(1, int(gb.memory_total_bytes * FREE_MEMORY_STEP))
        if abs(ga.memory_free_bytes - gb.memory_free_bytes) >= step:
            return True
        ga.memory_free_bytes = gb.memory_free_bytes = 0
    return a.SerializeToString(deterministic=True) != b.SerializeToString(deterministic=True)


# How long a drained engine stays DRAINING in etcd before its key goes: well above the
# put-to-routed latency of a replica's watch (ms; bench/etcd_scale.py), so no replica sends
# it new work after lifecycle starts counting its requests down.
DRAIN_NOTICE_S: Final = 0.5


class EtcdNodeAgent(NodeReporter):
    """This node in etcd (etcd mode): one lease (TTL etcd_lease_ttl_s) holds nodes/<node id>
    (the NodeReport) and engines/<engine id> (common.v1.Engine) for each ready engine.

    The report is built every heartbeat_s and written only when it changed; engines are
    written by `publish`/`withdraw` (the manager's register/deregister) at once. A clean
    exit revokes the lease, so every key goes at once; a dead process stops refreshing it,
    so they go after the TTL. An etcd that does not answer is retried: nothing is lost,
    the keys are written once it is back.
    """

    def __init__(
        self,
        settings: SageSettings,
        manager: EngineLifecycleManager,
        gpu_stub: GpuManagerServiceAsyncStub,
        lifecycle_port: Callable[[], int],
        client: EtcdClient,
        keys: ClusterKeys,
    ) -> None:
        super().__init__(settings, manager, gpu_stub, lifecycle_port)
        self.keys = keys
        self.lease = KeptLease(client, settings.cluster.etcd_lease_ttl_s, name=self.node_id)
        # publish/withdraw wait this long for etcd, then leave the write to the next tick.
        self.write_timeout_s = self.rpc_timeout_s
        self._want: dict[bytes, bytes] = {}  # the keys this node should have under its lease
        self._have: dict[bytes, bytes] = {}  # those written (as far as this process knows)
        # Engines withdrawn that this process never wrote: an earlier process of this node
        # may have (its lease lives on for up to the TTL after a crash), so delete them.
        self._stale: set[bytes] = set()
        self._reported: common_pb2.NodeReport | None = None
        self._granted = False
        self._closed = False
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._last_error = ""
        self._task: asyncio.Task[None] | None = None

    def _engine_key(self, engine_id: str) -> bytes:
        return self.keys.engine(engine_id).encode()

    async def publish(self, engine: common_pb2.Engine) -> None:
        """Make `engine` routable (engines/<id> under the lease); never raises: a write etcd
        did not take now is done by a later tick."""
        key = self._engine_key(engine.engine_id)
        self._want[key] = engine.SerializeToString(deterministic=True)
        self._stale.discard(key)
        await self._sync_now()

    async def withdraw(self, engine_id: str, drain_timeout_s: float = 0.0) -> None:
        """Take an engine out of routing (delete engines/<id>).

        With a drain, the key is first written DRAINING and left so for a moment: every
        scheduler replica then stops sending it new work while what it routed there runs
        on, instead of the engine vanishing from routing with requests on their way
        (lifecycle's stop then waits for the engine's own count to reach zero)."""
        key = self._engine_key(engine_id)
        current = self._want.get(key)
        if drain_timeout_s > 0 and current is not None:
            engine = common_pb2.Engine.FromString(current)
            engine.state = common_pb2.ENGINE_STATE_DRAINING
            self._want[key] = engine.SerializeToString(deterministic=True)
            await self._sync_now()
            await asyncio.sleep(min(drain_timeout_s, DRAIN_NOTICE_S))
        self._want.pop(key, None)
        if key not in self._have:
            self._stale.add(key)
        await self._sync_now()

    async def _sync_now(self) -> None:
        # The node report lists ready engines: the tick this wakes brings it up to date.
        self._wake.set()
        if not self._granted or self._closed:
            return
        try:
            await asyncio.wait_for(self._sync(), self.write_timeout_s)
        except Exception as exc:  # etcd unreachable: the next tick writes it
            self._note_error(exc)

    async def _sync(self) -> None:
        """Write what changed, delete what went (each key remembered only once stored)."""
        async with self._lock:
            for key, value in list(self._want.items()):
                if self._have.get(key) != value:
                    await self.lease.put(key, value)
                    self._have[key] = value
            for key in [k for k in self._have if k not in self._want]:
                await self.lease.delete(key)
                self._have.pop(key, None)
            for key in list(self._stale):
                if key not in self._want:
                    await self.lease.client.delete(key)
                self._stale.discard(key)

    def _note_error(self, exc: BaseException) -> None:
        message = str(exc) or type(exc).__name__
        if message != self._last_error:  # each new problem once, not every beat
            log.warning(
                "node state not written to etcd (retrying)",
                extra={"node_id": self.node_id, "error": message},
            )
            self._last_error = message

    async def tick(self) -> None:
        """Refresh the report (written when it changed) and forget engines that finished
        (a withdraw etcd did not take is retried here)."""
        report = await self.report()
        if report_changed(self._reported, report):
            self._want[self.keys.node(self.node_id).encode()] = report.SerializeToString(
                deterministic=True
            )
            self._reported = report
        finished = {
            self._engine_key(r.engine_id)
            for r in self._manager.instances()
            if r.state in (STOPPED, FAILED)
        }
        known = {self._engine_key(r.engine_id) for r in self._manager.instances()}
        node_key = self.keys.node(self.node_id).encode()
        for key in list(self._want):
            if key != node_key and (key in finished or key not in known):
                del self._want[key]
        await self._sync()
        if self._last_error:
            log.info("node state written to etcd again", extra={"node_id": self.node_id})
            self._last_error = ""

    def start(self) -> None:
        """Grant the lease (retrying while etcd is unreachable), then tick every
        heartbeat_s until `aclose`."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="etcd-node-agent")

    async def _grant(self) -> None:
        tries = 0
        while True:
            try:
                await self.lease.start()
                break
            except Exception as exc:
                tries += 1
                if tries == 1:
                    log.error(
                        "etcd unreachable: node and engines not registered yet (retrying)",
                        extra={
                            "node_id": self.node_id,
                            "endpoints": ",".join(self.lease.client.endpoints),
                            "error": str(exc),
                        },
                    )
                await asyncio.sleep(min(self.interval_s, 0.2 * tries))
        self._granted = True
        log.info(
            "node registered in etcd",
            extra={"node_id": self.node_id, "lease": f"{self.lease.lease_id:x}"},
        )

    async def _run(self) -> None:
        await self._grant()
        while True:
            self._wake.clear()  # a wake from here on means another tick right after this
            try:
                await self.tick()
            except Exception as exc:  # never let one bad tick end the agent
                self._note_error(exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval_s)

    async def aclose(self, *, revoke: bool = True) -> None:
        """Stop; revoke the lease so the node and its engines leave at once (revoke=False
        leaves them to expire after the TTL, as a crash would)."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.lease.close(revoke=revoke), self.write_timeout_s)
