"""The edge as a real uvicorn server in front of a real scheduler and a simulator engine."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from sage.rpc.common.v1 import common_pb2
from sage.rpc.scheduler.v1 import scheduler_pb2


@dataclass
class Stack:
    """The edge client plus what tests need to look behind it."""

    client: httpx.AsyncClient
    stub: Any
    slow_engine: str


@pytest.fixture
async def gateway(stack: Stack) -> httpx.AsyncClient:
    """An HTTP client for the edge."""
    return stack.client


@pytest.fixture(scope="module")
def engines(module_sim_engine: Callable[..., str]) -> dict[str, str]:
    """Two sim engines for `sim` (alias `sim-alias`) and a slow one, shared by the module."""
    return {
        "sim-a": module_sim_engine("--served-model-name", "sim-alias"),
        "sim-b": module_sim_engine("--served-model-name", "sim-alias"),
        "slow-a": module_sim_engine("--tpot-ms", "20", model="slow"),
    }


@pytest.fixture
async def stack(control_plane: Any, engines: dict[str, str]) -> Stack:
    """The control plane with the module's engines registered."""
    for engine_id in ("sim-a", "sim-b"):
        await control_plane.register(
            engine_id,
            "sim",
            engines[engine_id],
            aliases=["sim-alias"],
            state=common_pb2.ENGINE_STATE_READY,
        )
    await control_plane.register("slow-a", "slow", engines["slow-a"])
    return Stack(control_plane.client, control_plane.scheduler, engines["slow-a"])


CHAT = {"model": "sim", "messages": [{"role": "user", "content": "写一份日报"}], "max_tokens": 6}


async def test_chat_round_robins_over_engines(gateway: httpx.AsyncClient) -> None:
    ids = set()
    for _ in range(4):
        resp = await gateway.post("/v1/chat/completions", json=CHAT)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["object"] == "chat.completion"
        assert len(body["choices"][0]["message"]["content"].split()) == 6
        assert resp.headers["x-request-id"]
        ids.add(body["id"])
    assert len(ids) == 4
    status = (await gateway.get("/health")).json()
    assert status == {"status": "ok", "engines_ready": 3}


async def test_alias_reaches_engine(gateway: httpx.AsyncClient) -> None:
    resp = await gateway.post("/v1/chat/completions", json={**CHAT, "model": "sim-alias"})
    assert resp.status_code == 200, resp.text
    models = {m["id"] for m in (await gateway.get("/v1/models")).json()["data"]}
    assert models == {"sim", "sim-alias", "slow"}


async def test_stream_is_forwarded_chunk_by_chunk(gateway: httpx.AsyncClient) -> None:
    events: list[bytes] = []
    async with gateway.stream(
        "POST",
        "/v1/chat/completions",
        json={**CHAT, "stream": True, "stream_options": {"include_usage": True}},
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        async for line in resp.aiter_lines():
            if line:
                events.append(line.encode())
    assert events[-1] == b"data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert len(text.split()) == 6
    assert chunks[-1]["usage"]["completion_tokens"] == 6


async def test_request_id_is_echoed(gateway: httpx.AsyncClient) -> None:
    resp = await gateway.post(
        "/v1/chat/completions", json=CHAT, headers={"x-request-id": "req-123"}
    )
    assert resp.headers["x-request-id"] == "req-123"


BAD_INPUTS: list[tuple[Any, int, str | None, str]] = [
    (b"{not json", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "JSON object"),
    ({"model": "sim"}, 400, "messages", "messages is required"),
    ({"model": "sim", "messages": "hi"}, 400, "messages", "array"),
    ({"model": "sim", "messages": []}, 400, "messages", "empty"),
    ({"model": "sim", "messages": [{"content": "x"}]}, 400, "messages[0].role", "role"),
    (
        {"model": "sim", "messages": [{"role": "user", "content": 5}]},
        400,
        "messages[0].content",
        "string",
    ),
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "model", "model is required"),
    ({"model": 7, "messages": [{"role": "user", "content": "x"}]}, 400, "model", "string"),
    ({**CHAT, "max_tokens": "ten"}, 400, "max_tokens", "positive integer"),
    ({**CHAT, "temperature": "hot"}, 400, "temperature", "number"),
    ({**CHAT, "stream": "yes"}, 400, "stream", "boolean"),
    ({**CHAT, "model": "no-such-model"}, 404, "model", "no-such-model"),
    ({**CHAT, "model": "no-such-model", "stream": True}, 404, "model", "no-such-model"),
]


