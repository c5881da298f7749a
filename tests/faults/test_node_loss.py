"""A node lost with requests under way on its engines (issue 21), through a real scheduler
and edge in front of sim engines run as child processes. The lost node's engine is stopped
with SIGSTOP: its sockets stay open and answer nothing, as a partitioned host's do. Once
the scheduler finds the node lost (heartbeats stop, or its etcd lease expires) the calls
waiting there are cut: non-streamed requests finish on the other engine and a stream under
way continues there, instead of hanging until the request timeout and failing. An
operator's drain, or an engine leaving routing on its own, cuts nothing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest

from sage.common.config.settings import SageSettings
from sage.common.etcd import ClusterKeys, EtcdClient, KeptLease
from sage.common.etcd.testing import EtcdMembers
from sage.engines.sim import expected_text
from sage.rpc.common.v1 import common_pb2
from sage.rpc.scheduler.v1 import scheduler_pb2
from sage.services.embedding.server import build_server as build_embedding
from tests.conftest import SimFactory
from tests.faults.conftest import Plane, PlaneFactory

PROMPT = "tell me about network partitions"
# Far above what a request takes here: a request cut only by it would fail the test.
REQUEST_TIMEOUT_S = 20.0
UNARY = 8  # non-streamed requests sent while the lost engine holds the stream


def _proc(sims: SimFactory, base_url: str) -> subprocess.Popen[bytes]:
    """The simulator process serving `base_url`."""
    port = base_url.rsplit(":", 1)[1]
    procs: list[subprocess.Popen[bytes]] = sims.procs  # type: ignore[attr-defined]
    for proc in procs:
        args = [str(a) for a in proc.args] if isinstance(proc.args, list) else []
        if args[args.index("--port") + 1] == port:
            return proc
    raise AssertionError(f"no simulator serves {base_url}")


@contextlib.contextmanager
def _resumed_at_exit(procs: list[subprocess.Popen[bytes]]) -> Iterator[None]:
    """SIGCONT what the test stopped, so the fixture's SIGTERM can end it."""
    try:
        yield
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)


