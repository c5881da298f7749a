"""Lifecycle as a node agent in etcd mode (SAGE_ETCD_ENDPOINTS), against a real etcd member:
its node report and its ready engines live under its lease (gone at once on a clean exit,
after the TTL on a kill -9), its engine registry lives in etcd instead of engines.json, a
restarted lifecycle re-adopts its engines from there, and an etcd that is down at start
delays registration without failing lifecycle. Lifecycle runs as a real gRPC server (in
the test's loop, or as a child process where it is killed) with sim engines."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sage.common.config.settings import SageSettings
from sage.common.etcd import ClusterKeys, EtcdClient
from sage.common.etcd.testing import EtcdMembers, etcd_binary
from sage.common.exceptions import ServiceUnavailableError
from sage.common.grpc import SageServer, create_channel, process_token
from sage.common.utils.processes import free_port, stop_process
from sage.rpc.common.v1 import common_pb2
from sage.rpc.lifecycle.v1 import lifecycle_pb2 as pb
from sage.rpc.lifecycle.v1 import lifecycle_pb2_grpc as pb_grpc
from sage.services.lifecycle.server import build_server

pytestmark = pytest.mark.skipif(
    etcd_binary() is None, reason="etcd is not installed (scripts/install_system_tools.sh)"
)

NODE = "node-t"
TTL_S = 2
HEARTBEAT_S = 0.2
_prefixes = itertools.count()


@pytest.fixture
def keys() -> ClusterKeys:
    return ClusterKeys(f"/lc{os.getpid()}-{next(_prefixes)}")


def node_settings(settings: SageSettings, endpoints: str, keys: ClusterKeys, **extra: Any) -> Any:
    """A node agent's settings: no gpu_manager or scheduler anywhere (etcd is all it needs)."""
    return settings.model_copy(
        update={
            "etcd_endpoints": endpoints,
            "etcd_prefix": keys.prefix,
            "etcd_lease_ttl_s": TTL_S,
            "node_id": NODE,
            "node_heartbeat_s": HEARTBEAT_S,
            "gpu_manager_addr": "127.0.0.1:1",
            "scheduler_addr": "127.0.0.1:1",
            "lifecycle_stop_engines_on_exit": False,
            **extra,
        }
    )


class Etcd:
    """Reads the test's keys with a client of its own."""

    def __init__(self, endpoints: str, keys: ClusterKeys) -> None:
        self.client = EtcdClient(endpoints)
        self.keys = keys

    async def engines(self) -> dict[str, common_pb2.Engine]:
        kvs, _ = await self.client.get_prefix(self.keys.engines)
        out = {}
        for kv in kvs:
            engine = common_pb2.Engine()
            engine.ParseFromString(kv.value)
            out[kv.key.decode().removeprefix(self.keys.engines)] = engine
        return out

    async def node(self) -> common_pb2.NodeReport | None:
        kv = await self.client.get(self.keys.node(NODE))
        if kv is None:
            return None
        report = common_pb2.NodeReport()
        report.ParseFromString(kv.value)
        return report

    async def registry(self) -> dict[str, dict[str, Any]]:
        prefix = self.keys.lifecycle_engines(NODE)
        kvs, _ = await self.client.get_prefix(prefix)
        return {kv.key.decode().removeprefix(prefix): json.loads(kv.value) for kv in kvs}

    async def until(
        self, what: Callable[[], Awaitable[Any]], ok: Callable[[Any], bool], within_s: float
    ) -> Any:
        """`what()` once `ok` holds for it (AssertionError with the last value after
        `within_s`); etcd not answering yet counts as not ok."""
        deadline = time.monotonic() + within_s
        value: Any = None
        while True:
            try:
                value = await what()
                if ok(value):
                    return value
            except ServiceUnavailableError as exc:  # a member still coming up
                value = exc
            if time.monotonic() > deadline:
                raise AssertionError(f"condition never met; last: {value}")
            await asyncio.sleep(0.05)