@pytest.mark.parametrize(("payload", "status", "param", "needle"), BAD_INPUTS)
async def test_bad_input_gets_openai_error_naming_the_field(
    gateway: httpx.AsyncClient, payload: Any, status: int, param: str | None, needle: str
) -> None:
    if isinstance(payload, bytes):
        resp = await gateway.post(
            "/v1/chat/completions", content=payload, headers={"content-type": "application/json"}
        )
    else:
        resp = await gateway.post("/v1/chat/completions", json=payload)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert needle in error["message"]
    assert error["type"] == "invalid_request_error"
    # ... and the gateway keeps serving.
    ok = await gateway.post("/v1/chat/completions", json=CHAT)
    assert ok.status_code == 200


async def test_unknown_route_and_method(gateway: httpx.AsyncClient) -> None:
    resp = await gateway.get("/v1/nope")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "unknown_url"
    resp = await gateway.get("/v1/chat/completions")
    assert resp.status_code == 405 and "POST" in resp.headers["allow"]


async def test_completions(gateway: httpx.AsyncClient) -> None:
    resp = await gateway.post(
        "/v1/completions", json={"model": "sim", "prompt": "hello", "max_tokens": 3}
    )
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["choices"][0]["text"].split()) == 3
    bad = await gateway.post("/v1/completions", json={"model": "sim"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"


def _running(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith("vllm:num_requests_running{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("vllm:num_requests_running missing")


async def test_client_disconnect_frees_the_engine(stack: Stack) -> None:
    """Closing a stream mid-way must stop generation on the engine, not let it run on."""
    body = {
        "model": "slow",
        "stream": True,
        "max_tokens": 500,
        "messages": [{"role": "user", "content": "long"}],
    }
    async with httpx.AsyncClient(trust_env=False) as engine:
        async with stack.client.stream("POST", "/v1/chat/completions", json=body) as resp:
            lines = resp.aiter_lines()
            while not (await lines.__anext__()).startswith("data:"):
                pass
            running = _running((await engine.get(stack.slow_engine + "/metrics")).text)
            assert running == 1
        # 500 tokens x 20 ms = 10 s if nobody cancels; the engine must be idle long before.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if _running((await engine.get(stack.slow_engine + "/metrics")).text) == 0:
                break
            await asyncio.sleep(0.05)
        assert _running((await engine.get(stack.slow_engine + "/metrics")).text) == 0


async def test_dead_engine_is_failed_over_or_reported(stack: Stack) -> None:
    """An engine that refuses connections is failed over; with none left, a 5xx JSON error."""
    await stack.stub.RegisterEngine(
        scheduler_pb2.RegisterEngineRequest(
            engine=common_pb2.Engine(
                engine_id="dead-a",
                model="dead",
                kind=common_pb2.ENGINE_KIND_LLM,
                base_url="http://127.0.0.1:1",
            )
        )
    )
    resp = await stack.client.post("/v1/chat/completions", json={**CHAT, "model": "dead"})
    assert resp.status_code == 502
    assert resp.json()["error"]["code"] == "engine_unreachable"
    # the same model with a live engine beside the dead one: every request succeeds
    await stack.stub.RegisterEngine(
        scheduler_pb2.RegisterEngineRequest(
            engine=common_pb2.Engine(
                engine_id="live-for-dead",
                model="slow",
                kind=common_pb2.ENGINE_KIND_LLM,
                base_url=stack.slow_engine,
                aliases=["dead"],
            )
        )
    )
    for _ in range(4):
        ok = await stack.client.post(
            "/v1/chat/completions", json={**CHAT, "model": "dead", "max_tokens": 1}
        )
        assert ok.status_code == 200, ok.text
