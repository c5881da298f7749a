"""The edge in front of two scheduler replicas (real gRPC servers on port 0) over simulator
engines, as its users see it: requests spread over both, none fails when one replica is
stopped hard under load, a stream under way on it continues on the other, and a replica
that comes back is used again. Replicas are listed statically or learned from a real etcd
(their keys written here by hand, as a replica writes its own)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import orjson
import pytest

from sage.common.config.settings import SageSettings
from sage.common.etcd import ClusterKeys, EtcdClient, KeptLease
from sage.common.etcd.testing import EtcdMembers, etcd_binary
from sage.common.grpc import SageServer, create_channel
from sage.common.http.testing import quiet_server, serve_in_task
from sage.engines.sim import expected_text
from sage.rpc.common.v1 import common_pb2
from sage.rpc.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from sage.services.edge import replicas as edge_replicas
from sage.services.edge.app import create_app
from sage.services.scheduler.server import SchedulerApp
from sage.services.scheduler.server import build_scheduler as build_scheduler_app
from sage.services.scheduler.server import build_server as build_scheduler
from tests.conftest import SimFactory

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "tell me about fault tolerance"}]
PREFIX = "/sage-edge-test"
ADMIN_KEY = "sk-admin-edge-replicas-test"


@dataclass
class Replica:
    """One scheduler replica: its server (None while stopped), port and a stub to it."""

    server: SageServer | None
    port: int
    channel: grpc.aio.Channel
    stub: Any

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def status(self) -> scheduler_pb2.GetStatusResponse:
        reply: scheduler_pb2.GetStatusResponse = await self.stub.GetStatus(
            scheduler_pb2.GetStatusRequest(), timeout=5
        )
        return reply


@dataclass
class Plane:
    """An edge over two scheduler replicas, and the engines every replica routes to."""

    settings: SageSettings
    engines: list[str]
    replicas: list[Replica] = field(default_factory=list)
    client: httpx.AsyncClient | None = None
    etcd_endpoints: str = ""  # etcd mode: where the edge learns the replicas

    @property
    def http(self) -> httpx.AsyncClient:
        assert self.client is not None
        return self.client

    async def start_replica(self, port: int = 0) -> Replica:
        """A scheduler replica (on `port`, 0: any) routing to the plane's engines."""
        server, bound = build_scheduler(self.settings, f"127.0.0.1:{port}")
        await server.start()
        channel = create_channel(f"127.0.0.1:{bound}")
        replica = Replica(server, bound, channel, scheduler_pb2_grpc.SchedulerServiceStub(channel))
        for i, url in enumerate(self.engines):
            await replica.stub.RegisterEngine(
                scheduler_pb2.RegisterEngineRequest(
                    engine=common_pb2.Engine(
                        engine_id=f"sim-{i}",
                        model="sim",
                        base_url=url,
                        kind=common_pb2.ENGINE_KIND_LLM,
                    )
                ),
                wait_for_ready=True,  # the port may be in gRPC's reconnect backoff
            )
        return replica

    async def stop_hard(self, replica: Replica) -> None:
        """Stop a replica with no grace: its calls and requests are cut."""
        assert replica.server is not None
        server, replica.server = replica.server, None
        await server.stop(0)

    async def restart(self, replica: Replica) -> None:
        """Start a stopped replica again on its port."""
        fresh = await self.start_replica(replica.port)
        await replica.channel.close(None)
        replica.server, replica.channel, replica.stub = fresh.server, fresh.channel, fresh.stub

    async def served(self) -> list[int]:
        """Requests each live replica has served (-1: stopped)."""
        return [
            (await r.status()).requests_total if r.server is not None else -1 for r in self.replicas
        ]

    async def metric(self, name: str, **labels: str) -> float:
        text = (await self.http.get("/metrics")).text
        want = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
        for line in text.splitlines():
            if line.startswith(name + (want if labels else " ")):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


