"""Two real vLLM engines for one model behind the stack (the second started through the
management API, once for the module), in order: prefix routing, routing by the engines'
KV-cache events (kv_events, the stack's routing), kill -9 of one engine
under 8 greedy streams (each cut stream resumed exactly, from token ids), its restart by
lifecycle, and a drain-stop.

Prefix routing: a repeated long prompt goes back to the engine that cached it, so that
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
from prometheus_client.parser import text_string_to_metric_families

from sage.common.security import engine_api_key
from sage.engines.vllm_metrics import read_load
from tests.vllm.conftest import (
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
    series = [
        line
        for line in text.splitlines()
        if 'engine="' in line and line[0] != "#" and "_bucket{" not in line
    ]
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


# Prompts no other test sends: 632 and 902 tokens, 4 and 7 whole 128-token blocks.
KV_PROMPTS = (
    "sphinx of black quartz judge my vow " * 90,
    "how vexingly quick daft zebras jump " * 90,
)
KV_REPEATS = 3


def test_kv_events_send_a_prompt_to_the_engine_that_cached_it(
    vllm_stack: VllmStack, two_engines: list[dict[str, Any]]
) -> None:
    """Each prompt is first computed on one engine directly, behind the scheduler's back, so
    only that engine's KV-cache events (kv_events routing) can say where it is cached.
    Through the gateway every repeat then goes there: its prefix-cache hits grow, the other
    engine's do not, and the scheduler counts each pick as a kv_hit. prefix_aware, which
    knows only what it routed itself, would place the first repeat of each by load."""
    urls = [str(e["base_url"]) for e in two_engines]
    ids = [str(e["engine_id"]) for e in two_engines]

    def indexed(engine_id: str) -> float:
        return gateway_sample(vllm_stack, "sage:kv_indexed_blocks", engine=engine_id)

    def kv_hits() -> float:
        return gateway_sample(vllm_stack, "sage:kv_route_decisions_total", decision="kv_hit")

    blocks_before = [indexed(engine_id) for engine_id in ids]
    with httpx.Client(timeout=120) as client:
        for engine, prompt in zip(two_engines, KV_PROMPTS, strict=True):
            key = engine_api_key(vllm_stack.internal_token, str(engine["engine_id"]))
            seeded = client.post(
                f"{engine['base_url']}/v1/completions",
                json={"model": vllm_stack.model, "prompt": prompt, "max_tokens": 1},
                headers={"Authorization": f"Bearer {key}"},
            )
            assert seeded.status_code == 200, seeded.text
        deadline = time.monotonic() + 30
        while any(indexed(e) - b < 4 for e, b in zip(ids, blocks_before, strict=True)):
            assert time.monotonic() < deadline, routing_state(vllm_stack)
            time.sleep(0.2)
        picked_before = kv_hits()
        for owner, prompt in enumerate(KV_PROMPTS):
            before = [prefix_hits(url) for url in urls]
            for _ in range(KV_REPEATS):
                reply = client.post(
                    vllm_stack.gateway + "/v1/completions",
                    json={"model": vllm_stack.model, "prompt": prompt, "max_tokens": 4},
                )
                assert reply.status_code == 200, reply.text
            grew = [prefix_hits(url) - b for url, b in zip(urls, before, strict=True)]
            assert grew[1 - owner] == 0, (owner, grew, routing_state(vllm_stack))
            assert grew[owner] >= KV_REPEATS * 4 * 128, (owner, grew)
    assert kv_hits() - picked_before == 2 * KV_REPEATS
    # The scheduler read the model's tokenizer itself: after the first prompt of each kind
    # (checked against the engine's /tokenize) no request waited for an engine call.
    by_path = {
        path: gateway_sample(vllm_stack, "sage:kv_tokenize_seconds_count", path=path)
        for path in ("local", "engine")
    }
    assert by_path["local"] >= 2 * KV_REPEATS - 1, by_path
    assert by_path["engine"] <= 2, by_path
    assert gateway_sample(vllm_stack, "sage:kv_local_tokenizer_mismatches_total") == 0
    spent = gateway_sample(vllm_stack, "sage:kv_tokenize_seconds_sum", path="local")
    print(f"kv_events: {by_path}, local {1000 * spent / max(by_path['local'], 1):.2f} ms mean")


# The engine test_streams_cut_by_kill_9... killed (as listed then), for the restart test.
KILLED: dict[str, Any] = {}
MAX_TOKENS = 256  # ~2 s a stream on 2 CPU cores: room to pick and kill an engine
SUBJECTS = (
    "batching",
    "prefix caching",
    "tokenizers",
    "schedulers",
    "paged attention",
    "speculative decoding",
    "quantization",
    "disaggregated prefill",
)


def gateway_sample(stack: VllmStack, name: str, **labels: str) -> float:
    """A series of the gateway's /metrics, summed over the label sets matching `labels`."""
    text = httpx.get(stack.gateway + "/metrics", headers=stack.admin(), timeout=30).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


