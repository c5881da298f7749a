"""POST /v1/messages (Anthropic's Messages API) with the official `anthropic` SDK through the
real edge and scheduler to sim engines: replies, Anthropic's event stream, failover, and
errors in Anthropic's shape."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
import yaml

from sage.common.config.settings import SageSettings
from sage.common.http.testing import RecordingEngine

KEY = "sk-messages"
LIMITED_KEY = "sk-messages-limited"
HELLO = [{"role": "user", "content": "say something about the weather"}]


@pytest.fixture
def settings(settings: SageSettings, tmp_path: Path) -> SageSettings:
    """An unlimited key and one allowed a single request a minute."""
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(
        yaml.safe_dump([{"key": LIMITED_KEY, "tenant": "limited", "rate_limit_rpm": 1}])
    )
    return settings.model_copy(update={"api_keys": KEY, "api_keys_file": keys_file})


@pytest.fixture(scope="module")
def engine(module_sim_engine: Callable[..., str]) -> str:
    return module_sim_engine()


@pytest.fixture
async def edge(control_plane: Any, engine: str) -> httpx.AsyncClient:
    """The edge with one sim engine of `sim` (alias `sim-alias`)."""
    await control_plane.register("sim-a", "sim", engine, aliases=["sim-alias"])
    client: httpx.AsyncClient = control_plane.client
    return client


def _sdk(edge: httpx.AsyncClient, key: str = KEY) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=str(edge.base_url), api_key=key, max_retries=0)


@pytest.fixture
async def client(edge: httpx.AsyncClient) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with _sdk(edge) as sdk:
        yield sdk


async def test_sdk_create_and_stream(client: anthropic.AsyncAnthropic) -> None:
    message = await client.messages.create(
        model="sim-alias",
        max_tokens=6,
        system="You are terse.",
        messages=HELLO,  # type: ignore[arg-type]
    )
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text" and message.content[0].text
    assert message.stop_reason in ("max_tokens", "end_turn")
    assert message.usage.input_tokens > 0 and 0 < message.usage.output_tokens <= 6

    async with client.messages.stream(
        model="sim",
        max_tokens=5,
        messages=HELLO,  # type: ignore[arg-type]
    ) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert {"content_block_start", "content_block_delta", "content_block_stop"} <= set(kinds)
    assert "message_delta" in kinds
    assert final.content[0].type == "text" and final.content[0].text
    assert 0 < final.usage.output_tokens <= 5 and final.stop_reason is not None

    # stream=True: the raw events, named as Anthropic names them
    events = await client.messages.create(
        model="sim",
        max_tokens=3,
        messages=HELLO,  # type: ignore[arg-type]
        stream=True,
    )
    text = "".join(
        [e.delta.text async for e in events if e.type == "content_block_delta"]  # type: ignore[union-attr]
    )
    assert text


async def test_wire_events_and_bearer_key(edge: httpx.AsyncClient) -> None:
    """The SSE as sent: each event named by its type, no OpenAI [DONE]; a Bearer key works too."""
    body = {"model": "sim", "max_tokens": 3, "messages": HELLO, "stream": True}
    async with edge.stream(
        "POST", "/v1/messages", json=body, headers={"authorization": f"Bearer {KEY}"}
    ) as reply:
        assert reply.status_code == 200
        raw = (await reply.aread()).decode()
    assert "[DONE]" not in raw
    blocks = [b for b in raw.split("\n\n") if b.strip()]
    assert blocks[0].startswith("event: message_start\ndata: ")
    assert blocks[-1].startswith("event: message_stop\ndata: ")


async def test_tenant_limits_apply(edge: httpx.AsyncClient) -> None:
    async with _sdk(edge, LIMITED_KEY) as client:
        await client.messages.create(model="sim", max_tokens=1, messages=HELLO)  # type: ignore[arg-type]
        with pytest.raises(anthropic.RateLimitError) as limited:
            await client.messages.create(model="sim", max_tokens=1, messages=HELLO)  # type: ignore[arg-type]
    assert limited.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]


async def test_fails_over_before_the_first_byte(
    control_plane: Any, engine: str, port_factory: Callable[[], int]
) -> None:
    """An engine that refuses connections: every request still gets its reply elsewhere."""
    await control_plane.register("dead", "sim", f"http://127.0.0.1:{port_factory()}")
    await control_plane.register("sim-a", "sim", engine)
    client = _sdk(control_plane.client)

    async def one(i: int) -> str:
        if i % 2:
            async with client.messages.stream(
                model="sim",
                max_tokens=3,
                messages=HELLO,  # type: ignore[arg-type]
            ) as stream:
                return (await stream.get_final_message()).content[0].text  # type: ignore[union-attr]
        reply = await client.messages.create(
            model="sim",
            max_tokens=3,
            messages=HELLO,  # type: ignore[arg-type]
        )
        return reply.content[0].text  # type: ignore[union-attr]

    try:
        texts = await asyncio.gather(*(one(i) for i in range(6)))
    finally:
        await client.close()
    assert all(texts)
    metrics = (
        await control_plane.client.get("/metrics", headers={"authorization": f"Bearer {KEY}"})
    ).text
    moved = re.findall(r'^sage:scheduler_failovers_total\{kind="(\w+)"\} (\S+)$', metrics, re.M)
    assert sum(float(count) for _, count in moved) >= 1  # the dead engine was tried


async def test_errors_in_anthropics_shape(
    edge: httpx.AsyncClient, client: anthropic.AsyncAnthropic
) -> None:
    with pytest.raises(anthropic.BadRequestError) as bad:
        await client.messages.create(
            model="sim",
            max_tokens=0,
            messages=HELLO,  # type: ignore[arg-type]
        )
    assert bad.value.body["type"] == "error"  # type: ignore[index]
    assert bad.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "max_tokens" in bad.value.body["error"]["message"]  # type: ignore[index]

    with pytest.raises(anthropic.NotFoundError) as missing:
        await client.messages.create(
            model="nope",
            max_tokens=4,
            messages=HELLO,  # type: ignore[arg-type]
        )
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert "nope" in missing.value.body["error"]["message"]  # type: ignore[index]

    with pytest.raises(anthropic.AuthenticationError) as unauthenticated:
        async with _sdk(edge, "sk-wrong") as wrong:
            await wrong.messages.create(
                model="sim",
                max_tokens=4,
                messages=HELLO,  # type: ignore[arg-type]
            )
    assert unauthenticated.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]

    no_key = await edge.post(
        "/v1/messages", json={"model": "sim", "max_tokens": 4, "messages": HELLO}
    )
    assert no_key.status_code == 401
    assert no_key.json()["error"]["type"] == "authentication_error"

    # a bad field is named; so is a bad scheduling header (read as chat reads them)
    for body, headers, field in (
        ({"model": "sim", "messages": HELLO}, {}, "max_tokens"),
        (
            {"model": "sim", "max_tokens": 4, "messages": [{"role": "system", "content": "x"}]},
            {},
            "role",
        ),
        (
            {"model": "sim", "max_tokens": 4, "messages": HELLO},
            {"x-sage-slo-ttft-ms": "soon"},
            "x-sage-slo-ttft-ms",
        ),
    ):
        reply = await edge.post("/v1/messages", json=body, headers={"x-api-key": KEY, **headers})
        assert reply.status_code == 400, reply.text
        error = reply.json()
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
        assert field in error["error"]["message"]


async def test_engine_without_the_route_is_404_naming_it(control_plane: Any) -> None:
    async with RecordingEngine() as recorder:
        await control_plane.register("rec-a", "rec", recorder.base_url)
        reply = await control_plane.client.post(
            "/v1/messages",
            json={"model": "rec", "max_tokens": 4, "messages": HELLO},
            headers={"x-api-key": KEY},
        )
    assert reply.status_code == 404, reply.text
    error = reply.json()["error"]
    assert error["type"] == "not_found_error"
    assert "rec-a" in error["message"] and "/v1/messages" in error["message"]
