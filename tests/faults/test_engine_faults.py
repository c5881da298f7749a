"""Engine faults under bounded load, as the user of the edge sees them: engines killed with
SIGKILL (non-streamed and mid-stream), and an engine that accepts but never answers."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import time
from typing import Any

import httpx
import orjson
import pytest

from sage.engines.sim import expected_text, generate, tokenize
from sage.rpc.common.v1 import common_pb2
from sage.rpc.scheduler.v1 import scheduler_pb2
from tests.conftest import SimFactory
from tests.faults.conftest import PlaneFactory

MESSAGES = [{"role": "user", "content": "tell me about fault tolerance"}]


def _proc(sims: SimFactory, base_url: str) -> subprocess.Popen[bytes]:
    """The simulator process serving `base_url`."""
    port = base_url.rsplit(":", 1)[1]
    procs: list[subprocess.Popen[bytes]] = sims.procs  # type: ignore[attr-defined]
    for proc in procs:
        args = [str(a) for a in proc.args] if isinstance(proc.args, list) else []
        if args[args.index("--port") + 1] == port:
            return proc
    raise AssertionError(f"no simulator serves {base_url}")


async def _running(base_url: str) -> float:
    async with httpx.AsyncClient(trust_env=False) as client:
        text = (await client.get(base_url + "/metrics")).text
    found = re.search(r"^vllm:num_requests_running\{[^}]*\} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


async def _kill_busy(sims: SimFactory, urls: list[str]) -> str:
    """SIGKILL the engine that is generating right now; returns its URL."""
    for _ in range(100):
        for url in urls:
            if await _running(url) > 0:
                _proc(sims, url).send_signal(signal.SIGKILL)
                _proc(sims, url).wait(10)
                return url
        await asyncio.sleep(0.02)
    raise AssertionError("no engine was generating")


async def _stream(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], on_chunk: Any = None
) -> list[Any]:
    """POST a streamed request; every SSE data payload, parsed ([DONE] as the string)."""
    events: list[Any] = []
    async with client.stream("POST", path, json={**body, "stream": True}) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            events.append("[DONE]" if data == "[DONE]" else orjson.loads(data))
            if on_chunk is not None:
                await on_chunk(events)
    return events


@pytest.mark.slow
async def test_killing_one_of_three_engines_fails_no_unary_request(
    no_leaked_children: None, plane_factory: PlaneFactory, sim_engine: SimFactory
) -> None:
    plane = await plane_factory()
    urls = [sim_engine("--ttft-ms", "20", "--tpot-ms", "15") for _ in range(3)]
    for i, url in enumerate(urls):
        await plane.register(f"sim-{i}", url)
    total, workers = 60, 9
    statuses: list[int] = []
    warmed = asyncio.Event()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(total):
        queue.put_nowait(n)

    async def worker() -> None:
        while not queue.empty():
            n = queue.get_nowait()
            resp = await plane.client.post(
                "/v1/chat/completions",
                json={
                    "model": "sim",
                    "messages": [{"role": "user", "content": f"request {n}"}],
                    "max_tokens": 12,
                },
            )
            statuses.append(resp.status_code)
            if len(statuses) == 10:
                warmed.set()
            assert resp.status_code != 200 or resp.json()["choices"][0]["message"]["content"]

    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    await asyncio.wait_for(warmed.wait(), 30)  # then kill while requests are in flight
    await _kill_busy(sim_engine, urls[:1])
    await asyncio.wait_for(asyncio.gather(*tasks), 60)

    assert statuses == [200] * total
    # Requests cut off on the killed engine were re-sent elsewhere, not failed.
    assert await plane.metric("sage:scheduler_failovers_total", kind="unary") >= 1
    assert await plane.metric("sage:scheduler_requests_total", status="error") == 0


async def test_stream_killed_mid_way_continues_on_another_engine(
    plane_factory: PlaneFactory, sim_engine: SimFactory
) -> None:
    plane = await plane_factory()
    urls = [sim_engine("--tpot-ms", "40") for _ in range(2)]
    for i, url in enumerate(urls):
        await plane.register(f"sim-{i}", url)
    killed: list[str] = []

    async def kill_after_five(events: list[Any]) -> None:
        if len(events) == 6 and not killed:  # role chunk + 5 tokens
            killed.append(await _kill_busy(sim_engine, urls))

    body = {"model": "sim", "messages": MESSAGES, "max_tokens": 30}
    events = await _stream(plane.client, "/v1/chat/completions", body, kill_after_five)

    assert killed, "the stream ended before an engine could be killed"
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all("error" not in c for c in chunks), chunks
    # One stream to the client: one id, one role chunk, the reply an unbroken stream gives.
    assert len({c["id"] for c in chunks}) == 1
    assert len({c["created"] for c in chunks}) == 1
    assert sum("role" in c["choices"][0]["delta"] for c in chunks) == 1
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == expected_text("tell me about fault tolerance", 30)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert await plane.metric("sage:scheduler_failovers_total", kind="stream") == 1


async def test_completion_stream_killed_mid_way_keeps_its_token_budget(
    plane_factory: PlaneFactory, sim_engine: SimFactory
) -> None:
    plane = await plane_factory()
    urls = [sim_engine("--tpot-ms", "40") for _ in range(2)]
    for i, url in enumerate(urls):
        await plane.register(f"sim-{i}", url)
    killed: list[str] = []

    async def kill_after_four(events: list[Any]) -> None:
        if len(events) == 4 and not killed:
            killed.append(await _kill_busy(sim_engine, urls))

    body = {"model": "sim", "prompt": "once upon a time", "max_tokens": 20}
    events = await _stream(plane.client, "/v1/completions", body, kill_after_four)

    assert killed and events[-1] == "[DONE]"
    chunks = [c for c in events[:-1] if c["choices"]]
    assert len({c["id"] for c in chunks}) == 1
    pieces = [c["choices"][0]["text"] for c in chunks if c["choices"][0]["text"]]
    # The continuation was asked for what was left of max_tokens, not for 20 more.
    assert len(pieces) == 20
    # The first engine's part is the start of its real reply.
    assert expected_text("once upon a time", 20).startswith("".join(pieces[:4]))


def _glued_early_prompt() -> str:
    """A prompt whose subword-sim reply glues a piece to a word among its first 4 tokens (as
    WordPiece's "##s" does), so its first 5 tokens' text does not re-tokenize to their ids."""
    for n in range(500):
        prompt = f"tell me about fault tolerance {n}"
        pieces = generate(prompt, 30, subword=True).pieces
        if any(not p.startswith(" ") for p in pieces[1:4]):
            return prompt
    raise AssertionError("no prompt glues a piece early")


@pytest.mark.parametrize(
    ("backend", "exact"),
    [("sim", True), ("", False)],
    ids=["token-ids", "text-control"],
)
async def test_stream_killed_mid_way_resumes_from_token_ids_byte_for_byte(
    plane_factory: PlaneFactory, sim_engine: SimFactory, backend: str, exact: bool
) -> None:
    """Engines registered as vLLM-like (backend sim) are resumed from token ids: the reply
    reads exactly like an unbroken one although its text does not re-tokenize to its ids.
    The control, engines of unknown kind, is resumed from text and goes on differently:
    the failure exact resume exists for."""
    plane = await plane_factory()
    urls = [sim_engine("--tpot-ms", "40", "--subword-tokens") for _ in range(2)]
    for i, url in enumerate(urls):
        engine = common_pb2.Engine(
            engine_id=f"sim-{i}",
            model="sim",
            base_url=url,
            kind=common_pb2.ENGINE_KIND_LLM,
            backend=backend,
        )
        await plane.scheduler.RegisterEngine(scheduler_pb2.RegisterEngineRequest(engine=engine))
    prompt = _glued_early_prompt()
    body = {
        "model": "sim",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 30,
        "stream_options": {"include_usage": True},
    }
    unbroken = await _stream(plane.client, "/v1/chat/completions", body)
    killed: list[str] = []

    async def kill_after_five(events: list[Any]) -> None:
        if len(events) == 6 and not killed:  # role chunk + 5 tokens
            killed.append(await _kill_busy(sim_engine, urls))

    events = await _stream(plane.client, "/v1/chat/completions", body, kill_after_five)

    assert killed and events[-1] == "[DONE]"
    assert await plane.metric("sage:scheduler_failovers_total", kind="stream") == 1
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in events[:-2])
    want = expected_text(prompt, 30, subword=True)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in unbroken[:-2]) == want
    if not exact:
        assert text != want
        return
    assert text == want
    # The same stream in every other respect: the chunks' keys (no token ids the client did
    # not ask for), one id, the finish and the usage of the unbroken reply.
    assert [sorted(c) for c in events[:-1]] == [sorted(c) for c in unbroken[:-1]]
    assert [[sorted(ch) for ch in c["choices"]] for c in events[:-1]] == [
        [sorted(ch) for ch in c["choices"]] for c in unbroken[:-1]
    ]
    assert all(c.get("prompt_token_ids") is None for c in events[:-1])
    assert all(ch.get("token_ids") is None for c in events[:-1] for ch in c["choices"])
    assert len({c["id"] for c in events[:-1]}) == 1
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    assert (
        events[-2]["usage"]
        == unbroken[-2]["usage"]
        == {
            "prompt_tokens": len(tokenize(prompt)),
            "total_tokens": len(tokenize(prompt)) + 30,
            "completion_tokens": 30,
        }
    )


async def test_completion_stream_killed_mid_way_resumes_from_token_ids(
    plane_factory: PlaneFactory, sim_engine: SimFactory
) -> None:
    """A completion goes on from its token ids too, in its own chunk shape."""
    plane = await plane_factory()
    urls = [sim_engine("--tpot-ms", "40", "--subword-tokens") for _ in range(2)]
    for i, url in enumerate(urls):
        engine = common_pb2.Engine(
            engine_id=f"sim-{i}",
            model="sim",
            base_url=url,
            kind=common_pb2.ENGINE_KIND_LLM,
            backend="sim",
        )
        await plane.scheduler.RegisterEngine(scheduler_pb2.RegisterEngineRequest(engine=engine))
    prompt = _glued_early_prompt()
    killed: list[str] = []

    async def kill_after_five(events: list[Any]) -> None:
        if len(events) == 5 and not killed:
            killed.append(await _kill_busy(sim_engine, urls))

    body = {"model": "sim", "prompt": prompt, "max_tokens": 30}
    events = await _stream(plane.client, "/v1/completions", body, kill_after_five)

    assert killed and events[-1] == "[DONE]"
    assert await plane.metric("sage:scheduler_failovers_total", kind="stream") == 1
    choices = [c["choices"][0] for c in events[:-1]]
    assert "".join(c["text"] for c in choices) == expected_text(prompt, 30, subword=True)
    assert all(c["token_ids"] is None and c["prompt_token_ids"] is None for c in choices)
    assert len({c["id"] for c in events[:-1]}) == 1 and len(choices) == 30


async def test_stream_with_no_engine_left_ends_with_an_error_event(
    plane_factory: PlaneFactory, sim_engine: SimFactory
) -> None:
    plane = await plane_factory()
    url = sim_engine("--tpot-ms", "40")
    await plane.register("sim-0", url)
    killed: list[str] = []

    async def kill_after_three(events: list[Any]) -> None:
        if len(events) == 4 and not killed:
            killed.append(await _kill_busy(sim_engine, [url]))

    body = {"model": "sim", "messages": MESSAGES, "max_tokens": 30}
    events = await _stream(plane.client, "/v1/chat/completions", body, kill_after_three)

    assert killed
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert "no other ready engine" in error["message"]
    assert error["type"] and error["code"]
    # What came before the error is the start of the real reply, not garbage.
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in events[:-2])
    assert expected_text("tell me about fault tolerance", 30).startswith(text) and text


async def _hung_server() -> tuple[asyncio.Server, list[asyncio.StreamWriter], list[bytes]]:
    """Accepts connections and reads requests, never answers; also returns the request
    lines seen (the scheduler's /metrics scrapes reach it too)."""
    writers: list[asyncio.StreamWriter] = []
    lines: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        lines.append(await reader.readline())
        while await reader.read(65536):
            pass

    return await asyncio.start_server(handle, "127.0.0.1", 0), writers, lines


async def test_hung_engine_times_out_and_its_breaker_opens(
    plane_factory: PlaneFactory, sim_engine: SimFactory
) -> None:
    timeout = 1.0
    plane = await plane_factory(
        request_timeout_s=timeout,
        scheduler_breaker_failures=2,
        scheduler_breaker_cooldown_s=60.0,
    )
    server, writers, lines = await _hung_server()
    try:
        port = server.sockets[0].getsockname()[1]
        await plane.register("hung", f"http://127.0.0.1:{port}")
        body = {"model": "sim", "messages": MESSAGES, "max_tokens": 5}
        for _ in range(2):
            resp = await plane.client.post("/v1/chat/completions", json=body)
            assert resp.status_code == 504, resp.text
            assert "timed out" in resp.json()["error"]["message"]
        streamed = await plane.client.post(
            "/v1/chat/completions", json={**body, "stream": True}
        )  # the breaker is open and no other engine exists: it is still tried, and times out
        assert streamed.status_code == 504
        assert await plane.metric("sage:engine_circuit_open", engine="hung") == 1

        # With a healthy engine next to it, nothing is routed to the hung one any more.
        await plane.register("sim-0", sim_engine())
        for _ in range(6):
            began = time.monotonic()
            resp = await plane.client.post("/v1/chat/completions", json=body)
            assert resp.status_code == 200
            assert time.monotonic() - began < timeout  # answered, not waited out
        chats = [line for line in lines if b"/chat/completions" in line]
        assert len(chats) == 3, lines  # no further request reached the hung engine
    finally:
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()
