"""The GPU manager as a real gRPC server (port 0) over simulated NVML, and as a process.

Covers the contract end to end: readings, reserve/release/list/reconcile, the status code
and field of every kind of bad input (with the ledger unchanged), concurrent reserves,
reservations surviving a restart, the reconcile timer, and `sage llm gpu`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sage.common.config.settings import SageSettings
from sage.common.exceptions import (
    ConflictError,
    InsufficientResourcesError,
    InvalidRequestError,
    NotFoundError,
    SageError,
)
from sage.common.grpc import SageServer, create_channel, from_rpc_error, process_token
from sage.rpc.gpu_manager.v1 import gpu_manager_pb2 as pb
from sage.rpc.gpu_manager.v1 import gpu_manager_pb2_grpc as pb_grpc
from sage.services.gpu_manager.server import build_server
from sage.services.gpu_manager.sim_nvml import SimGpu, SimNvml

GiB = 1 << 30
MiB = 1 << 20


@dataclass
class GpuService:
    """A running GPU manager, its stub, and the simulated GPUs under it."""

    stub: Any
    nvml: SimNvml
    server: SageServer
    port: int


Starter = Callable[..., Awaitable[GpuService]]


@pytest.fixture
async def gpu_service(settings: SageSettings) -> AsyncIterator[Starter]:
    """Start GPU managers on 127.0.0.1:0 (same SAGE_HOME, so a second one is a restart)."""
    servers: list[SageServer] = []
    channels: list[grpc.aio.Channel] = []

    async def start(
        nvml: SimNvml | None = None,
        *,
        reconcile_interval_s: float = 0.0,
        settings_: SageSettings | None = None,
    ) -> GpuService:
        nvml = nvml if nvml is not None else two_h200()
        base = settings_ or settings.model_copy(update={"disable_nvml": False})
        server, port = build_server(
            base.model_copy(update={"gpu_reconcile_interval_s": reconcile_interval_s}),
            "127.0.0.1:0",
            nvml=nvml,
        )
        await server.start()
        servers.append(server)
        channel = create_channel(f"127.0.0.1:{port}", default_timeout=20)
        channels.append(channel)
        return GpuService(pb_grpc.GpuManagerServiceStub(channel), nvml, server, port)

    yield start
    for channel in channels:
        await channel.close(None)
    for server in reversed(servers):
        await server.stop(1)


def two_h200() -> SimNvml:
    return SimNvml(
        [
            SimGpu(name="NVIDIA H200", total_bytes=140 * GiB, reserved_bytes=512 * MiB),
            SimGpu(name="NVIDIA H200", total_bytes=140 * GiB, reserved_bytes=512 * MiB),
        ]
    )


async def rpc_error(call: Awaitable[Any]) -> tuple[grpc.StatusCode, SageError]:
    with pytest.raises(grpc.RpcError) as info:
        await call
    return info.value.code(), from_rpc_error(info.value)


async def reservations(stub: Any) -> list[tuple[str, int, int]]:
    listed = await stub.ListReservations(pb.ListReservationsRequest())
    return [(r.engine_id, r.gpu_index, r.memory_bytes) for r in listed.reservations]


@pytest.fixture
async def sleeper() -> AsyncIterator[Callable[[], Awaitable[asyncio.subprocess.Process]]]:
    """Short-lived owner processes for reconcile tests; all killed and reaped after."""
    procs: list[asyncio.subprocess.Process] = []

    async def spawn() -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec("sleep", "60")
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_reserve_list_release(gpu_service: Starter) -> None:
    svc = await gpu_service()
    gpus = await svc.stub.ListGpus(pb.ListGpusRequest())
    assert gpus.nvml_available and gpus.nvml_error == "" and len(gpus.gpus) == 2
    first = gpus.gpus[0]
    assert first.name == "NVIDIA H200" and first.uuid.startswith("GPU-")
    assert first.memory_total_bytes == 140 * GiB
    assert first.memory_free_bytes == 140 * GiB - 512 * MiB
    margin = gpus.safety_margin_bytes
    assert margin == 7 * GiB  # 5% of 140 GiB beats the 512 MiB floor
    assert first.memory_available_bytes == first.memory_free_bytes - margin

    made = await svc.stub.Reserve(
        pb.ReserveRequest(
            engine_id="qwen-tp2", gpu_count=2, memory_per_gpu_bytes=60 * GiB, owner_pid=os.getpid()
        )
    )
    assert [(r.gpu_index, r.memory_bytes, r.owner_pid) for r in made.reservations] == [
        (0, 60 * GiB, os.getpid()),
        (1, 60 * GiB, os.getpid()),
    ]
    assert made.reservations[0].gpu_uuid == first.uuid and made.reservations[0].created_at > 0

    gpus = await svc.stub.ListGpus(pb.ListGpusRequest())
    for g in gpus.gpus:
        assert g.memory_reserved_bytes == 60 * GiB and list(g.engine_ids) == ["qwen-tp2"]
        assert g.memory_available_bytes == g.memory_free_bytes - margin - 60 * GiB

    # The engine loads 50 of its 60 GiB: NVML shows it, only 10 GiB stay outstanding.
    svc.nvml.gpus[0].used_bytes = 50 * GiB
    svc.nvml.gpus[0].processes = {os.getpid(): 50 * GiB}
    g0 = (await svc.stub.ListGpus(pb.ListGpusRequest())).gpus[0]
    assert g0.memory_used_bytes == 50 * GiB and [p.pid for p in g0.processes] == [os.getpid()]
    assert g0.memory_available_bytes == g0.memory_free_bytes - margin - 10 * GiB

    released = await svc.stub.Release(pb.ReleaseRequest(engine_id="qwen-tp2"))
    assert len(released.reservations) == 2
    assert await reservations(svc.stub) == []
    g0 = (await svc.stub.ListGpus(pb.ListGpusRequest())).gpus[0]
    assert g0.memory_reserved_bytes == 0 and list(g0.engine_ids) == []


BAD_RESERVES: list[tuple[dict[str, Any], grpc.StatusCode, type[SageError], str]] = [
    # (request fields, status, error class, field named)
    (
        {"engine_id": "x", "memory_per_gpu_bytes": -1},
        grpc.StatusCode.INVALID_ARGUMENT,
        InvalidRequestError,
        "memory_per_gpu_bytes",
    ),
    (
        {"engine_id": "x"},
        grpc.StatusCode.INVALID_ARGUMENT,
        InvalidRequestError,
        "memory_per_gpu_bytes",
    ),
    (
        {"engine_id": "x", "memory_fraction": 1.5},
        grpc.StatusCode.INVALID_ARGUMENT,
        InvalidRequestError,
        "memory_fraction",
    ),
    (
        {"engine_id": "", "memory_per_gpu_bytes": GiB},
        grpc.StatusCode.INVALID_ARGUMENT,
        InvalidRequestError,
        "engine_id",
    ),
    (
        {"engine_id": "x", "memory_per_gpu_bytes": 200 * GiB},
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        InsufficientResourcesError,
        "memory_per_gpu_bytes",
    ),
    (
        {"engine_id": "x", "gpu_count": 3, "memory_per_gpu_bytes": GiB},
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        InsufficientResourcesError,
        "gpu_count",
    ),
    (
        {"engine_id": "x", "gpu_count": 2, "memory_per_gpu_bytes": 100 * GiB},
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        InsufficientResourcesError,
        "memory_per_gpu_bytes",
    ),
    (
        {"engine_id": "x", "gpu_indexes": [5], "memory_per_gpu_bytes": GiB},
        grpc.StatusCode.NOT_FOUND,
        NotFoundError,
        "gpu_indexes",
    ),
    (
        {"engine_id": "held", "memory_per_gpu_bytes": GiB},
        grpc.StatusCode.ALREADY_EXISTS,
        ConflictError,
        "engine_id",
    ),
]


async def test_bad_input_gets_a_status_naming_the_field(gpu_service: Starter) -> None:
    svc = await gpu_service()
    # GPU 1 is busy with 80 GiB, so a TP=2 ask of 100 GiB fails on it as a whole.
    svc.nvml.gpus[1].used_bytes = 80 * GiB
    await svc.stub.Reserve(
        pb.ReserveRequest(engine_id="held", gpu_indexes=[0], memory_per_gpu_bytes=GiB)
    )
    before = await reservations(svc.stub)
    for fields, code, error, param in BAD_RESERVES:
        got_code, err = await rpc_error(svc.stub.Reserve(pb.ReserveRequest(**fields)))
        assert (got_code, type(err), err.param) == (code, error, param), fields
        assert err.message
        assert await reservations(svc.stub) == before, fields

    got_code, err = await rpc_error(svc.stub.Release(pb.ReleaseRequest(engine_id="nope")))
    assert got_code == grpc.StatusCode.NOT_FOUND and isinstance(err, NotFoundError)
    assert err.param == "engine_id" and err.code == "reservation_not_found"
    assert "nope" in err.message
    assert await reservations(svc.stub) == before


async def test_concurrent_reserves_never_over_commit(gpu_service: Starter) -> None:
    svc = await gpu_service(SimNvml([SimGpu(total_bytes=80 * GiB, reserved_bytes=512 * MiB)]))
    # 80 GiB - 0.5 reserved by the driver - 4 margin = 75.5 GiB: room for 18 x 4 GiB.
    results = await asyncio.gather(
        *(
            svc.stub.Reserve(pb.ReserveRequest(engine_id=f"e{i}", memory_per_gpu_bytes=4 * GiB))
            for i in range(40)
        ),
        return_exceptions=True,
    )
    granted = [r for r in results if isinstance(r, pb.ReserveResponse)]
    refused = [r for r in results if isinstance(r, grpc.RpcError)]
    assert len(granted) == 18 and len(refused) == 22
    assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused)
    (gpu,) = (await svc.stub.ListGpus(pb.ListGpusRequest())).gpus
    assert gpu.memory_reserved_bytes == 72 * GiB <= gpu.memory_free_bytes - 4 * GiB


async def test_reservations_survive_a_restart(gpu_service: Starter) -> None:
    first = await gpu_service()
    await first.stub.Reserve(
        pb.ReserveRequest(engine_id="tp2", gpu_count=2, memory_fraction=0.25, owner_pid=os.getpid())
    )
    await first.stub.Reserve(
        pb.ReserveRequest(engine_id="solo", gpu_indexes=[1], memory_per_gpu_bytes=3 * GiB)
    )
    held = await reservations(first.stub)
    await first.server.stop(1)

    second = await gpu_service()
    assert await reservations(second.stub) == held
    code, _ = await rpc_error(
        second.stub.Reserve(pb.ReserveRequest(engine_id="tp2", memory_per_gpu_bytes=GiB))
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS
    g1 = (await second.stub.ListGpus(pb.ListGpusRequest())).gpus[1]
    assert g1.memory_reserved_bytes == 35 * GiB + 3 * GiB
    assert sorted(g1.engine_ids) == ["solo", "tp2"]


async def test_reconcile_releases_reservations_of_gone_owners(
    gpu_service: Starter, sleeper: Callable[[], Awaitable[asyncio.subprocess.Process]]
) -> None:
    svc = await gpu_service()
    owner = await sleeper()
    await svc.stub.Reserve(
        pb.ReserveRequest(engine_id="dies", memory_per_gpu_bytes=GiB, owner_pid=owner.pid)
    )
    await svc.stub.Reserve(pb.ReserveRequest(engine_id="unowned", memory_per_gpu_bytes=GiB))
    assert list((await svc.stub.Reconcile(pb.ReconcileRequest())).released) == []

    owner.kill()
    await owner.wait()
    released = (await svc.stub.Reconcile(pb.ReconcileRequest())).released
    assert [(r.engine_id, r.owner_pid) for r in released] == [("dies", owner.pid)]
    assert [r[0] for r in await reservations(svc.stub)] == ["unowned"]

    # An owner that is already gone is refused up front.
    code, err = await rpc_error(
        svc.stub.Reserve(
            pb.ReserveRequest(engine_id="late", memory_per_gpu_bytes=GiB, owner_pid=owner.pid)
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and err.param == "owner_pid"


async def test_reconcile_timer(
    gpu_service: Starter, sleeper: Callable[[], Awaitable[asyncio.subprocess.Process]]
) -> None:
    svc = await gpu_service(reconcile_interval_s=0.1)
    owner = await sleeper()
    await svc.stub.Reserve(
        pb.ReserveRequest(engine_id="e", memory_per_gpu_bytes=GiB, owner_pid=owner.pid)
    )
    await asyncio.sleep(0.3)
    assert [r[0] for r in await reservations(svc.stub)] == ["e"]  # alive: kept
    owner.kill()
    await owner.wait()
    for _ in range(100):
        if not await reservations(svc.stub):
            break
        await asyncio.sleep(0.05)
    assert await reservations(svc.stub) == []


async def test_cpu_only_host_reports_no_gpus(gpu_service: Starter, settings: SageSettings) -> None:
    svc = await gpu_service(settings_=settings.model_copy(update={"disable_nvml": True}))
    gpus = await svc.stub.ListGpus(pb.ListGpusRequest())
    assert list(gpus.gpus) == [] and not gpus.nvml_available
    assert "SAGE_DISABLE_NVML" in gpus.nvml_error
    code, err = await rpc_error(
        svc.stub.Reserve(pb.ReserveRequest(engine_id="e", memory_per_gpu_bytes=GiB))
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "no usable GPU" in err.message
    code, _ = await rpc_error(
        svc.stub.Reserve(
            pb.ReserveRequest(engine_id="e", gpu_indexes=[0], memory_per_gpu_bytes=GiB)
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND
    assert list((await svc.stub.Reconcile(pb.ReconcileRequest())).released) == []


# ---- `sage llm gpu` ----------------------------------------------------------------------


async def run_cli(*args: str, home: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sage.llm.cli",
        "llm",
        "gpu",
        *args,
        env={**os.environ, "SAGE_HOME": str(home), "SAGE_INTERNAL_TOKEN": process_token()},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_sage_llm_gpu_table_and_json(gpu_service: Starter, tmp_path: Path) -> None:
    svc = await gpu_service()
    svc.nvml.gpus[0].used_bytes = 20 * GiB
    svc.nvml.gpus[0].utilization = 42
    await svc.stub.Reserve(
        pb.ReserveRequest(engine_id="chat-1", gpu_indexes=[0], memory_per_gpu_bytes=30 * GiB)
    )
    addr = f"127.0.0.1:{svc.port}"

    code, out, err = await run_cli("--addr", addr, "--json", home=tmp_path)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["nvml_available"] and len(doc["gpus"]) == 2
    g0 = doc["gpus"][0]
    assert g0["memory_used_bytes"] == 20 * GiB and g0["memory_reserved_bytes"] == 30 * GiB
    assert g0["utilization_percent"] == 42 and g0["engines"] == ["chat-1"]
    assert doc["reservations"][0]["engine_id"] == "chat-1"

    code, out, err = await run_cli("--addr", addr, home=tmp_path)
    assert code == 0, err
    header, row0, row1 = out.splitlines()[:3]
    for column in ("GPU", "USED", "RESERVED", "FREE", "UTIL", "ENGINES"):
        assert column in header
    assert row0.split()[:3] == ["0", "NVIDIA", "H200"]
    assert "20.0" in row0 and "30.0" in row0 and "42%" in row0 and row0.endswith("chat-1")
    assert row1.endswith("-")


async def test_sage_llm_gpu_without_a_service(tmp_path: Path, port_factory: Any) -> None:
    code, out, err = await run_cli("--addr", f"127.0.0.1:{port_factory()}", home=tmp_path)
    assert code == 2 and out == ""
    assert "cannot reach the GPU manager" in err


# ---- the service as a process ------------------------------------------------------------


async def wait_serving(port: int, proc: asyncio.subprocess.Process) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(200):
            assert proc.returncode is None, "service exited early"
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("service never became healthy")


async def start_process(port: int, env: dict[str, str]) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sage.services.gpu_manager",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        # The stack's token, as `sage llm serve` hands it to its children.
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "SAGE_INTERNAL_TOKEN": process_token(),
            **env,
        },
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await wait_serving(port, proc)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    return proc


async def stop_process(proc: asyncio.subprocess.Process) -> None:
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 15) == 0


async def test_process_restart_keeps_reservations(tmp_path: Path, port_factory: Any) -> None:
    env = {"SAGE_HOME": str(tmp_path), "SAGE_GPU_SIMULATE": "2x80"}
    port = port_factory()
    proc = await start_process(port, env)
    try:
        async with create_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GpuManagerServiceStub(channel)
            await stub.Reserve(
                pb.ReserveRequest(engine_id="keep", gpu_count=2, memory_per_gpu_bytes=GiB),
                timeout=10,
            )
            held = await reservations(stub)
        await stop_process(proc)
        assert (tmp_path / "llm" / "gpu_reservations.json").exists()

        proc = await start_process(port, env)
        async with create_channel(f"127.0.0.1:{port}") as channel:
            assert await reservations(pb_grpc.GpuManagerServiceStub(channel)) == held
        await stop_process(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.skipif(Path("/dev/nvidia0").exists(), reason="host has an NVIDIA driver")
async def test_process_on_a_cpu_host_reports_no_gpus(tmp_path: Path, port_factory: Any) -> None:
    port = port_factory()
    proc = await start_process(port, {"SAGE_HOME": str(tmp_path)})
    try:
        async with create_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GpuManagerServiceStub(channel)
            gpus = await stub.ListGpus(pb.ListGpusRequest(), timeout=10)
        assert list(gpus.gpus) == [] and not gpus.nvml_available
        assert gpus.nvml_error.startswith(
            ("NVMLError_LibraryNotFound", "NVMLError_DriverNotLoaded")
        )
        await stop_process(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_bad_option_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sage.services.gpu_manager",
        "--port",
        "0",
        env={"PATH": "/usr/bin:/bin", "SAGE_HOME": str(tmp_path), "SAGE_GPU_SIMULATE": "lots"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 2
    assert b"SAGE_GPU_" in err and b"simulate" in err and b"Traceback" not in err
