"""Two real vLLM engines for one model behind the stack (the second started through the
management API, once for the module), in order: prefix_aware routing, kill -9 of one engine
mid-stream, its restart by lifecycle, and a drain-stop.

prefix_aware: a repeated long prompt goes back to the engine that cached it, so that
engine's own `vllm:prefix_cache_hits_total` grows (vLLM caches whole 128-token blocks; a
prompt under 129 tokens never hits). Round-robin would alternate the repeats between the
engines and split the hits; each engine would then recompute the prompt once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest

from sage.engines.vllm_metrics import read_load
from tests.vllm.conftest import (
    MESSAGES,
    VllmStack,
    engine_counter,
    sse,
    start_engine,
    still_running,
    stop_engine,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(420)]

HITS = "vllm:prefix_cache_hits_total"
REPEATS = 4
# ~630 and ~600 WordPiece tokens: 4 whole 128-token blocks each, far apart from the first word.
PROMPTS = {
    "fox": "the quick brown fox jumps over the lazy dog " * 70,
    "jugs": "pack my box with five dozen liquor jugs " * 75,
}


def prefix_hits(base_url: str) -> float:
    """An engine's vllm:prefix_cache_hits_total (tokens), summed over its engine cores."""
    return engine_counter(base_url, HITS)


@pytest.fixture(scope="module")
def two_engines(vllm_stack: VllmStack) -> Iterator[list[dict[str, Any]]]:
    """The stack's engine and a second one for the same model; the second is stopped at the
    end of the module unless a test stopped it."""
    second = start_engine(vllm_stack)
    try:
        yield [vllm_stack.engine, second]
    finally:
        current = engine_state(vllm_stack, second["engine_id"])
        if current is not None and current["status"] in ("STARTING", "RUNNING"):
            stop_engine(vllm_stack, current)


def engine_state(stack: VllmStack, engine_id: str) -> dict[str, Any] | None:
    """The engine as the management API lists it now, or None once it is gone."""
    listed = httpx.get(
        stack.gateway + "/v1/management/engines", headers=stack.admin(), timeout=30
    ).json()["engines"]
    return next((e for e in listed if e["engine_id"] == engine_id), None)


def routing_state(stack: VllmStack) -> str:
    """The gateway's per-engine series (attempts, breaker state, requests), for failures."""
    text = httpx.get(stack.gateway + "/metrics", headers=stack.admin(), timeout=30).text
    listed = httpx.get(
        stack.gateway + "/v1/management/engines", headers=stack.admin(), timeout=30
    ).json()["engines"]
    states = [(e["engine_id"], e["status"], e.get("restart_count"), e.get("error")) for e in listed]
    series = [line for line in text.splitlines() if 'engine="' in line and line[0] != "#"]
    return "\n".join([f"engines: {states}", *series])


def ready_engines(stack: VllmStack) -> int:
    """How many engines the edge reports ready for the stack's model."""
    models = httpx.get(stack.gateway + "/v1/models", timeout=30).json()["data"]
    return sum(m["ready_engines"] for m in models if m["id"] == stack.model)


def test_repeated_prefix_hits_the_cache_of_one_engine(
    vllm_stack: VllmStack, two_engines: list[dict[str, Any]]
) -> None:
    urls = [str(e["base_url"]) for e in two_engines]
    assert ready_engines(vllm_stack) == 2
    with httpx.Client(base_url=vllm_stack.gateway + "/v1", timeout=120) as client:
        for name, prompt in PROMPTS.items():
            before = [prefix_hits(url) for url in urls]
            for _ in range(REPEATS):
                reply = client.post(
                    "/completions",
                    json={"model": vllm_stack.model, "prompt": prompt, "max_tokens": 4},
                )
                assert reply.status_code == 200, reply.text
                assert reply.json()["usage"]["prompt_tokens"] >= 512
            grew = [prefix_hits(url) - b for url, b in zip(urls, before, strict=True)]
            # Every repeat after the first went to the engine that computed it first: that
            # one served at least 2 cached blocks each time, the other none.
            assert sorted(grew)[0] == 0, (name, grew)
            assert max(grew) >= (REPEATS - 1) * 256, (name, grew)