@pytest.fixture
async def plane(
    settings: SageSettings,
    sim_engine: SimFactory,
    port_factory: Callable[[], int],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Plane]:
    """Two replicas over two engines and an edge over both: statically listed, or (param
    "etcd") learned from a one-member etcd."""
    engines = [sim_engine("--ttft-ms", "10", "--tpot-ms", "10") for _ in range(2)]
    plane = Plane(settings, engines)
    plane.replicas = [await plane.start_replica() for _ in range(2)]
    etcd: EtcdMembers | None = None
    update: dict[str, Any] = {
        "request_timeout_s": settings.request_timeout_s + 10.0,
        "lifecycle_addr": "127.0.0.1:1",
        "admin_api_key": ADMIN_KEY,
    }
    if getattr(request, "param", "static") == "etcd":
        if etcd_binary() is None:
            pytest.skip("etcd is not installed")
        etcd = EtcdMembers(tmp_path / "etcd")
        etcd.start()
        etcd.wait_healthy()
        client = EtcdClient(etcd.endpoints)
        for i, replica in enumerate(plane.replicas):
            await client.put(f"{PREFIX}/schedulers/r{i}", replica.addr.encode())
        await client.close()
        plane.etcd_endpoints = etcd.endpoints
        update |= {"etcd_endpoints": etcd.endpoints, "etcd_prefix": PREFIX}
    else:
        update["scheduler_addrs"] = ",".join(r.addr for r in plane.replicas)
    port = port_factory()
    server = quiet_server(create_app(settings.model_copy(update=update)), port)
    task = await serve_in_task(server)
    plane.client = httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}",
        timeout=60,
        limits=httpx.Limits(max_connections=100, max_keepalive_connections=50),
    )
    try:
        yield plane
    finally:
        await plane.client.aclose()
        server.should_exit = True
        await task
        for replica in plane.replicas:
            if replica.server is not None:
                await replica.server.stop(1)
            await replica.channel.close(None)
        if etcd is not None:
            etcd.stop()


async def _chat(client: httpx.AsyncClient, n: int) -> httpx.Response:
    body = {"model": "sim", "messages": [{"role": "user", "content": f"q{n}"}], "max_tokens": 8}
    return await client.post("/v1/chat/completions", json=body)