async def stream_chat(
    http: httpx.AsyncClient, model: str, subject: str, progress: list[int], index: int
) -> dict[str, Any]:
    """One greedy streamed chat through the edge, as the client reads it."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"say something about {subject}"}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,  # runs to max_tokens: long enough to be cut mid-way
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks: list[Any] = []
    async with http.stream("POST", "/chat/completions", json=body) as reply:
        assert reply.status_code == 200, await reply.aread()
        async for line in reply.aiter_lines():
            if line.startswith("data: "):
                chunks.extend(sse(line))
                progress[index] += 1
    assert chunks and chunks[-1] == "[DONE]", chunks[-3:]
    events = [c for c in chunks if isinstance(c, dict)]
    assert not [e for e in events if "error" in e], events
    content = [e["choices"][0] for e in events if e["choices"]]
    return {
        "text": "".join(c["delta"].get("content") or "" for c in content),
        "finish": content[-1]["finish_reason"],
        "usage": events[-1]["usage"],
        "ids": {e["id"] for e in events},
        "roles": sum("role" in c["delta"] for c in content),
        # what a client that did not ask for token ids must never see
        "token_ids": [c.get("token_ids") for c in content if c.get("token_ids") is not None]
        + [e["prompt_token_ids"] for e in events if e.get("prompt_token_ids") is not None],
    }


def engine_in_flight(text: str, engine_id: str) -> float:
    """The scheduler's sage:engine_in_flight for one engine, from gateway /metrics text."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "sage:engine_in_flight" and sample.labels.get("engine") == engine_id
    )


