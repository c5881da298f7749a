"""A GPU reservation belongs to its engine: with lifecycle kill -9'd, gpu_manager still
releases the memory of an engine that dies, and keeps that of one that lives.

gpu_manager runs in the test's loop with simulated GPUs (its NVML stand-in, the only fake);
lifecycle and the engine are real processes, so `kill -9` is a real kill. The engine is the
bundled MiniLM embedding engine on a reserved (simulated) GPU, told to compute on the CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sage.common.config.settings import SageSettings
from sage.common.grpc import create_channel, process_token
from sage.rpc.common.v1 import common_pb2
from sage.rpc.gpu_manager.v1 import gpu_manager_pb2, gpu_manager_pb2_grpc
from sage.rpc.lifecycle.v1 import lifecycle_pb2, lifecycle_pb2_grpc
from sage.services.gpu_manager.server import build_server as build_gpu_manager

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


class Lifecycle:
    """`python -m sage.services.lifecycle` as a child process, one at a time."""

    def __init__(self, home: Path, port: int, gpu_port: int) -> None:
        self.home = home
        self.port = port
        env = {k: v for k, v in os.environ.items() if not k.startswith("SAGE_")}
        env.update(
            {
                "SAGE_HOME": str(home),
                "SAGE_HOST": "127.0.0.1",
                "SAGE_LIFECYCLE_PORT": str(port),
                "SAGE_GPU_MANAGER_ADDR": f"127.0.0.1:{gpu_port}",
                "SAGE_SCHEDULER_ADDR": "127.0.0.1:1",  # none: registrations fail quietly
                "SAGE_INTERNAL_TOKEN": process_token(),
                # The simulated GPU has no CUDA: the engine computes on the CPU.
                "SAGE_LAUNCH_ALLOWED_ARGS": "--device",
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.spawn()
        await self.wait_ready()

    def spawn(self) -> None:
        with open(self.home / "lifecycle.out", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sage.services.lifecycle"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )

    async def wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + 60
        channel = create_channel(f"127.0.0.1:{self.port}")
        try:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, self.log()
                with contextlib.suppress(grpc.RpcError):
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                await asyncio.sleep(0.1)
        finally:
            await channel.close(None)
        raise AssertionError(f"lifecycle not ready:\n{self.log()}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def log(self) -> str:
        return (self.home / "lifecycle.out").read_text(errors="replace")[-3000:]


@pytest.fixture
async def gpu_manager(settings: SageSettings) -> AsyncIterator[int]:
    """gpu_manager on port 0 with one simulated 80 GiB GPU, reconciling every 0.2 s."""
    sim = settings.model_copy(update={"gpu_simulate": "1x80", "gpu_reconcile_interval_s": 0.2})
    server, port = build_gpu_manager(sim, "127.0.0.1:0")
    await server.start()
    yield port
    await server.stop(1)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_reservation_follows_the_engine_through_lifecycle_kill9(
    gpu_manager: int, settings: SageSettings, port_factory: Callable[[], int]
) -> None:
    home = settings.home
    home.mkdir(parents=True, exist_ok=True)
    lifecycle = Lifecycle(home, port_factory(), gpu_manager)
    engine_pid = 0
    gpu_channel = create_channel(f"127.0.0.1:{gpu_manager}")
    life_channel = create_channel(f"127.0.0.1:{lifecycle.port}")
    gpus = gpu_manager_pb2_grpc.GpuManagerServiceStub(gpu_channel)
    life = lifecycle_pb2_grpc.LifecycleServiceStub(life_channel)

    async def owners() -> dict[str, set[int]]:
        reply = await gpus.ListReservations(gpu_manager_pb2.ListReservationsRequest(), timeout=10)
        found: dict[str, set[int]] = {}
        for r in reply.reservations:
            found.setdefault(r.engine_id, set()).add(r.owner_pid)
        return found

    try:
        await lifecycle.start()
        reply = await life.StartEngine(
            lifecycle_pb2.StartEngineRequest(
                model=MINILM,
                kind=common_pb2.ENGINE_KIND_EMBEDDING,
                backend="embedding",
                use_gpu=True,
                required_memory_gb=2,
                extra_args=["--device", "cpu"],
                startup_timeout_s=180,
            ),
            timeout=200,
        )
        engine = reply.engine
        engine_pid = engine.pid
        assert list(engine.gpu_indexes) == [0], lifecycle.log()
        # Once spawned, the engine itself owns its reservation (`sage llm gpu` shows it).
        assert await owners() == {engine.engine_id: {engine_pid}}

        # A reservation from before owners were handed over (owner 0) gets its engine
        # as owner when a restarted lifecycle re-adopts the engine.
        await gpus.SetOwner(
            gpu_manager_pb2.SetOwnerRequest(engine_id=engine.engine_id, owner_pid=0),
            timeout=10,
        )
        lifecycle.kill9()
        await lifecycle.start()
        assert await owners() == {engine.engine_id: {engine_pid}}

        # Lifecycle gone for good: the live engine keeps its memory ...
        lifecycle.kill9()
        released = await gpus.Reconcile(gpu_manager_pb2.ReconcileRequest(), timeout=10)
        assert list(released.released) == []
        assert await owners() == {engine.engine_id: {engine_pid}}
        # ... and once it dies too, gpu_manager's own reconcile timer releases it.
        os.killpg(engine_pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while await owners() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        assert await owners() == {}, "the dead engine's reservation was not released"
    finally:
        if lifecycle.proc is not None and lifecycle.proc.poll() is None:
            lifecycle.kill9()
        if engine_pid and not _gone(engine_pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(engine_pid, signal.SIGKILL)
        await gpu_channel.close(None)
        await life_channel.close(None)
