"""OpenAI's Responses API (POST /v1/responses) with the official openai SDK through the real
edge and scheduler to simulator engines: replies and event streams, the tenant's limits,
failover before the first byte, and errors in OpenAI's shape."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from sage.common.config.settings import SageSettings
from sage.common.http.testing import RecordingEngine

KEY = "sk-resp"
AUTH = {"authorization": f"Bearer {KEY}"}
LIMITED_KEY = "sk-resp-limited"


@pytest.fixture
def settings(settings: SageSettings, tmp_path: Path) -> SageSettings:
    """An unlimited key and one allowed a single request a minute."""
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(
        yaml.safe_dump([{"key": LIMITED_KEY, "tenant": "limited", "rate_limit_rpm": 1}])
    )
    return settings.model_copy(update={"api_keys": f"{KEY}:resp", "api_keys_file": keys_file})


@pytest.fixture(scope="module")
def engine(module_sim_engine: Callable[..., str]) -> str:
    return module_sim_engine()


@pytest.fixture
async def base_url(control_plane: Any, engine: str) -> str:
    await control_plane.register("sim-0", "sim", engine)
    return str(control_plane.client.base_url).rstrip("/") + "/v1"


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=base_url, api_key=KEY, max_retries=0) as sdk:
        yield sdk


async def test_reply_with_text_and_usage(client: openai.AsyncOpenAI) -> None:
    reply = await client.responses.create(
        model="sim", input="write a short report", instructions="be brief", max_output_tokens=5
    )
    assert reply.object == "response"
    assert reply.status == "incomplete"  # cut at max_output_tokens, as vLLM reports it
    assert len(reply.output_text.split()) == 5
    assert reply.output[0].type == "message"
    assert reply.usage is not None
    assert reply.usage.output_tokens == 5
    assert reply.usage.total_tokens == reply.usage.input_tokens + 5


async def test_input_items_and_stream_of_events(client: openai.AsyncOpenAI) -> None:
    stream = await client.responses.create(
        model="sim",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "hello there"}]}],
        max_output_tokens=4,
        stream=True,
    )
    kinds: list[str] = []
    deltas = ""
    final: Any = None
    async for event in stream:
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            deltas += event.delta
        if event.type == "response.completed":
            final = event.response
    assert kinds[0] == "response.created"
    assert kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 4
    assert final is not None and final.output_text == deltas
    assert len(deltas.split()) == 4


async def test_events_are_named_and_stream_has_no_done(control_plane: Any, base_url: str) -> None:
    body = {"model": "sim", "input": "hi", "max_output_tokens": 2, "stream": True}
    headers = {"authorization": f"Bearer {KEY}", "x-sage-priority": "high"}
    async with control_plane.client.stream(
        "POST", "/v1/responses", json=body, headers=headers
    ) as reply:
        assert reply.status_code == 200
        text = (await reply.aread()).decode()
    events = [block for block in text.split("\n\n") if block.strip()]
    names = [block.split("\n")[0] for block in events]
    assert names[0] == "event: response.created"
    assert names[-1] == "event: response.completed"
    assert "[DONE]" not in text


async def test_tenant_limits_apply(base_url: str) -> None:
    async with openai.AsyncOpenAI(base_url=base_url, api_key=LIMITED_KEY, max_retries=0) as sdk:
        await sdk.responses.create(model="sim", input="one", max_output_tokens=1)
        with pytest.raises(openai.RateLimitError):
            await sdk.responses.create(model="sim", input="two", max_output_tokens=1)


@pytest.mark.parametrize("stream", [False, True])
async def test_fails_over_before_the_first_byte(
    control_plane: Any, engine: str, port_factory: Callable[[], int], stream: bool
) -> None:
    # An engine that refuses connections besides a live one: every request still completes.
    await control_plane.register("dead-0", "sim", f"http://127.0.0.1:{port_factory()}")
    await control_plane.register("sim-0", "sim", engine)
    base_url = str(control_plane.client.base_url).rstrip("/") + "/v1"
    async with openai.AsyncOpenAI(base_url=base_url, api_key=KEY, max_retries=0) as sdk:
        for _ in range(3):
            if stream:
                events = await sdk.responses.create(
                    model="sim", input="x", max_output_tokens=2, stream=True
                )
                kinds = [event.type async for event in events]
                assert kinds[-1] == "response.completed"
            else:
                reply = await sdk.responses.create(model="sim", input="x", max_output_tokens=2)
                assert len(reply.output_text.split()) == 2
    metrics = (await control_plane.client.get("/metrics", headers=AUTH)).text
    moved = dict(
        re.findall(r'^sage:scheduler_failovers_total\{kind="(\w+)"\} (\S+)$', metrics, re.M)
    )
    assert float(moved.get("stream_start" if stream else "unary", 0)) >= 1  # dead-0 was tried


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "sim", "input": 5}, "input"),
        ({"model": "sim", "input": []}, "input"),
        ({"model": "sim", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": "sim", "input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ],
)
async def test_bad_input_is_400_naming_the_field(
    client: openai.AsyncOpenAI, body: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.post("/responses", body=body, cast_to=httpx.Response)
    assert caught.value.param == param


async def test_unknown_model_is_404(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.responses.create(model="no-such-model", input="x")
    assert "no-such-model" in caught.value.message


async def test_without_a_key_is_401(base_url: str) -> None:
    async with openai.AsyncOpenAI(base_url=base_url, api_key="wrong", max_retries=0) as sdk:
        with pytest.raises(openai.AuthenticationError):
            await sdk.responses.create(model="sim", input="x")


async def test_engine_without_the_route_is_404_naming_it(control_plane: Any) -> None:
    async with RecordingEngine() as recorder:
        await control_plane.register("rec-a", "rec", recorder.base_url)
        for stream in (False, True):
            reply = await control_plane.client.post(
                "/v1/responses",
                json={"model": "rec", "input": "x", "stream": stream},
                headers={"authorization": f"Bearer {KEY}"},
            )
            assert reply.status_code == 404, reply.text
            message = reply.json()["error"]["message"]
            assert "rec-a" in message and "/v1/responses" in message