async def all_streams(
    stack: VllmStack, engines: list[dict[str, Any]] | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Every subject's stream at once; with `engines`, SIGKILL of the API server of one
    that is decoding some of them (its own vllm:num_requests_running; the second engine if
    both are) once every stream is under way. Which engine: routing has sent all 8 short
    prompts to one engine in some runs (recorded as open), and the test is about the kill.
    Returns the replies and the engine killed."""
    progress = [0] * len(SUBJECTS)
    killed: dict[str, Any] | None = None
    async with httpx.AsyncClient(base_url=stack.gateway + "/v1", timeout=300) as http:
        streams = [
            asyncio.create_task(stream_chat(http, stack.model, subject, progress, i))
            for i, subject in enumerate(SUBJECTS)
        ]
        if engines:
            deadline = time.monotonic() + 120
            while not all(s.done() for s in streams):
                assert time.monotonic() < deadline, f"no stream reached an engine: {progress}"
                if min(progress) < 3:
                    await asyncio.sleep(0.01)  # cheap: no scrape until every stream is under way
                    continue
                # Both engines' own gauges at once, with the scheduler's in-flight count as the
                # fallback: on 2 busy cores a sequential scrape could outlast the 8 streams.
                replies = await asyncio.gather(
                    *(http.get(str(e["base_url"]) + "/metrics") for e in engines),
                    http.get(stack.gateway + "/metrics", headers=stack.admin()),
                )
                running = [read_load(r.text).running for r in replies[:-1]]
                if not any(running):
                    running = [engine_in_flight(replies[-1].text, e["engine_id"]) for e in engines]
                if any(running) and not all(s.done() for s in streams):
                    killed = engines[1] if running[1] else engines[0]
                    os.kill(int(killed["pid"]), signal.SIGKILL)
                    break
                await asyncio.sleep(0.02)
            else:
                pytest.fail(
                    f"every stream ended before an engine could be killed: {progress}\n"
                    f"{routing_state(stack)}"
                )
        return list(await asyncio.gather(*streams)), killed


@pytest.fixture(scope="module")
def unbroken(vllm_stack: VllmStack, two_engines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every subject's stream once, nothing killed: what the resumed ones must read like."""
    return asyncio.run(all_streams(vllm_stack))[0]


def test_streams_cut_by_kill_9_read_exactly_like_unbroken_ones(
    vllm_stack: VllmStack, two_engines: list[dict[str, Any]], unbroken: list[dict[str, Any]]
) -> None:
    """kill -9 of one engine's API server under 8 greedy streams fails none: the scheduler
    continues each cut stream on the other engine from its token ids (vLLM's
    return_token_ids; a /v1/completions of prompt + output ids), so every reply is byte for
    byte the unbroken one (resuming from text was not: WordPiece text does not re-tokenize
    to its ids), and lifecycle kills what the API server left behind."""
    engines = [engine_state(vllm_stack, e["engine_id"]) for e in two_engines]
    assert all(e is not None and e["status"] == "RUNNING" for e in engines), engines
    assert ready_engines(vllm_stack) == 2
    children = {
        e["engine_id"]: psutil.Process(int(e["pid"])).children(recursive=True)
        for e in engines
        if e is not None
    }
    failovers = gateway_sample(vllm_stack, "sage:scheduler_failovers_total", kind="stream")
    served_before = {
        e["engine_id"]: engine_counter(
            e["base_url"], "http_requests_total", handler="/v1/completions"
        )
        for e in engines
        if e is not None
    }

    resumed, victim = asyncio.run(all_streams(vllm_stack, [e for e in engines if e]))
    assert victim is not None
    KILLED.update(victim)  # the restart test follows this engine
    survivor = next(e for e in engines if e and e["engine_id"] != victim["engine_id"])
    left_behind = children[victim["engine_id"]]

    # lifecycle killed what the API server left (EngineCore, Worker: ~2.4 GiB otherwise)
    assert not still_running(left_behind, timeout=30), [p.pid for p in left_behind]
    # Some streams were cut after chunks went out; each went on from its token ids, as a
    # completion on the surviving engine (the client sent only chat requests).
    cut = gateway_sample(vllm_stack, "sage:scheduler_failovers_total", kind="stream") - failovers
    assert cut >= 1, f"no stream was cut: {routing_state(vllm_stack)}\n{vllm_stack.logs()}"
    served = (
        engine_counter(survivor["base_url"], "http_requests_total", handler="/v1/completions")
        - served_before[survivor["engine_id"]]
    )
    assert served == cut, (served, cut)
    for subject, want, got in zip(SUBJECTS, unbroken, resumed, strict=True):
        assert got["text"] == want["text"], (subject, want["text"], got["text"])
        assert got["finish"] == want["finish"] == "length", subject
        assert got["usage"] == want["usage"], subject  # prompt and reply counted as unbroken
        # one stream to the client: one id, one role chunk, no token ids it did not ask for
        assert len(got["ids"]) == 1 and got["roles"] == 1, (subject, got["ids"])
        assert got["token_ids"] == [] and want["token_ids"] == [], subject


def test_killed_engine_is_restarted_by_lifecycle(
    vllm_stack: VllmStack, two_engines: list[dict[str, Any]]
) -> None:
    engine_id = KILLED.get("engine_id") or pytest.skip("the kill test killed no engine")
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
    assert state["pid"] != KILLED["pid"]
    deadline = time.monotonic() + 30
    while ready_engines(vllm_stack) != 2 and time.monotonic() < deadline:
        time.sleep(0.5)  # registered again with the scheduler
    assert ready_engines(vllm_stack) == 2


async def test_drain_stop_waits_for_in_flight_requests(
    vllm_stack: VllmStack, two_engines: list[dict[str, Any]]
) -> None:
    engines = [engine_state(vllm_stack, e["engine_id"]) for e in two_engines]
    assert all(e is not None and e["status"] == "RUNNING" for e in engines), engines
    body = {"model": vllm_stack.model, "prompt": "hello", "max_tokens": 900, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=vllm_stack.gateway + "/v1", timeout=120) as http:
        requests = [asyncio.create_task(http.post("/completions", json=body)) for _ in range(4)]
        # The scheduler's own count: an engine's /metrics can answer only after the
        # requests ended when its API server is busy on 2 cores. The engine drained is one
        # with requests on it (the second if it has some).
        deadline = time.monotonic() + 60
        engine: dict[str, Any] | None = None
        on_engine = 0.0
        while time.monotonic() < deadline and not all(r.done() for r in requests):
            text = (
                await http.get(vllm_stack.gateway + "/metrics", headers=vllm_stack.admin())
            ).text
            busy = [engine_in_flight(text, str(e["engine_id"])) for e in engines if e]
            if any(busy):
                index = 1 if busy[1] else 0
                engine, on_engine = engines[index], busy[index]
                break
            await asyncio.sleep(0.05)
        if engine is None:
            done = [r.result().text[:300] for r in requests if r.done()]
            pytest.fail(
                f"no request seen in flight; finished: {done}\n"
                f"{routing_state(vllm_stack)}\n{vllm_stack.logs()}"
            )
        failovers = gateway_sample(vllm_stack, "sage:scheduler_failovers_total")
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
    # none was cut and finished elsewhere
    assert gateway_sample(vllm_stack, "sage:scheduler_failovers_total") == failovers
    # every request ran to its end, those on the drained engine included
    for reply in replies:
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 900
    assert ready_engines(vllm_stack) == 1