@pytest.fixture
async def etcd_view(etcd: EtcdMembers, keys: ClusterKeys) -> AsyncIterator[Etcd]:
    view = Etcd(etcd.endpoints, keys)
    yield view
    await view.client.close()


@pytest.fixture
async def lifecycles() -> AsyncIterator[Callable[[SageSettings], Awaitable[Any]]]:
    """Starts in-process lifecycle servers; stops what is left (and kills their engines)."""
    started: list[tuple[SageServer, grpc.aio.Channel]] = []
    pids: set[int] = set()

    async def start(settings: SageSettings) -> Any:
        server, port = build_server(settings, "127.0.0.1:0")
        await server.start()
        channel = create_channel(f"127.0.0.1:{port}")
        started.append((server, channel))
        stub = pb_grpc.LifecycleServiceStub(channel)
        stub.server = server  # type: ignore[attr-defined]
        stub.port = port  # type: ignore[attr-defined]
        stub.pids = pids  # type: ignore[attr-defined]
        return stub

    yield start
    for server, channel in started:
        await channel.close(None)
        await server.stop(1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


async def start_sim(stub: Any, model: str = "sim") -> common_pb2.Engine:
    reply = await stub.StartEngine(pb.StartEngineRequest(model=model, backend="sim"), timeout=60)
    stub.pids.add(reply.engine.pid)
    engine: common_pb2.Engine = reply.engine
    return engine


async def test_ready_engines_and_the_node_are_in_etcd_and_go_when_stopped(
    settings: SageSettings,
    etcd: EtcdMembers,
    keys: ClusterKeys,
    etcd_view: Etcd,
    lifecycles: Callable[[SageSettings], Awaitable[Any]],
) -> None:
    # A long TTL: keys that go right after the clean exit were revoked, not expired.
    wired = node_settings(settings, etcd.endpoints, keys, etcd_lease_ttl_s=60)
    stub = await lifecycles(wired)
    node = await etcd_view.until(etcd_view.node, lambda n: n is not None, 10)
    assert node.node_id == NODE and list(node.engine_ids) == []
    assert node.lifecycle_addr == f"127.0.0.1:{stub.port}"

    engine = await start_sim(stub)
    routable = await etcd_view.engines()
    # Registered before StartEngine answered, as RegisterEngine is today.
    assert list(routable) == [engine.engine_id]
    published = routable[engine.engine_id]
    assert published.model == "sim" and published.node_id == NODE
    assert published.state == common_pb2.ENGINE_STATE_READY
    assert published.base_url == engine.base_url and published.pid == engine.pid
    # The node report follows at its next check.
    await etcd_view.until(etcd_view.node, lambda n: list(n.engine_ids) == [engine.engine_id], 10)
    record = (await etcd_view.registry())[engine.engine_id]
    assert record["state"] == "ready" and record["pid"] == engine.pid

    other = await start_sim(stub, "sim-b")
    assert set(await etcd_view.engines()) == {engine.engine_id, other.engine_id}

    await stub.StopEngine(pb.StopEngineRequest(engine_id=engine.engine_id), timeout=30)
    assert list(await etcd_view.engines()) == [other.engine_id]
    await etcd_view.until(etcd_view.node, lambda n: list(n.engine_ids) == [other.engine_id], 10)
    stopped = await etcd_view.until(
        etcd_view.registry, lambda r: r[engine.engine_id]["state"] == "stopped", 10
    )
    assert stopped[other.engine_id]["state"] == "ready"
    # etcd is the registry in this mode: no JSON file next to it.
    assert not (wired.llm_state_dir / "engines.json").exists()

    # A clean exit revokes the lease: node and engines leave routing at once; the
    # registry (no lease) stays for the next lifecycle.
    await stub.server.stop(1)
    assert await etcd_view.node() is None
    assert await etcd_view.engines() == {}
    assert set(await etcd_view.registry()) == {engine.engine_id, other.engine_id}


async def test_a_lost_lease_is_replaced_and_the_keys_written_again(
    settings: SageSettings,
    etcd: EtcdMembers,
    keys: ClusterKeys,
    etcd_view: Etcd,
    lifecycles: Callable[[SageSettings], Awaitable[Any]],
) -> None:
    """What a partition longer than the TTL does to a live agent: etcd drops its keys;
    once etcd answers again, the same node and engines are back, once each."""
    stub = await lifecycles(node_settings(settings, etcd.endpoints, keys))
    engine = await start_sim(stub)
    held = await etcd_view.client.get(keys.engine(engine.engine_id))
    assert held is not None and held.lease
    await etcd_view.client.revoke(held.lease)  # as if it had expired
    assert await etcd_view.engines() == {} and await etcd_view.node() is None

    back = await etcd_view.until(etcd_view.engines, lambda e: bool(e), 3 * TTL_S)
    assert list(back) == [engine.engine_id]
    node_kv = await etcd_view.until(
        lambda: etcd_view.client.get(keys.node(NODE)), lambda kv: kv is not None, 3 * TTL_S
    )
    again = await etcd_view.client.get(keys.engine(engine.engine_id))
    assert again is not None and again.lease == node_kv.lease != held.lease


async def test_restarted_lifecycle_readopts_its_engines_from_etcd(
    settings: SageSettings,
    etcd: EtcdMembers,
    keys: ClusterKeys,
    etcd_view: Etcd,
    lifecycles: Callable[[SageSettings], Awaitable[Any]],
) -> None:
    wired = node_settings(settings, etcd.endpoints, keys)
    first = await lifecycles(wired)
    alive = await start_sim(first)
    doomed = await start_sim(first, "sim-b")
    await first.server.stop(1)  # engines outlive it (lifecycle_stop_engines_on_exit off)
    os.killpg(doomed.pid, signal.SIGKILL)  # dies while no lifecycle watches

    second = await lifecycles(wired)
    listed = {
        e.engine_id: e
        for e in (await second.ListEngines(pb.ListEnginesRequest(), timeout=10)).engines
    }
    assert listed[alive.engine_id].state == common_pb2.ENGINE_STATE_READY
    assert listed[alive.engine_id].pid == alive.pid
    assert listed[doomed.engine_id].state == common_pb2.ENGINE_STATE_FAILED
    routable = await etcd_view.until(etcd_view.engines, lambda e: bool(e), 10)
    assert list(routable) == [alive.engine_id] and routable[alive.engine_id].pid == alive.pid
    registry = await etcd_view.until(
        etcd_view.registry, lambda r: r[doomed.engine_id]["state"] == "failed", 10
    )
    assert registry[alive.engine_id]["state"] == "ready"
    assert not (wired.llm_state_dir / "engines.json").exists()

    # The re-adopted engine is this lifecycle's to stop.
    await second.StopEngine(pb.StopEngineRequest(engine_id=alive.engine_id), timeout=30)
    assert await etcd_view.engines() == {}
    assert not psutil.pid_exists(alive.pid) or (
        psutil.Process(alive.pid).status() == psutil.STATUS_ZOMBIE
    )


async def test_one_machine_mode_keeps_the_json_registry(
    settings: SageSettings, lifecycles: Callable[[SageSettings], Awaitable[Any]]
) -> None:
    wired = settings.model_copy(
        update={"gpu_manager_addr": "127.0.0.1:1", "scheduler_addr": "127.0.0.1:1"}
    )
    assert not wired.cluster.etcd_mode
    stub = await lifecycles(wired)
    engine = await start_sim(stub)
    doc = json.loads((wired.llm_state_dir / "engines.json").read_text())
    assert [(e["engine_id"], e["state"]) for e in doc["engines"]] == [(engine.engine_id, "ready")]


async def test_engines_appear_once_an_etcd_down_at_start_comes_up(
    settings: SageSettings,
    tmp_path: Path,
    keys: ClusterKeys,
    lifecycles: Callable[[SageSettings], Awaitable[Any]],
) -> None:
    late = EtcdMembers(tmp_path / "late-etcd", hosts=["127.0.0.1"])
    wired = node_settings(settings, late.endpoints, keys, rpc_timeout_s=1.0)
    stub = await lifecycles(wired)  # serves although etcd does not answer
    try:
        engine = await start_sim(stub)
        assert engine.state == common_pb2.ENGINE_STATE_READY

        late.start()
        late.wait_healthy()
        view = Etcd(late.endpoints, keys)
        try:
            routable = await view.until(view.engines, lambda e: bool(e), 30)
            assert list(routable) == [engine.engine_id]
            await view.until(
                view.node, lambda n: n is not None and engine.engine_id in n.engine_ids, 30
            )
            registry = await view.until(view.registry, lambda r: bool(r), 30)
            assert registry[engine.engine_id]["state"] == "ready"
        finally:
            await view.client.close()
        assert not (wired.llm_state_dir / "engines.json").exists()
    finally:
        await stub.server.stop(1)  # before etcd goes, so its lease is revoked
        late.stop()


# -- a lifecycle process killed with SIGKILL --------------------------------------------


class LifecycleProcess:
    """`python -m sage.services.lifecycle` in etcd mode, as a node runs it; `kill()` is a
    real SIGKILL, `start()` a restart on the same port, state and node id."""

    def __init__(self, endpoints: str, keys: ClusterKeys, home: Path, ttl_s: int) -> None:
        self.port = free_port()
        self.home = home
        self.env = {
            **os.environ,
            "SAGE_HOME": str(home),
            "SAGE_INTERNAL_TOKEN": process_token(),
            "SAGE_ETCD_ENDPOINTS": endpoints,
            "SAGE_ETCD_PREFIX": keys.prefix,
            "SAGE_ETCD_LEASE_TTL_S": str(ttl_s),
            "SAGE_NODE_ID": NODE,
            "SAGE_NODE_HEARTBEAT_S": str(HEARTBEAT_S),
            "SAGE_GPU_MANAGER_ADDR": "127.0.0.1:1",
            "SAGE_SCHEDULER_ADDR": "127.0.0.1:1",
            "SAGE_DISABLE_NVML": "1",
            "SAGE_HOST": "127.0.0.1",
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel = create_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.LifecycleServiceStub(self.channel)
        self.engine_pids: set[int] = set()

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.home / "lifecycle.log", "ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "sage.services.lifecycle", "--port", str(self.port)],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    async def start(self) -> None:
        """Start it and wait until it serves."""
        home = self.home
        self.proc = self._spawn()
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (home / "lifecycle.log").read_text()[-2000:]
            with contextlib.suppress(grpc.RpcError):
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.1)
        raise AssertionError("lifecycle never served")

    async def start_sim(self, model: str = "sim") -> common_pb2.Engine:
        reply = await self.stub.StartEngine(
            pb.StartEngineRequest(model=model, backend="sim"), timeout=60
        )
        self.engine_pids.add(reply.engine.pid)
        engine: common_pb2.Engine = reply.engine
        return engine

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    async def close(self) -> None:
        await self.channel.close(None)
        if self.proc is not None:
            stop_process(self.proc, timeout=10)
        for pid in self.engine_pids:  # engines outlive a killed lifecycle
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


@pytest.fixture
async def lifecycle_process(
    etcd: EtcdMembers, keys: ClusterKeys, tmp_path: Path
) -> AsyncIterator[Callable[[int], LifecycleProcess]]:
    made: list[LifecycleProcess] = []

    def make(ttl_s: int) -> LifecycleProcess:
        made.append(LifecycleProcess(etcd.endpoints, keys, tmp_path / "node", ttl_s))
        return made[-1]

    yield make
    for node in made:
        await node.close()


async def test_a_killed_agent_leaves_routing_within_the_ttl_and_its_engines_come_back(
    etcd_view: Etcd, lifecycle_process: Callable[[int], LifecycleProcess]
) -> None:
    node = lifecycle_process(TTL_S)
    await node.start()
    engine = await node.start_sim()
    assert list(await etcd_view.engines()) == [engine.engine_id]
    await etcd_view.until(etcd_view.node, lambda n: list(n.engine_ids) == [engine.engine_id], 10)

    node.kill()
    killed = time.monotonic()
    # No revoke: the keys live until the lease runs out, then leave together.
    await etcd_view.until(etcd_view.engines, lambda e: e == {}, TTL_S + 3)
    assert await etcd_view.node() is None
    gone_after_s = time.monotonic() - killed
    assert gone_after_s <= TTL_S + 3, gone_after_s
    assert psutil.pid_exists(engine.pid)  # the engine itself runs on
    assert (await etcd_view.registry())[engine.engine_id]["state"] == "ready"

    await node.start()
    routable = await etcd_view.until(etcd_view.engines, lambda e: bool(e), 10)
    assert list(routable) == [engine.engine_id] and routable[engine.engine_id].pid == engine.pid
    await etcd_view.until(etcd_view.node, lambda n: list(n.engine_ids) == [engine.engine_id], 10)
    got = await node.stub.GetEngine(pb.GetEngineRequest(engine_id=engine.engine_id), timeout=10)
    assert got.engine.state == common_pb2.ENGINE_STATE_READY
    assert not (node.home / "llm" / "engines.json").exists()

    await node.stub.StopEngine(pb.StopEngineRequest(engine_id=engine.engine_id), timeout=30)
    assert await etcd_view.engines() == {}


async def test_a_quick_restart_takes_over_the_old_keys_and_drops_a_dead_engines(
    etcd_view: Etcd, lifecycle_process: Callable[[int], LifecycleProcess]
) -> None:
    """Back before the crashed process's lease ran out: the live engine moves to the new
    lease (it stays when the old one expires), the engine that died meanwhile leaves at
    once instead of being routed to until the old lease expires."""
    node = lifecycle_process(60)  # the old lease outlives the whole test
    await node.start()
    alive = await node.start_sim()
    dead = await node.start_sim("sim-b")
    before = await etcd_view.client.get(etcd_view.keys.engine(alive.engine_id))
    assert before is not None
    node.kill()
    os.killpg(dead.pid, signal.SIGKILL)

    await node.start()
    routable = await etcd_view.until(etcd_view.engines, lambda e: list(e) == [alive.engine_id], 10)
    assert routable[alive.engine_id].pid == alive.pid
    after = await etcd_view.client.get(etcd_view.keys.engine(alive.engine_id))
    node_kv = await etcd_view.client.get(etcd_view.keys.node(NODE))
    assert after is not None and node_kv is not None
    assert after.lease == node_kv.lease != before.lease
    await etcd_view.client.revoke(before.lease)  # the old lease ends: nothing of ours goes
    assert list(await etcd_view.engines()) == [alive.engine_id]
    assert await etcd_view.node() is not None
    assert (await etcd_view.registry())[dead.engine_id]["state"] == "failed"


async def test_a_drained_stop_shows_the_engine_draining_before_its_key_goes(
    settings: SageSettings,
    etcd: EtcdMembers,
    keys: ClusterKeys,
    etcd_view: Etcd,
    lifecycles: Callable[[SageSettings], Awaitable[Any]],
) -> None:
    """Schedulers must stop sending new work before the engine is counted down and
    killed: the key turns DRAINING first, and only then goes."""
    stub = await lifecycles(node_settings(settings, etcd.endpoints, keys, etcd_lease_ttl_s=60))
    engine = await start_sim(stub)
    _, revision = await etcd_view.client.get_prefix(keys.engines)
    seen: list[tuple[str, int]] = []

    async def follow() -> None:
        async for batch in etcd_view.client.watch_prefix(
            keys.engine(engine.engine_id), start_revision=revision + 1
        ):
            for event in batch:
                if event.deleted:
                    seen.append(("delete", 0))
                    return
                seen.append(("put", common_pb2.Engine.FromString(event.value).state))

    watcher = asyncio.create_task(follow())
    await stub.StopEngine(
        pb.StopEngineRequest(engine_id=engine.engine_id, drain=True, drain_timeout_s=10),
        timeout=30,
    )
    await asyncio.wait_for(watcher, 10)
    assert seen == [("put", common_pb2.ENGINE_STATE_DRAINING), ("delete", 0)]
