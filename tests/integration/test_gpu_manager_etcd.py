"""gpu_manager in etcd mode (SAGE_ETCD_ENDPOINTS) as a real gRPC server over simulated GPUs
and a real etcd member: reservations outlive a kill -9 in etcd, not in the JSON file; a
dead owner's go at the next start; nodes never see each other's; etcd being down is
UNAVAILABLE, never a lost or leaked reservation."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sage.common.config.settings import SageSettings
from sage.common.etcd import EtcdClient
from sage.common.etcd.testing import EtcdMembers, etcd_binary
from sage.common.exceptions import ServiceUnavailableError
from sage.common.grpc import SageServer, create_channel, process_token
from sage.rpc.gpu_manager.v1 import gpu_manager_pb2 as pb
from sage.rpc.gpu_manager.v1 import gpu_manager_pb2_grpc as pb_grpc
from sage.services.gpu_manager.server import build_server

pytestmark = pytest.mark.skipif(
    etcd_binary() is None, reason="etcd is not installed (scripts/install_system_tools.sh)"
)

GiB = 1 << 30
_prefixes = itertools.count()


@pytest.fixture
def etcd_prefix() -> str:
    return f"/gm{os.getpid()}-{next(_prefixes)}"


async def etcd_keys(endpoints: str, prefix: str) -> dict[str, Any]:
    """Every key under `prefix` with its JSON value, read with a client of its own."""
    client = EtcdClient(endpoints)
    try:
        kvs, _ = await client.get_prefix(prefix)
        return {kv.key.decode(): json.loads(kv.value) for kv in kvs}
    finally:
        await client.close()


async def held(stub: Any) -> list[tuple[str, int, int, int]]:
    """(engine, GPU, bytes, owner) of every reservation, as ListReservations answers."""
    listed = await stub.ListReservations(pb.ListReservationsRequest(), timeout=10)
    return [(r.engine_id, r.gpu_index, r.memory_bytes, r.owner_pid) for r in listed.reservations]


@pytest.fixture
async def sleeper() -> AsyncIterator[Callable[[], Awaitable[asyncio.subprocess.Process]]]:
    """Owner processes; all killed and reaped after."""
    procs: list[asyncio.subprocess.Process] = []

    async def spawn() -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec("sleep", "120")
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# ---- the service as a process: kill -9 and restart -----------------------------------------


async def start_process(port: int, env: dict[str, str]) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sage.services.gpu_manager",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "SAGE_INTERNAL_TOKEN": process_token(),
            **env,
        },
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(300):
                assert proc.returncode is None, "gpu_manager exited early"
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return proc
                except grpc.RpcError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError("gpu_manager never became healthy")
    except BaseException:
        proc.kill()
        await proc.wait()
        raise


async def kill9(proc: asyncio.subprocess.Process) -> None:
    proc.send_signal(signal.SIGKILL)
    assert await asyncio.wait_for(proc.wait(), 15) == -signal.SIGKILL


async def test_kill9_and_restart_keeps_every_reservation_and_drops_dead_owners(
    etcd: EtcdMembers,
    etcd_prefix: str,
    tmp_path: Path,
    port_factory: Callable[[], int],
    sleeper: Callable[[], Awaitable[asyncio.subprocess.Process]],
) -> None:
    env = {
        "SAGE_HOME": str(tmp_path),
        "SAGE_GPU_SIMULATE": "2x80",
        "SAGE_ETCD_ENDPOINTS": etcd.endpoints,
        "SAGE_ETCD_PREFIX": etcd_prefix,
        "SAGE_NODE_ID": "gpu-host-1",
    }
    port = port_factory()
    lives, dies = await sleeper(), await sleeper()
    proc = await start_process(port, env)
    try:
        async with create_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GpuManagerServiceStub(channel)
            for engine_id, owner, count in (("tp2", lives.pid, 2), ("dies", dies.pid, 1)):
                await stub.Reserve(
                    pb.ReserveRequest(
                        engine_id=engine_id,
                        gpu_count=count,
                        memory_per_gpu_bytes=4 * GiB,
                        owner_pid=owner,
                    ),
                    timeout=10,
                )
            await stub.Reserve(
                pb.ReserveRequest(engine_id="unowned", gpu_indexes=[1], memory_per_gpu_bytes=GiB),
                timeout=10,
            )
            await stub.Reserve(
                pb.ReserveRequest(engine_id="released", memory_per_gpu_bytes=GiB), timeout=10
            )
            # A release is in etcd before it answers, as a reserve is: kill -9 right after.
            await stub.Release(pb.ReleaseRequest(engine_id="released"), timeout=10)
            before = await held(stub)
        await kill9(proc)

        # Nothing in the JSON file; every reservation in etcd under this node's prefix.
        assert not (tmp_path / "llm" / "gpu_reservations.json").exists()
        keys = await etcd_keys(etcd.endpoints, etcd_prefix)
        node_prefix = f"{etcd_prefix}/gpu/gpu-host-1/reservations/"
        assert all(k.startswith(node_prefix) for k in keys)
        assert sorted((v["engine_id"], v["gpu_index"]) for v in keys.values()) == sorted(
            (r[0], r[1]) for r in before
        )

        dies.kill()
        await dies.wait()
        proc = await start_process(port, env)
        async with create_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GpuManagerServiceStub(channel)
            # Started up with every record; its reconcile at start releases the dead owner's
            # reservation, and the others stay exactly as they were.
            for _ in range(100):
                if "dies" not in {r[0] for r in await held(stub)}:
                    break
                await asyncio.sleep(0.1)
            assert await held(stub) == [r for r in before if r[0] != "dies"]
            gpus = (await stub.ListGpus(pb.ListGpusRequest(), timeout=10)).gpus
            assert [g.memory_reserved_bytes for g in gpus] == [4 * GiB, 5 * GiB]
        await kill9(proc)
        keys = await etcd_keys(etcd.endpoints, etcd_prefix)
        assert sorted(v["engine_id"] for v in keys.values()) == ["tp2", "tp2", "unowned"]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_process_without_etcd_says_so_and_exits(
    tmp_path: Path, port_factory: Callable[[], int]
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sage.services.gpu_manager",
        "--host",
        "127.0.0.1",
        "--port",
        str(port_factory()),
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "SAGE_INTERNAL_TOKEN": process_token(),
            "SAGE_HOME": str(tmp_path),
            "SAGE_GPU_SIMULATE": "1x80",
            "SAGE_ETCD_ENDPOINTS": f"127.0.0.1:{port_factory()}",  # nothing listens
        },
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode(errors="replace")
    assert proc.returncode == 1, text
    assert "cannot start: no etcd member answered" in text
    assert "Traceback" not in text
    assert not (tmp_path / "llm" / "gpu_reservations.json").exists()


# ---- the server in the test's loop ---------------------------------------------------------


@pytest.fixture
async def gpu_manager(
    settings: SageSettings, etcd: EtcdMembers, etcd_prefix: str
) -> AsyncIterator[Callable[..., Awaitable[tuple[SageServer, Any]]]]:
    """Start gpu_managers on 127.0.0.1:0 in etcd mode (one simulated 80 GiB GPU), by node id."""
    started: list[tuple[SageServer, grpc.aio.Channel]] = []

    async def start(node_id: str, **overrides: Any) -> tuple[SageServer, Any]:
        node = settings.model_copy(
            update={
                "gpu_simulate": "1x80",
                "gpu_reconcile_interval_s": 0.0,
                "etcd_endpoints": etcd.endpoints,
                "etcd_prefix": etcd_prefix,
                "node_id": node_id,
                **overrides,
            }
        )
        server, port = build_server(node, "127.0.0.1:0")
        await server.start()
        channel = create_channel(f"127.0.0.1:{port}", default_timeout=20)
        started.append((server, channel))
        return server, pb_grpc.GpuManagerServiceStub(channel)

    yield start
    for server, channel in reversed(started):
        await channel.close(None)
        await server.stop(1)


async def test_two_nodes_never_see_each_others_reservations(
    gpu_manager: Callable[..., Awaitable[tuple[SageServer, Any]]], settings: SageSettings
) -> None:
    server_a, node_a = await gpu_manager("node-a")
    _, node_b = await gpu_manager("node-b")
    await node_a.Reserve(pb.ReserveRequest(engine_id="e", memory_per_gpu_bytes=10 * GiB))
    assert await held(node_b) == []
    # The same engine id on another node is another reservation, on another GPU.
    await node_b.Reserve(pb.ReserveRequest(engine_id="e", memory_per_gpu_bytes=20 * GiB))
    await node_b.Release(pb.ReleaseRequest(engine_id="e"))

    await server_a.stop(1)
    _, node_a = await gpu_manager("node-a")
    assert await held(node_a) == [("e", 0, 10 * GiB, 0)]
    _, node_b = await gpu_manager("node-b")
    assert await held(node_b) == []
    assert not (settings.llm_state_dir / "gpu_reservations.json").exists()


async def test_etcd_down_is_unavailable_and_loses_nothing(
    gpu_manager: Callable[..., Awaitable[tuple[SageServer, Any]]],
    tmp_path: Path,
) -> None:
    members = EtcdMembers(tmp_path / "etcd", hosts=["127.0.0.1"])
    members.start()
    members.wait_healthy()
    try:
        server, stub = await gpu_manager("n", etcd_endpoints=members.endpoints)
        await stub.Reserve(pb.ReserveRequest(engine_id="before", memory_per_gpu_bytes=GiB))
        members.kill(0)

        # The change cannot be made durable: refused, and the ledger is as it was.
        with pytest.raises(grpc.RpcError) as info:
            await stub.Reserve(pb.ReserveRequest(engine_id="during", memory_per_gpu_bytes=GiB))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as info:
            await stub.Release(pb.ReleaseRequest(engine_id="before"))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert [r[0] for r in await held(stub)] == ["before"]
        # A gpu_manager that cannot read its reservations does not start (it would serve
        # an empty ledger and over-commit the GPUs).
        with pytest.raises(ServiceUnavailableError):
            await gpu_manager("n", etcd_endpoints=members.endpoints)

        members.start(0)
        members.wait_healthy()
        for _ in range(100):  # the channel reconnects within its backoff (at most 2 s)
            try:
                await stub.Reserve(pb.ReserveRequest(engine_id="after", memory_per_gpu_bytes=GiB))
                break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE
                await asyncio.sleep(0.1)
        now = await held(stub)
        assert [r[0] for r in now] == ["after", "before"]
        await server.stop(1)
        _, again = await gpu_manager("n", etcd_endpoints=members.endpoints)
        assert await held(again) == now
    finally:
        members.stop()
