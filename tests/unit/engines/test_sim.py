"""Tests of the vLLM-compatible simulator engine (sage.engines.sim)."""

from __future__ import annotations

import asyncio
import base64
import math
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sage.engines.sim import (
    AdmissionQueue,
    SimConfig,
    chat_prompt_text,
    count_tokens,
    create_app,
    embedding_vector,
    expected_text,
    generate,
    main,
)
from sage.engines.sim.model import VOCABULARY

REPO_ROOT = Path(__file__).resolve().parents[3]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say something about batching please"},
]
PROMPT = chat_prompt_text(MESSAGES)


def make_client(config: SimConfig | None = None) -> httpx.AsyncClient:
    app = create_app(config or SimConfig())
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim")


@pytest.fixture
async def sim() -> AsyncIterator[httpx.AsyncClient]:
    async with make_client() as client:
        yield client


def sse_payloads(text: str) -> list[Any]:
    """Each `data:` event of an SSE body: parsed JSON, or the literal [DONE]."""
    events: list[Any] = []
    for block in text.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else orjson.loads(data))
    return events


def metric(text: str, sample: str, **labels: str) -> float:
    """The value of one sample in Prometheus text; 0 when absent."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


async def scrape(client: httpx.AsyncClient) -> str:
    response = await client.get("/metrics")
    assert response.status_code == 200
    return response.text


# -- pure model ------------------------------------------------------------------------


def test_expected_text_is_deterministic_and_one_word_per_token() -> None:
    text = expected_text("hello world", 12, seed=3)
    assert text == expected_text("hello world", 12, seed=3)
    assert text != expected_text("hello world", 12, seed=4)
    assert text != expected_text("hello there", 12, seed=3)
    words = text.split(" ")
    assert len(words) == 12 and all(w in VOCABULARY for w in words)
    # A longer answer starts with the shorter one: max_tokens only truncates.
    assert expected_text("hello world", 20, seed=3).startswith(text)


def test_stop_string_cuts_output() -> None:
    full = generate("p", 10, 0)
    third = full.pieces[2].strip()
    cut = generate("p", 10, 0, stop=[third])
    assert cut.finish_reason == "stop" and cut.stop_reason == third
    assert third not in cut.text
    assert full.text.startswith(cut.text)
    assert full.text[len(cut.text) :].startswith(third)
    assert generate("p", 10, 0, stop=["not-a-vocabulary-word"]).finish_reason == "length"


def test_count_tokens_and_chat_prompt_text() -> None:
    assert count_tokens("  a b\nc ") == 3
    parts: list[dict[str, Any]] = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "one two"},
                {"type": "image_url", "image_url": {"url": "x"}},
            ],
        },
        {"role": "assistant", "content": None},
    ]
    assert chat_prompt_text(parts) == "one two"


def test_embedding_vector_is_unit_and_deterministic() -> None:
    v = embedding_vector("abc", 16, seed=1)
    assert len(v) == 16
    assert math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-9)
    assert v == embedding_vector("abc", 16, seed=1)
    assert v != embedding_vector("abd", 16, seed=1)


def test_decode_step_grows_with_batch() -> None:
    config = SimConfig(tpot_ms=10, batch_slowdown=0.5)
    assert config.decode_step_s(1) == pytest.approx(0.010)
    assert config.decode_step_s(3) == pytest.approx(0.020)
    assert SimConfig(model="m", aliases=("a", "m", "b")).served_names == ("m", "a", "b")


async def test_admission_queue_is_fifo_and_finish_withdraws() -> None:
    queue = AdmissionQueue(1)
    first, second, third = queue.enqueue(), queue.enqueue(), queue.enqueue()
    assert first.done() and not second.done() and not third.done()
    assert (queue.running, queue.waiting) == (1, 2)
    queue.finish(second)  # gives up while waiting
    assert queue.waiting == 1
    queue.finish(first)
    assert third.done() and (queue.running, queue.waiting) == (1, 0)
    queue.finish(third)
    assert (queue.running, queue.waiting) == (0, 0)


# -- chat ------------------------------------------------------------------------------


async def test_chat_non_stream_matches_expected_text(sim: httpx.AsyncClient) -> None:
    response = await sim.post(
        "/v1/chat/completions", json={"model": "sim", "messages": MESSAGES, "max_tokens": 7}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == "sim"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == expected_text(PROMPT, 7, 0)
    assert choice["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["prompt_tokens"] == count_tokens(PROMPT) == 8
    assert usage["completion_tokens"] == 7 and usage["total_tokens"] == 15


async def test_chat_defaults_model_and_max_tokens(sim: httpx.AsyncClient) -> None:
    response = await sim.post("/v1/chat/completions", json={"messages": MESSAGES})
    content = response.json()["choices"][0]["message"]["content"]
    assert content == expected_text(PROMPT, 16, 0)


async def test_chat_seed_and_stop(sim: httpx.AsyncClient) -> None:
    seeded = await sim.post(
        "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 5, "seed": 42}
    )
    assert seeded.json()["choices"][0]["message"]["content"] == expected_text(PROMPT, 5, 42)
    stop_word = generate(PROMPT, 10, 0).pieces[4].strip()
    stopped = await sim.post(
        "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 10, "stop": stop_word}
    )
    choice = stopped.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop_word
    assert choice["message"]["content"] == expected_text(PROMPT, 10, 0, stop=[stop_word])


async def test_chat_stream_chunk_sequence(sim: httpx.AsyncClient) -> None:
    response = await sim.post(
        "/v1/chat/completions",
        json={
            "model": "sim",
            "messages": MESSAGES,
            "max_tokens": 6,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_payloads(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "sim" for c in chunks)
    first = chunks[0]["choices"][0]
    assert first["delta"] == {"role": "assistant", "content": ""}
    assert first["finish_reason"] is None
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 8, "completion_tokens": 6, "total_tokens": 14}
    content_chunks = chunks[1:-1]
    assert len(content_chunks) == 6  # one per token
    text = "".join(c["choices"][0]["delta"]["content"] for c in content_chunks)
    assert text == expected_text(PROMPT, 6, 0)
    assert [c["choices"][0]["finish_reason"] for c in content_chunks] == [None] * 5 + ["length"]


async def test_chat_stream_without_usage(sim: httpx.AsyncClient) -> None:
    response = await sim.post(
        "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2, "stream": True}
    )
    events = sse_payloads(response.text)
    assert events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"


# -- completions -----------------------------------------------------------------------


async def test_completions_non_stream(sim: httpx.AsyncClient) -> None:
    response = await sim.post(
        "/v1/completions", json={"model": "sim", "prompt": "once upon a time", "max_tokens": 9}
    )
    body = response.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == expected_text("once upon a time", 9, 0)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == 4 and body["usage"]["completion_tokens"] == 9


async def test_completions_prompt_list_gives_one_choice_each(sim: httpx.AsyncClient) -> None:
    response = await sim.post("/v1/completions", json={"prompt": ["a b", "c"], "max_tokens": 3})
    body = response.json()
    assert [c["text"] for c in body["choices"]] == [expected_text("a b", 3), expected_text("c", 3)]
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 6,
        "total_tokens": 9,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }


async def test_completions_stream(sim: httpx.AsyncClient) -> None:
    response = await sim.post(
        "/v1/completions",
        json={
            "prompt": "stream me",
            "max_tokens": 4,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    events = sse_payloads(response.text)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4
    chunks = events[:-2]
    assert all(c["id"].startswith("cmpl-") and c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected_text("stream me", 4)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


# -- models, health, metrics -----------------------------------------------------------


async def test_models_lists_served_names() -> None:
    async with make_client(SimConfig(model="m1", aliases=("alias",), max_model_len=1024)) as c:
        body = (await c.get("/v1/models")).json()
        assert body["object"] == "list"
        assert [m["id"] for m in body["data"]] == ["m1", "alias"]
        assert all(m["owned_by"] == "sage-sim" and m["max_model_len"] == 1024 for m in body["data"])
        aliased = await c.post("/v1/completions", json={"model": "alias", "prompt": "x"})
        assert aliased.status_code == 200 and aliased.json()["model"] == "alias"


async def test_health(sim: httpx.AsyncClient) -> None:
    response = await sim.get("/health")
    assert response.status_code == 200 and response.content == b""


async def test_metrics_names_and_counters_move(sim: httpx.AsyncClient) -> None:
    before = await scrape(sim)
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:num_requests_waiting_by_reason",
        "vllm:kv_cache_usage_perc",
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:request_time_per_output_token_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:request_success_total",
    ):
        assert name in before, name
    # names vLLM 0.32 no longer exports are gone, so nothing can lean on them by mistake
    assert "vllm:gpu_cache_usage_perc" not in before
    assert "vllm:time_per_output_token_seconds" not in before
    # every series carries vLLM's labels, in vLLM's (sorted) order
    assert 'vllm:num_requests_running{engine="0",model_name="sim"} 0.0' in before
    await sim.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 5})
    await sim.post("/v1/completions", json={"prompt": "a b c", "max_tokens": 2, "stream": True})
    after = await scrape(sim)

    def delta(sample: str, **labels: str) -> float:
        return metric(after, sample, **labels) - metric(before, sample, **labels)

    assert delta("vllm:request_success_total", finished_reason="length") == 2
    assert delta("vllm:prompt_tokens_total") == 8 + 3
    assert delta("vllm:generation_tokens_total") == 5 + 2
    assert delta("vllm:time_to_first_token_seconds_count") == 2
    assert delta("vllm:request_time_per_output_token_seconds_count") == 2
    # one inter-token gap per token after the first: (5 - 1) + (2 - 1)
    assert delta("vllm:inter_token_latency_seconds_count") == 4 + 1
    assert delta("vllm:e2e_request_latency_seconds_count") == 2
    assert metric(after, "vllm:num_requests_running") == 0


async def test_each_app_has_its_own_registry() -> None:
    async with make_client() as a, make_client() as b:
        await a.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert metric(await scrape(a), "vllm:request_success_total", finished_reason="length") == 1
        assert metric(await scrape(b), "vllm:request_success_total", finished_reason="length") == 0


# -- errors ----------------------------------------------------------------------------

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (CHAT, {}, "body.messages"),
        (CHAT, {"messages": "hello"}, "body.messages"),
        (CHAT, {"messages": []}, "messages"),
        # a message that fails the request model's shape is a schema error, as in vLLM
        (CHAT, {"messages": ["hi"]}, "body.messages.0"),
        (CHAT, {"messages": [{"content": "hi"}]}, "body.messages.0.role"),
        (CHAT, {"messages": [{"role": "user", "content": 5}]}, "body.messages.0.content"),
        (CHAT, {"messages": [{"role": "user"}]}, "messages[0].content"),
        (CHAT, {"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        (CHAT, {"messages": MESSAGES, "max_tokens": "five"}, "body.max_tokens"),
        (CHAT, {"messages": MESSAGES, "max_tokens": 2.5}, "body.max_tokens"),
        (CHAT, {"messages": MESSAGES, "max_tokens": True}, "body.max_tokens"),
        (CHAT, {"messages": MESSAGES, "max_completion_tokens": -1}, "max_completion_tokens"),
        (CHAT, {"messages": MESSAGES, "temperature": "hot"}, "body.temperature"),
        (CHAT, {"messages": MESSAGES, "stream": "maybe"}, "body.stream"),
        (CHAT, {"messages": MESSAGES, "stop": 3}, "body.stop"),
        (CHAT, {"messages": MESSAGES, "seed": "x"}, "body.seed"),
        (CHAT, {"messages": MESSAGES, "model": 7}, "model"),
        (CHAT, {"messages": MESSAGES, "max_tokens": 5000}, "max_tokens"),
        (COMPLETIONS, {}, "prompt"),
        (COMPLETIONS, {"prompt": 5}, "prompt"),
        (COMPLETIONS, {"prompt": []}, "prompt"),
        (COMPLETIONS, {"prompt": "x", "max_tokens": -3}, "max_tokens"),
        (COMPLETIONS, {"prompt": "x", "stream": 2}, "body.stream"),
    ],
)
async def test_validation_errors_name_the_field(
    sim: httpx.AsyncClient, path: str, body: dict[str, Any], param: str
) -> None:
    response = await sim.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    # vLLM's ErrorResponse: pydantic's schema errors ("body.<field>") are typed with the
    # status phrase, the serving code's own checks with the error class
    kind = "Bad Request" if param.startswith("body.") else "BadRequestError"
    assert error["type"] == kind and error["code"] == 400, error
    assert error["param"] == param
    field = param.removeprefix("body.").split("[")[0]
    assert field in error["message"] or "context length" in error["message"]


@pytest.mark.parametrize(
    "extra",
    [
        {"max_tokens": "3"},
        {"stream": "yes", "stream_options": {"include_usage": True}},
        {"stream": 1},
        {"temperature": "0.5"},
        {"temperature": 3},  # OpenAI caps it at 2, vLLM does not
        {"messages": [{"role": "narrator", "content": "a b c"}]},
        {"some_vendor_field": {"x": [1]}},
    ],
    ids=str,
)
async def test_what_vllms_lax_request_model_accepts_is_accepted(
    sim: httpx.AsyncClient, extra: dict[str, Any]
) -> None:
    response = await sim.post(CHAT, json={"messages": MESSAGES, "max_tokens": 3, **extra})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b""])
async def test_malformed_body_is_400(sim: httpx.AsyncClient, raw: bytes) -> None:
    response = await sim.post(CHAT, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "BadRequestError"


async def test_unknown_model_is_404(sim: httpx.AsyncClient) -> None:
    for path, body in ((CHAT, {"messages": MESSAGES}), (COMPLETIONS, {"prompt": "x"})):
        response = await sim.post(path, json={**body, "model": "gpt-9"})
        assert response.status_code == 404
        error = response.json()["error"]
        assert error["code"] == 404 and error["type"] == "NotFoundError"
        assert error["param"] == "model"
        assert error["message"] == "The model `gpt-9` does not exist. Valid aliases: sim."


# -- embeddings ------------------------------------------------------------------------


async def test_embeddings_when_enabled() -> None:
    async with make_client(SimConfig(embedding_dim=8, seed=5)) as client:
        response = await client.post("/v1/embeddings", json={"model": "sim", "input": ["a b", "c"]})
        assert response.status_code == 200
        body = response.json()
        assert [d["index"] for d in body["data"]] == [0, 1]
        assert body["data"][0]["embedding"] == embedding_vector("a b", 8, 5)
        assert body["usage"]["prompt_tokens"] == 3
        packed = await client.post(
            "/v1/embeddings", json={"input": "a b", "encoding_format": "base64"}
        )
        raw = base64.b64decode(packed.json()["data"][0]["embedding"])
        floats = struct.unpack("<8f", raw)
        assert floats == pytest.approx(embedding_vector("a b", 8, 5), rel=1e-6)
        bad = await client.post("/v1/embeddings", json={"input": []})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "input"


async def test_embeddings_absent_by_default(sim: httpx.AsyncClient) -> None:
    response = await sim.post("/v1/embeddings", json={"input": "x"})
    assert response.status_code == 404


# -- latency model ---------------------------------------------------------------------


async def test_second_request_waits_for_the_only_slot() -> None:
    config = SimConfig(ttft_ms=50, tpot_ms=10, max_num_seqs=1)
    async with make_client(config) as client:
        finished: dict[str, float] = {}
        seen_waiting: list[float] = []
        seen_running: list[float] = []

        async def ask(name: str) -> None:
            response = await client.post(COMPLETIONS, json={"prompt": name, "max_tokens": 5})
            assert response.status_code == 200
            finished[name] = time.perf_counter()

        async def watch() -> None:
            while len(finished) < 2:
                text = await scrape(client)
                seen_waiting.append(metric(text, "vllm:num_requests_waiting"))
                seen_running.append(metric(text, "vllm:num_requests_running"))
                await asyncio.sleep(0.005)

        first = asyncio.create_task(ask("first"))
        await asyncio.sleep(0.005)  # "first" is admitted before "second" arrives
        await asyncio.gather(first, ask("second"), watch())

        assert finished["first"] < finished["second"]
        # The second starts only once the first is done: its own ttft + 4 decode steps follow.
        assert finished["second"] - finished["first"] >= 0.8 * (0.050 + 4 * 0.010)
        assert max(seen_waiting) == 1 and max(seen_running) == 1
        text = await scrape(client)
        assert metric(text, "vllm:num_requests_waiting") == 0
        assert metric(text, "vllm:request_queue_time_seconds_sum") >= 0.04


async def test_batch_slowdown_stretches_decoding() -> None:
    config = SimConfig(tpot_ms=20, batch_slowdown=1.0, max_num_seqs=8)
    async with make_client(config) as client:
        body = {"prompt": "x", "max_tokens": 6}

        async def alone() -> float:
            started = time.perf_counter()
            await client.post(COMPLETIONS, json=body)
            return time.perf_counter() - started

        # The quickest of three lone runs: a stall on a busy machine only ever lengthens
        # one, and a single lengthened lone run could reach 3 batched runs' 1.5x (3x here).
        lone = min([await alone() for _ in range(3)])
        started = time.perf_counter()
        await asyncio.gather(*(client.post(COMPLETIONS, json=body) for _ in range(3)))
        together = time.perf_counter() - started
        assert lone >= 0.8 * 5 * 0.020
        assert together > 1.5 * lone, (together, lone)


async def test_zero_latency_path_is_fast(sim: httpx.AsyncClient) -> None:
    started = time.perf_counter()
    response = await sim.post(CHAT, json={"messages": MESSAGES, "max_tokens": 2000, "stream": True})
    assert response.status_code == 200
    assert time.perf_counter() - started < 2.0


async def _asgi_call_with_disconnect(app: Any, body: dict[str, Any], leave_after: float) -> None:
    """Drive the ASGI app as a server would, with a client that hangs up mid-answer."""
    payload = orjson.dumps(body)
    delivered = False
    hang_up = asyncio.Event()
    asyncio.get_running_loop().call_later(leave_after, hang_up.set)

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await hang_up.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        return None  # a gone client's writes go nowhere, as with uvicorn

    scope = {
        "type": "http",
        "method": "POST",
        "path": COMPLETIONS,
        "headers": [],
        "query_string": b"",
    }
    await asyncio.wait_for(app(scope, receive, send), timeout=2.0)


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_frees_the_slot(stream: bool) -> None:
    app = create_app(SimConfig(ttft_ms=10, tpot_ms=10, max_num_seqs=1))
    long_answer = {"prompt": "x", "max_tokens": 1000, "stream": stream}  # 10 s if not freed
    # A second request queued behind the first, whose client also leaves.
    await asyncio.gather(
        _asgi_call_with_disconnect(app, long_answer, 0.05),
        _asgi_call_with_disconnect(app, long_answer, 0.03),
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://sim"
    ) as client:
        text = await scrape(client)
        assert metric(text, "vllm:num_requests_running") == 0
        assert metric(text, "vllm:num_requests_waiting") == 0
        assert metric(text, "vllm:request_success_total", finished_reason="length") == 0
        response = await client.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 2})
        assert response.status_code == 200


# -- command line ----------------------------------------------------------------------


def test_main_rejects_bad_config() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--max-num-seqs", "0"])
    assert exc.value.code == 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_cli_serves_streaming_chat_and_stops_on_sigterm() -> None:
    port = _free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT / "src"), env.get("PYTHONPATH", "")) if p
    )
    command = [
        sys.executable,
        "-m",
        "sage.engines.sim",
        "--port",
        str(port),
        "--model",
        "sim-cli",
        "--served-model-name",
        "alias",
        "--tpot-ms",
        "1",
    ]
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        try:
            base = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=base, timeout=5.0) as client:
                deadline = time.monotonic() + 30
                while True:
                    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                    try:
                        if client.get("/health").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    assert time.monotonic() < deadline, "sim engine did not become healthy"
                    time.sleep(0.1)
                request = {"model": "alias", "messages": MESSAGES, "max_tokens": 4, "stream": True}
                with client.stream("POST", "/v1/chat/completions", json=request) as response:
                    assert response.status_code == 200
                    lines = [line for line in response.iter_lines() if line]
            events = [line.removeprefix("data: ") for line in lines]
            assert events[-1] == "[DONE]"
            chunks = [orjson.loads(e) for e in events[:-1]]
            assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
            text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
            assert text == expected_text(PROMPT, 4, 0)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:  # pragma: no cover - only on failure
                proc.kill()
                proc.wait()
        assert proc.returncode == 0
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        assert "sim engine listening" in stderr and f":{port}" in stderr


async def test_stream_flag_is_read_as_pydantic_reads_it(sim: httpx.AsyncClient) -> None:
    # vLLM's request model is pydantic in lax mode: "yes" streams, "no" does not.
    streamed = await sim.post(CHAT, json={"messages": MESSAGES, "stream": "yes", "max_tokens": 2})
    assert streamed.status_code == 200 and streamed.text.startswith("data: "), streamed.text
    plain = await sim.post(CHAT, json={"messages": MESSAGES, "stream": "no", "max_tokens": 2})
    assert plain.json()["object"] == "chat.completion"