async def _running(base_url: str) -> float:
    async with httpx.AsyncClient(trust_env=False) as client:
        text = (await client.get(base_url + "/metrics")).text
    found = re.search(r"^vllm:num_requests_running\{[^}]*\} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


async def _until(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:g}s")
        await asyncio.sleep(0.05)


def _chat(max_tokens: int, content: str = PROMPT) -> dict[str, Any]:
    return {
        "model": "sim",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
    }


async def _loses_a_node_under_load(
    plane: Plane,
    sims: SimFactory,
    urls: list[str],
    engine_ids: list[str],
    lose: Callable[[int], Awaitable[None]],
) -> None:
    """A stream starts; once it has sent 5 tokens its engine is stopped (SIGSTOP) and
    UNARY chats are sent, some of them to that engine; once they wait there, `lose(i)`
    makes the engine's node lost. Every chat must answer 200 with its whole reply, the
    stream must end as the unbroken reply would, and the failovers must be counted."""
    stopped: list[int] = []
    cut = asyncio.Event()
    unary: list[asyncio.Task[httpx.Response]] = []

    async def on_event(events: list[Any]) -> None:
        if len(events) != 6 or stopped:  # role chunk + 5 tokens
            return
        for i, url in enumerate(urls):
            if await _running(url) > 0:
                _proc(sims, url).send_signal(signal.SIGSTOP)
                stopped.append(i)
                break
        assert stopped, "no engine was generating the stream"
        for n in range(UNARY):
            unary.append(
                asyncio.create_task(
                    plane.client.post("/v1/chat/completions", json=_chat(6, f"request {n}"))
                )
            )
        cut.set()

    async def stream() -> list[Any]:
        events: list[Any] = []
        body = {**_chat(30), "stream": True}
        async with plane.client.stream("POST", "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    data = line[6:]
                    events.append("[DONE]" if data == "[DONE]" else orjson.loads(data))
                    await on_event(events)
        return events

    streamed = asyncio.create_task(stream())
    with _resumed_at_exit([_proc(sims, url) for url in urls]):
        await asyncio.wait_for(cut.wait(), 30)
        lost = stopped[0]

        async def waiting_there() -> bool:  # the stream and at least one chat
            return await plane.metric("sage:engine_in_flight", engine=engine_ids[lost]) >= 2

        await _until(waiting_there, 10, "chats waiting on the stopped engine")
        await lose(lost)
        done = await asyncio.wait_for(asyncio.gather(streamed, *unary), REQUEST_TIMEOUT_S - 5)

    events, replies = done[0], done[1:]
    assert [r.status_code for r in replies] == [200] * UNARY, [r.text for r in replies]
    for n, reply in enumerate(replies):
        content = reply.json()["choices"][0]["message"]["content"]
        assert content == expected_text(f"request {n}", 6)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all("error" not in c for c in chunks), chunks
    assert len({c["id"] for c in chunks}) == 1
    assert sum("role" in c["choices"][0]["delta"] for c in chunks) == 1
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == expected_text(PROMPT, 30)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert await plane.metric("sage:scheduler_failovers_total", kind="stream") == 1
    assert await plane.metric("sage:scheduler_failovers_total", kind="unary") >= 1
    assert await plane.metric("sage:scheduler_requests_total", status="error") == 0


def _node_report(node_id: str, *engine_ids: str) -> common_pb2.NodeReport:
    return common_pb2.NodeReport(
        node_id=node_id,
        lifecycle_addr="127.0.0.1:1",
        engine_ids=list(engine_ids),
        agent_instance=f"agent-{node_id}",
    )


def _engine(
    engine_id: str,
    base_url: str,
    node_id: str,
    state: common_pb2.EngineState.ValueType,
    kind: common_pb2.EngineKind.ValueType = common_pb2.ENGINE_KIND_LLM,
) -> common_pb2.Engine:
    return common_pb2.Engine(
        engine_id=engine_id,
        model="sim",
        kind=kind,
        base_url=base_url,
        state=state,
        backend="sim",
        node_id=node_id,
    )


def _grpc_settings(settings: SageSettings) -> dict[str, Any]:
    return {
        "request_timeout_s": REQUEST_TIMEOUT_S,
        "cluster": settings.cluster.model_copy(update={"heartbeat_s": 0.1, "timeout_s": 1.0}),
    }


async def test_node_missing_heartbeats_has_its_calls_failed_over_and_its_stream_resumed(
    plane_factory: PlaneFactory, sim_engine: SimFactory, settings: SageSettings
) -> None:
    plane = await plane_factory(**_grpc_settings(settings))
    urls = [sim_engine("--tpot-ms", "40") for _ in range(2)]
    ids = [f"sim-{i}" for i in range(2)]
    beating = [True, True]
    for i, url in enumerate(urls):
        report = _node_report(f"n{i}", ids[i])
        await plane.scheduler.RegisterNode(scheduler_pb2.RegisterNodeRequest(report=report))
        engine = _engine(ids[i], url, f"n{i}", common_pb2.ENGINE_STATE_READY)
        await plane.scheduler.RegisterEngine(scheduler_pb2.RegisterEngineRequest(engine=engine))

    async def heartbeats() -> None:
        while True:
            for i in range(2):
                if beating[i]:
                    await plane.scheduler.NodeHeartbeat(
                        scheduler_pb2.NodeHeartbeatRequest(report=_node_report(f"n{i}", ids[i]))
                    )
            await asyncio.sleep(0.1)

    async def silence(i: int) -> None:
        beating[i] = False

    beats = asyncio.create_task(heartbeats())
    try:
        await _loses_a_node_under_load(plane, sim_engine, urls, ids, silence)
    finally:
        beats.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beats
    nodes = await plane.scheduler.ListNodes(scheduler_pb2.ListNodesRequest())
    states = {n.report.node_id: n.state for n in nodes.nodes}
    assert sorted(states.values()) == sorted(
        [scheduler_pb2.NODE_STATE_READY, scheduler_pb2.NODE_STATE_DOWN]
    )


async def test_node_whose_etcd_lease_expires_has_its_calls_failed_over(
    plane_factory: PlaneFactory,
    sim_engine: SimFactory,
    settings: SageSettings,
    etcd: EtcdMembers,
    request: pytest.FixtureRequest,
) -> None:
    """The etcd path: the node agent crashes (its lease left to expire, as a partition
    does), so its node key and its engine key go at once, in either order."""
    prefix = f"/loss-{request.node.name}"
    cluster = settings.cluster.model_copy(
        update={"etcd_endpoints": etcd.endpoints, "etcd_prefix": prefix, "etcd_lease_ttl_s": 2}
    )
    plane = await plane_factory(request_timeout_s=REQUEST_TIMEOUT_S, cluster=cluster)
    urls = [sim_engine("--tpot-ms", "40") for _ in range(2)]
    ids = [f"sim-{i}" for i in range(2)]
    client = EtcdClient(etcd.endpoints)
    keys = ClusterKeys(prefix)
    agents = [KeptLease(client, 2, name=f"agent-n{i}") for i in range(2)]
    try:
        for i, agent in enumerate(agents):
            await agent.start()
            await agent.put(keys.node(f"n{i}"), _node_report(f"n{i}", ids[i]).SerializeToString())
            engine = _engine(ids[i], urls[i], f"n{i}", common_pb2.ENGINE_STATE_READY)
            await agent.put(keys.engine(ids[i]), engine.SerializeToString())

        async def routed() -> bool:
            listed = await plane.scheduler.ListEngines(scheduler_pb2.ListEnginesRequest())
            return len(listed.engines) == 2

        await _until(routed, 15, "both engines routed from etcd")

        async def crash(i: int) -> None:
            await agents[i].close(revoke=False)

        await _loses_a_node_under_load(plane, sim_engine, urls, ids, crash)
    finally:
        for agent in agents:
            await agent.close()
        await client.close()


async def test_an_operator_drain_cuts_no_call_under_way(
    plane_factory: PlaneFactory, sim_engine: SimFactory, settings: SageSettings
) -> None:
    """DeregisterEngine with a drain while a slow chat runs on the engine: the chat ends
    there, whole, and nothing fails over (the node is alive)."""
    plane = await plane_factory(**_grpc_settings(settings))
    slow = sim_engine("--ttft-ms", "800")
    other = sim_engine()
    report = _node_report("n0", "slow", "other")
    await plane.scheduler.RegisterNode(scheduler_pb2.RegisterNodeRequest(report=report))
    engine = _engine("slow", slow, "n0", common_pb2.ENGINE_STATE_READY)
    await plane.scheduler.RegisterEngine(scheduler_pb2.RegisterEngineRequest(engine=engine))
    chat = asyncio.create_task(plane.client.post("/v1/chat/completions", json=_chat(4)))

    async def on_slow() -> bool:
        return await plane.metric("sage:engine_in_flight", engine="slow") >= 1

    await _until(on_slow, 10, "the chat on the slow engine")
    engine = _engine("other", other, "n0", common_pb2.ENGINE_STATE_READY)
    await plane.scheduler.RegisterEngine(scheduler_pb2.RegisterEngineRequest(engine=engine))
    drained = await plane.scheduler.DeregisterEngine(
        scheduler_pb2.DeregisterEngineRequest(engine_id="slow", drain_timeout_s=10.0)
    )
    reply = await chat
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["message"]["content"] == expected_text(PROMPT, 4)
    assert drained.in_flight == 0
    assert await plane.metric("sage:scheduler_failovers_total", kind="unary") == 0


async def test_engines_leaving_etcd_with_their_node_alive_cut_no_call_under_way(
    plane_factory: PlaneFactory,
    sim_engine: SimFactory,
    settings: SageSettings,
    etcd: EtcdMembers,
    request: pytest.FixtureRequest,
) -> None:
    """Lifecycle's drained stop (the key written DRAINING, then deleted) and an engine key
    deleted while READY (a stop without drain) on a node whose key stays: the chats under
    way on them end there, whole; nothing fails over."""
    prefix = f"/loss-{request.node.name}"
    cluster = settings.cluster.model_copy(
        update={"etcd_endpoints": etcd.endpoints, "etcd_prefix": prefix, "etcd_lease_ttl_s": 2}
    )
    plane = await plane_factory(request_timeout_s=REQUEST_TIMEOUT_S, cluster=cluster)
    client = EtcdClient(etcd.endpoints)
    keys = ClusterKeys(prefix)
    agent = KeptLease(client, 2, name="agent-n0")
    try:
        await agent.start()
        await agent.put(keys.node("n0"), _node_report("n0").SerializeToString())
        for engine_id, drain in (("drained", True), ("stopped", False)):
            url = sim_engine("--ttft-ms", "800")
            ready = _engine(engine_id, url, "n0", common_pb2.ENGINE_STATE_READY)
            await agent.put(keys.engine(engine_id), ready.SerializeToString())

            async def routed(engine_id: str = engine_id) -> bool:
                listed = await plane.scheduler.ListEngines(scheduler_pb2.ListEnginesRequest())
                return [e.engine_id for e in listed.engines] == [engine_id]

            await _until(routed, 15, f"{engine_id} routed from etcd")
            chat = asyncio.create_task(plane.client.post("/v1/chat/completions", json=_chat(4)))

            async def on_it(engine_id: str = engine_id) -> bool:
                return await plane.metric("sage:engine_in_flight", engine=engine_id) >= 1

            await _until(on_it, 10, f"the chat on {engine_id}")
            if drain:
                draining = _engine(engine_id, url, "n0", common_pb2.ENGINE_STATE_DRAINING)
                await agent.put(keys.engine(engine_id), draining.SerializeToString())
                await asyncio.sleep(0.2)
            await agent.delete(keys.engine(engine_id))
            reply = await chat
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["message"]["content"] == expected_text(PROMPT, 4)
        assert await plane.metric("sage:scheduler_failovers_total", kind="unary") == 0
    finally:
        await agent.close()
        await client.close()


async def test_embedding_batches_on_a_lost_node_go_to_another_engine(
    plane_factory: PlaneFactory,
    sim_engine: SimFactory,
    settings: SageSettings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The embedding service sends the batches, so the scheduler has it cut those waiting on
    a lost node's engine (AbortEngineCalls): each is embedded again on the other engine."""
    embedding, embedding_port = build_embedding(settings, "127.0.0.1:0")
    await embedding.start()
    try:
        plane = await plane_factory(
            **_grpc_settings(settings),
            embedding_service=settings.embedding_service.model_copy(
                update={"addr": f"127.0.0.1:{embedding_port}"}
            ),
        )
        urls = [sim_engine("--embedding-dim", "8") for _ in range(2)]
        ids = [f"embed-{i}" for i in range(2)]
        beating = [True, True]
        for i, url in enumerate(urls):
            report = _node_report(f"n{i}", ids[i])
            await plane.scheduler.RegisterNode(scheduler_pb2.RegisterNodeRequest(report=report))
            engine = _engine(
                ids[i],
                url,
                f"n{i}",
                common_pb2.ENGINE_STATE_READY,
                common_pb2.ENGINE_KIND_EMBEDDING,
            )
            await plane.scheduler.RegisterEngine(scheduler_pb2.RegisterEngineRequest(engine=engine))

        async def heartbeats() -> None:
            while True:
                for i in range(2):
                    if beating[i]:
                        report = _node_report(f"n{i}", ids[i])
                        await plane.scheduler.NodeHeartbeat(
                            scheduler_pb2.NodeHeartbeatRequest(report=report)
                        )
                await asyncio.sleep(0.1)

        async def embed(n: int) -> httpx.Response:
            body = {"model": "sim", "input": [f"text {n}", f"more {n}"]}
            return await plane.client.post("/v1/embeddings", json=body)

        beats = asyncio.create_task(heartbeats())
        caplog.set_level(logging.WARNING, logger="sage.embedding")
        with _resumed_at_exit([_proc(sim_engine, url) for url in urls]):
            assert (await embed(-1)).status_code == 200  # both engines reachable first
            _proc(sim_engine, urls[0]).send_signal(signal.SIGSTOP)
            sent = [asyncio.create_task(embed(n)) for n in range(UNARY)]
            await asyncio.sleep(0.3)  # the batches are out, some of them on embed-0
            beating[0] = False
            replies = await asyncio.wait_for(asyncio.gather(*sent), REQUEST_TIMEOUT_S - 5)
        beats.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beats
        assert [r.status_code for r in replies] == [200] * UNARY, [r.text for r in replies]
        assert all(len(r.json()["data"]) == 2 for r in replies)
        retried = [r for r in caplog.records if "dropped the batch" in r.getMessage()]
        assert retried, "no batch was caught on the lost engine"
    finally:
        await embedding.stop(0)