async def stream_chat(http: httpx.AsyncClient, model: str, max_tokens: int) -> dict[str, Any]:
    """One streamed chat through the edge: status, text, finish reason, errors seen."""
    body = {
        "model": model,
        "messages": MESSAGES,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,  # runs to max_tokens: long enough to be caught mid-stream
        "stream": True,
    }
    reply = await http.post("/chat/completions", json=body)
    events = sse(reply.text) if reply.status_code == 200 else []
    chunks = [e for e in events if isinstance(e, dict)]
    return {
        "status": reply.status_code,
        "done": bool(events) and events[-1] == "[DONE]",
        "errors": [c for c in chunks if "error" in c],
        "finish": [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")][-1:],
        "text": "".join(
            c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices")
        ),
    }


async def test_kill_9_of_one_engine_mid_stream_fails_no_request(
    vllm_stack: VllmStack, two_engines: list[dict[str, Any]]
) -> None:
    victim = engine_state(vllm_stack, two_engines[1]["engine_id"])
    assert victim is not None and victim["status"] == "RUNNING"
    async with httpx.AsyncClient(base_url=vllm_stack.gateway + "/v1", timeout=120) as http:
        streams = [asyncio.create_task(stream_chat(http, vllm_stack.model, 700)) for _ in range(8)]
        # Kill vLLM's API server once the victim is decoding some of them. On 2 busy cores
        # a /metrics answer can lag by seconds: the streams are long enough to outlast that.
        deadline = time.monotonic() + 90
        seen: list[tuple[float, float]] = []
        while time.monotonic() < deadline and not all(s.done() for s in streams):
            loads = [
                read_load((await http.get(str(e["base_url"]) + "/metrics", timeout=30)).text)
                for e in (two_engines[0], victim)
            ]
            seen.append((loads[0].running, loads[1].running))
            if loads[1].running > 0:
                break
            await asyncio.sleep(0.05)
        else:
            done = [s.result() for s in streams if s.done()]
            pytest.fail(
                f"no request reached the second engine; running (first, second) over time: "
                f"{seen[-20:]}; streams finished: {len(done)} {done[:1]}\n"
                f"{routing_state(vllm_stack)}\n{vllm_stack.logs()}"
            )
        left_behind = psutil.Process(int(victim["pid"])).children(recursive=True)
        os.kill(int(victim["pid"]), signal.SIGKILL)
        results = await asyncio.gather(*streams)
    # lifecycle killed what the API server left (EngineCore, Worker: ~2.4 GiB otherwise)
    assert not still_running(left_behind, timeout=30), [p.pid for p in left_behind]
    for result in results:
        assert result["status"] == 200 and result["done"], result
        assert result["errors"] == [] and result["finish"] == ["length"], result
        assert result["text"], result


def test_killed_engine_is_restarted_by_lifecycle(
    vllm_stack: VllmStack, two_engines: list[dict[str, Any]]
) -> None:
    engine_id = two_engines[1]["engine_id"]
    deadline = time.monotonic() + 240
    state = engine_state(vllm_stack, engine_id)
    while time.monotonic() < deadline:
        state = engine_state(vllm_stack, engine_id)
        assert state is not None
        if state["status"] == "RUNNING" and state["restart_count"] >= 1:
            break
        assert state["status"] != "FAILED", state
        time.sleep(1)
    else:
        pytest.fail(f"not restarted: {state}\n{vllm_stack.logs()}")
    assert state["pid"] != two_engines[1]["pid"]
    deadline = time.monotonic() + 30
    while ready_engines(vllm_stack) != 2 and time.monotonic() < deadline:
        time.sleep(0.5)  # registered again with the scheduler
    assert ready_engines(vllm_stack) == 2


async def test_drain_stop_waits_for_in_flight_requests(
    vllm_stack: VllmStack, two_engines: list[dict[str, Any]]
) -> None:
    engine = engine_state(vllm_stack, two_engines[1]["engine_id"])
    assert engine is not None and engine["status"] == "RUNNING"
    body = {"model": vllm_stack.model, "prompt": "hello", "max_tokens": 900, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=vllm_stack.gateway + "/v1", timeout=120) as http:
        requests = [asyncio.create_task(http.post("/completions", json=body)) for _ in range(4)]
        deadline = time.monotonic() + 30
        on_engine = 0.0
        while time.monotonic() < deadline:
            metrics = await http.get(str(engine["base_url"]) + "/metrics", timeout=30)
            on_engine = read_load(metrics.text).running
            if on_engine > 0:
                break
            await asyncio.sleep(0.05)
        else:
            done = [r.result().text[:300] for r in requests if r.done()]
            pytest.fail(
                f"no request reached the second engine; finished: {done}\n"
                f"{routing_state(vllm_stack)}\n{vllm_stack.logs()}"
            )
        stopped = await http.delete(
            f"{vllm_stack.gateway}/v1/management/engines/{engine['engine_id']}",
            params={"drain": "true"},
            headers=vllm_stack.admin(),
            timeout=180,
        )
        assert stopped.status_code == 200, stopped.text
        # The stop returned only after the engine's own requests had ended: without the
        # drain it would be SIGTERMed mid-decode (and the scheduler would resume them).
        assert sum(r.done() for r in requests) >= on_engine
        replies = await asyncio.gather(*requests)
    # every request ran to its end, those on the drained engine included
    for reply in replies:
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 900
    assert ready_engines(vllm_stack) == 1