async def _until(check: Callable[[], Any], within_s: float = 20.0) -> None:
    """Wait (bounded) until `check()` (awaited) is true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not await check():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("plane", ["static", "etcd"], indirect=True)
async def test_killing_a_replica_under_load_fails_no_request_and_it_is_used_again(
    plane: Plane, no_leaked_children: None
) -> None:
    client = plane.http
    # Both replicas take requests; the scheduler's counters on the edge's /metrics come
    # from one of them, so they only grow.
    seen: list[float] = []
    for n in range(20):
        assert (await _chat(client, n)).status_code == 200
        seen.append(await plane.metric("sage:scheduler_requests_total", status="ok"))
    assert all(count > 0 for count in await plane.served()), await plane.served()
    assert seen == sorted(seen) and seen[-1] > 0, seen

    # 200 requests (every fourth streamed), 16 at a time; one replica is stopped hard
    # after the first 40.
    total, done = 200, 0
    failures: list[Any] = []
    todo = iter(range(total))
    killed = asyncio.Event()

    async def worker() -> None:
        nonlocal done
        for n in todo:
            if n % 4 == 0:
                body = {"model": "sim", "messages": [{"role": "user", "content": f"q{n}"}]}
                events = await _stream(client, "/v1/chat/completions", {**body, "max_tokens": 8})
                text = "".join(
                    c["choices"][0]["delta"].get("content") or ""
                    for c in events[:-1]
                    if c.get("choices")
                )
                if events[-1] != "[DONE]" or text != expected_text(f"q{n}", 8):
                    failures.append(events)
            else:
                resp = await _chat(client, n)
                if resp.status_code != 200 or "choices" not in resp.json():
                    failures.append((resp.status_code, resp.text))
            done += 1
            if done == 40 and not killed.is_set():
                killed.set()
                await plane.stop_hard(plane.replicas[0])

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(16))), 120)
    assert killed.is_set() and done == total
    assert failures == []
    # Requests under way on the stopped replica went to the other one.
    assert await plane.metric("sage:edge_scheduler_failovers_total", kind="unary") >= 1
    assert await plane.metric("sage:edge_scheduler_replicas", state="down") == 1
    # The management status lists both replicas as the edge sees them.
    status = await client.get(
        "/v1/management/status", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert status.status_code == 200, status.text
    listed = status.json()["control_plane"]["scheduler_replicas"]
    assert sorted((r["address"], r["state"]) for r in listed) == sorted(
        [(plane.replicas[0].addr, "down"), (plane.replicas[1].addr, "up")]
    )
    # Status, the model list and tokenize come from the live replica, whichever the edge
    # tries first.
    for _ in range(4):
        assert (await client.get("/health")).json()["status"] == "ok"
        assert [m["id"] for m in (await client.get("/v1/models")).json()["data"]] == ["sim"]
        tokens = await client.post("/tokenize", json={"model": "sim", "prompt": "a b"})
        assert tokens.status_code == 200 and tokens.json()["tokens"], tokens.text

    # Back on its port, it is probed, marked up and takes requests again.
    await plane.restart(plane.replicas[0])

    async def used_again() -> bool:
        for n in range(4):
            assert (await _chat(client, n)).status_code == 200
        return (await plane.replicas[0].status()).requests_total > 0

    await _until(used_again)
    assert await plane.metric("sage:edge_scheduler_replicas", state="up") == 2


async def _stream(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], on_chunk: Any = None
) -> list[Any]:
    """POST a streamed request; every SSE data payload, parsed ([DONE] as the string)."""
    events: list[Any] = []
    async with client.stream("POST", path, json={**body, "stream": True}) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                data = line[6:]
                events.append("[DONE]" if data == "[DONE]" else orjson.loads(data))
                if on_chunk is not None:
                    await on_chunk(events)
    return events


async def _stop_busy(plane: Plane) -> Replica:
    """Stop hard the replica that is serving a request right now."""
    for replica in plane.replicas:
        if replica.server is not None and (await replica.status()).in_flight > 0:
            await plane.stop_hard(replica)
            return replica
    raise AssertionError("no replica was serving the stream")


@pytest.mark.parametrize("first_leg", ["kept", "accounted"])
async def test_stream_under_way_on_a_killed_replica_continues_on_the_other(
    plane: Plane, first_leg: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if first_leg == "accounted":  # as for a long reply: accounted chunk by chunk
        monkeypatch.setattr(edge_replicas, "RETAIN_BATCHES", 1)
    stopped: list[Replica] = []

    async def stop_after_five(events: list[Any]) -> None:
        if len(events) == 6 and not stopped:  # role chunk + 5 tokens
            stopped.append(await _stop_busy(plane))

    body = {"model": "sim", "messages": MESSAGES, "max_tokens": 30}
    events = await _stream(plane.http, "/v1/chat/completions", body, stop_after_five)

    assert stopped, "the stream ended before its replica could be stopped"
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all("error" not in c for c in chunks), chunks
    # One stream to the client: one id, one role chunk, the reply an unbroken stream gives.
    assert len({c["id"] for c in chunks}) == 1
    assert sum("role" in c["choices"][0]["delta"] for c in chunks) == 1
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == expected_text("tell me about fault tolerance", 30)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert await plane.metric("sage:edge_scheduler_failovers_total", kind="stream") == 1


async def test_completion_stream_keeps_its_token_budget_across_replicas(plane: Plane) -> None:
    stopped: list[Replica] = []

    async def stop_after_four(events: list[Any]) -> None:
        if len(events) == 4 and not stopped:
            stopped.append(await _stop_busy(plane))

    body = {"model": "sim", "prompt": "once upon a time", "max_tokens": 20}
    events = await _stream(plane.http, "/v1/completions", body, stop_after_four)

    assert stopped and events[-1] == "[DONE]"
    chunks = [c for c in events[:-1] if c["choices"]]
    assert len({c["id"] for c in chunks}) == 1
    pieces = [c["choices"][0]["text"] for c in chunks if c["choices"][0]["text"]]
    # The continuation was asked for what was left of max_tokens, not for 20 more.
    assert len(pieces) == 20
    assert expected_text("once upon a time", 20).startswith("".join(pieces[:4]))


async def test_a_stream_that_cannot_be_continued_ends_with_an_error_event(
    plane: Plane,
) -> None:
    stopped: list[Replica] = []

    async def stop_after_eight(events: list[Any]) -> None:
        if len(events) == 8 and not stopped:
            stopped.append(await _stop_busy(plane))

    # A Responses event stream is not continued elsewhere (nor by the scheduler).
    body = {"model": "sim", "input": "tell me about fault tolerance", "max_output_tokens": 30}
    events = await _stream(plane.http, "/v1/responses", body, stop_after_eight)

    assert stopped
    # The client reads the events it was sent, then the API's own error event, no more.
    assert events[-1]["type"] == "error", events[-1]
    assert events[-1]["message"]
    assert all(e["type"] != "error" for e in events[:-1])
    assert await plane.metric("sage:edge_scheduler_failovers_total", kind="stream") == 0


@pytest.mark.parametrize("plane", ["etcd"], indirect=True)
async def test_replicas_follow_their_etcd_keys(plane: Plane) -> None:
    """A replica whose key goes (its lease ended) gets no more requests; back, it does."""
    client = EtcdClient(plane.etcd_endpoints)
    try:
        await client.delete(f"{PREFIX}/schedulers/r1")
        await asyncio.sleep(0.5)
        before = (await plane.replicas[1].status()).requests_total
        for n in range(10):
            assert (await _chat(plane.http, n)).status_code == 200
        assert (await plane.replicas[1].status()).requests_total == before
        assert await plane.metric("sage:edge_scheduler_replicas", state="up") == 1

        await client.put(f"{PREFIX}/schedulers/r1", plane.replicas[1].addr.encode())

        async def used_again() -> bool:
            for n in range(4):
                assert (await _chat(plane.http, n)).status_code == 200
            return (await plane.replicas[1].status()).requests_total > before

        await _until(used_again)
    finally:
        await client.close()


@pytest.mark.parametrize("plane", ["etcd"], indirect=True)
async def test_a_stream_on_a_replica_whose_key_went_moves_after_the_grace(plane: Plane) -> None:
    """A replica cut off from etcd (its key gone, the process still serving) keeps its
    streams for the grace (5 s), then they continue on another replica rather than wait
    out their deadline on a replica the cluster no longer counts."""
    client = EtcdClient(plane.etcd_endpoints)
    retired: list[int] = []

    async def retire_after_five(events: list[Any]) -> None:
        if len(events) == 6 and not retired:
            for i, replica in enumerate(plane.replicas):
                if (await replica.status()).in_flight > 0:
                    await client.delete(f"{PREFIX}/schedulers/r{i}")
                    retired.append(i)
                    return

    try:
        body = {"model": "sim", "messages": MESSAGES, "max_tokens": 800}
        events = await _stream(plane.http, "/v1/chat/completions", body, retire_after_five)
    finally:
        await client.close()

    assert retired, "no replica was serving the stream"
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all("error" not in c for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == expected_text("tell me about fault tolerance", 800)
    assert await plane.metric("sage:edge_scheduler_failovers_total", kind="stream") == 1
    # The retired replica is alive; it finished nothing of this stream.
    assert (await plane.replicas[retired[0]].status()).in_flight == 0


async def test_edge_over_etcd_mode_schedulers_survives_a_crashed_replica(
    no_leaked_children: None,
    settings: SageSettings,
    sim_engine: SimFactory,
    port_factory: Callable[[], int],
    tmp_path: Path,
) -> None:
    """The whole etcd mode: two scheduler replicas register themselves in etcd and learn
    the engines a node agent published there; the edge learns the replicas from etcd. One
    replica crashes under load (its lease left to expire): no request fails, the edge drops
    it once its key expires and takes up a replica started afterwards."""
    if etcd_binary() is None:
        pytest.skip("etcd is not installed")
    etcd = EtcdMembers(tmp_path / "etcd")
    etcd.start()
    etcd.wait_healthy()
    keys = ClusterKeys()
    client = EtcdClient(etcd.endpoints)
    agent = KeptLease(client, 2, name="agent-n1")
    await agent.start()
    cluster = settings.model_copy(
        update={
            "etcd_endpoints": etcd.endpoints,
            "etcd_lease_ttl_s": 2,
            "lifecycle_addr": "127.0.0.1:1",
        }
    )
    apps: list[SchedulerApp] = []
    channels: list[grpc.aio.Channel] = []
    edge_task: asyncio.Task[None] | None = None
    server: Any = None
    http: httpx.AsyncClient | None = None

    async def start_scheduler() -> Any:
        home = tmp_path / f"s{len(apps)}"
        app = build_scheduler_app(cluster.model_copy(update={"home": home}), "127.0.0.1:0")
        await app.server.start()
        apps.append(app)
        channel = create_channel(f"127.0.0.1:{app.port}")
        channels.append(channel)
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)

        async def synced() -> bool:
            return bool((await stub.GetStatus(scheduler_pb2.GetStatusRequest())).synced)

        await _until(synced)
        return stub

    try:
        urls = [
            await asyncio.to_thread(sim_engine, "--ttft-ms", "10", "--tpot-ms", "10")
            for _ in range(2)
        ]
        report = common_pb2.NodeReport(
            node_id="n1", lifecycle_addr="127.0.0.1:1", engine_ids=["e0", "e1"]
        )
        await agent.put(keys.node("n1"), report.SerializeToString())
        for i, url in enumerate(urls):
            engine = common_pb2.Engine(
                engine_id=f"e{i}",
                model="sim",
                kind=common_pb2.ENGINE_KIND_LLM,
                base_url=url,
                state=common_pb2.ENGINE_STATE_READY,
                backend="sim",
                node_id="n1",
            )
            await agent.put(keys.engine(f"e{i}"), engine.SerializeToString())
        stubs = [await start_scheduler() for _ in range(2)]

        port = port_factory()
        edge_settings = cluster.model_copy(
            update={"request_timeout_s": settings.request_timeout_s + 10.0}
        )
        server = quiet_server(create_app(edge_settings), port)
        edge_task = await serve_in_task(server)
        http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60)
        plane = Plane(settings, urls, client=http)

        async def replicas_up(n: int) -> bool:
            return await plane.metric("sage:edge_scheduler_replicas", state="up") == n

        await _until(lambda: replicas_up(2))

        async def ready() -> bool:
            for stub in stubs:
                listed = await stub.ListEngines(scheduler_pb2.ListEnginesRequest())
                if len(listed.engines) != 2:
                    return False
            return True

        await _until(ready)

        total, done = 120, 0
        failures: list[Any] = []
        todo = iter(range(total))

        async def worker() -> None:
            nonlocal done
            for n in todo:
                if n % 4 == 0:
                    body = {"model": "sim", "messages": [{"role": "user", "content": f"q{n}"}]}
                    events = await _stream(http, "/v1/chat/completions", {**body, "max_tokens": 8})
                    text = "".join(
                        c["choices"][0]["delta"].get("content") or ""
                        for c in events[:-1]
                        if c.get("choices")
                    )
                    if events[-1] != "[DONE]" or text != expected_text(f"q{n}", 8):
                        failures.append(events)
                else:
                    resp = await _chat(http, n)
                    if resp.status_code != 200:
                        failures.append((resp.status_code, resp.text))
                done += 1
                if done == 30:
                    crashed = apps[0]
                    assert crashed.replica is not None
                    await crashed.replica.aclose(revoke=False)  # its keys expire, as in a crash
                    await crashed.server.stop(0)

        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(12))), 120)
        assert done == total and failures == []

        # Its key expires with its lease: the edge lists one replica, then a new one.
        async def listed_only_the_live_one() -> bool:
            down = await plane.metric("sage:edge_scheduler_replicas", state="down")
            return down == 0 and await replicas_up(1)

        await _until(listed_only_the_live_one)
        fresh = await start_scheduler()
        await _until(lambda: replicas_up(2))

        async def used() -> bool:
            for n in range(4):
                assert (await _chat(http, n)).status_code == 200
            status = await fresh.GetStatus(scheduler_pb2.GetStatusRequest())
            return bool(status.requests_total > 0)

        await _until(used)
    finally:
        if http is not None:
            await http.aclose()
        if server is not None and edge_task is not None:
            server.should_exit = True
            await edge_task
        for app in apps:
            await app.server.stop(0)
        for channel in channels:
            await channel.close(None)
        await agent.close()
        await client.close()
        etcd.stop()


async def test_a_schedulers_own_error_is_not_sent_to_another_replica(plane: Plane) -> None:
    """Only a broken call moves a request: an answer the scheduler gave (here a 404 for
    an unknown model) is the client's, from the one replica that gave it."""
    before = [(await r.status()).requests_total for r in plane.replicas]
    resp = await plane.http.post(
        "/v1/chat/completions",
        json={"model": "no-such-model", "messages": MESSAGES, "max_tokens": 4},
    )
    assert resp.status_code == 404, resp.text
    after = [(await r.status()).requests_total for r in plane.replicas]
    assert sum(after) - sum(before) <= 1
    assert await plane.metric("sage:edge_scheduler_replicas", state="up") == 2
    assert await plane.metric("sage:edge_scheduler_failovers_total", kind="unary") == 0
