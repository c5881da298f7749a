"""OpenAI's Responses API (POST /v1/responses) with the official openai SDK and our clients'
responses() through the real edge and scheduler to simulator engines: replies and event
streams, the tenant's limits, failover before the first byte, and errors in OpenAI's shape."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import yaml

from sage.common.config.settings import SageSettings
from sage.common.exceptions import ModelNotFoundError, NotFoundError, SageError
from sage.common.http.asgi import Request, StreamingResponse, sse_event
from sage.common.http.testing import RecordingEngine
from sage.llm import (
    AsyncUnifiedInferenceClient,
    ResponseEvent,
    ResponsesResult,
    UnifiedInferenceClient,
)

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


ITEMS = [{"role": "user", "content": [{"type": "input_text", "text": "hello there"}]}]


def _check_events(events: list[ResponseEvent], final: ResponsesResult | None, tokens: int) -> None:
    """A whole event stream: created first, completed last with the deltas' text."""
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(event.delta or "" for event in events)
    assert len(deltas.split()) == tokens
    assert final is not None and final is events[-1].response
    assert final.output_text == deltas and final.usage is not None
    assert final.usage.output_tokens == tokens


async def test_clients_responses_reply_and_event_stream(base_url: str) -> None:
    def sync_calls() -> tuple[ResponsesResult, list[ResponseEvent], ResponsesResult | None, str]:
        with UnifiedInferenceClient.create(control_plane_url=base_url, api_key=KEY) as client:
            reply = client.responses(
                "write a short report",
                model="sim",
                instructions="be brief",
                max_output_tokens=5,
                temperature=0,
            )
            with client.responses(ITEMS, model="sim", max_output_tokens=4, stream=True) as stream:
                events = list(stream)
            return reply, events, stream.response, stream.output_text

    reply, events, final, text = await asyncio.to_thread(sync_calls)
    assert reply.status == "incomplete" and reply.incomplete_reason == "max_output_tokens"
    assert len(reply.output_text.split()) == 5 and str(reply) == reply.output_text
    assert reply.output[0]["type"] == "message" and reply.id.startswith("resp")
    assert reply.usage is not None
    assert reply.usage.total_tokens == reply.usage.input_tokens + 5
    assert reply.raw["instructions"] == "be brief"
    assert reply.raw["temperature"] == 0  # 0 is sent, not dropped as "not given"
    _check_events(events, final, 4)
    assert final is not None and text == final.output_text

    async with AsyncUnifiedInferenceClient.create(
        control_plane_url=base_url, api_key=KEY, default_llm_model="sim"
    ) as aclient:
        again = await aclient.responses(
            "write a short report", instructions="be brief", max_output_tokens=5, temperature=0
        )
        assert again.output_text == reply.output_text  # the sim is deterministic
        astream = await aclient.responses(ITEMS, max_output_tokens=4, stream=True)
        assert astream.request_id
        aevents = [event async for event in astream]
        _check_events(aevents, astream.response, 4)
        assert [e.delta for e in aevents] == [e.delta for e in events]


async def test_clients_name_an_engine_without_the_route(control_plane: Any, base_url: str) -> None:
    async with RecordingEngine() as recorder:
        await control_plane.register("rec-a", "rec", recorder.base_url)

        def sync_calls() -> list[str]:
            messages: list[str] = []
            with UnifiedInferenceClient.create(control_plane_url=base_url, api_key=KEY) as client:
                for stream in (False, True):
                    with pytest.raises(NotFoundError) as caught:
                        client.responses("x", model="rec", stream=stream)
                    messages.append(caught.value.message)
            return messages

        messages = await asyncio.to_thread(sync_calls)
        async with AsyncUnifiedInferenceClient.create(
            control_plane_url=base_url, api_key=KEY
        ) as aclient:
            for stream in (False, True):
                with pytest.raises(NotFoundError) as caught:
                    await aclient.responses("x", model="rec", stream=stream)
                messages.append(caught.value.message)
            with pytest.raises(ModelNotFoundError):
                await aclient.responses("x", model="no-such-model")
    for message in messages:
        assert "rec-a" in message and "/v1/responses" in message, message


async def test_engine_breaking_mid_stream_raises_from_the_clients_stream(
    control_plane: Any,
) -> None:
    created = {"type": "response.created", "sequence_number": 0, "response": {"id": "resp_1"}}

    async def broken(request: Request) -> StreamingResponse:
        async def events() -> AsyncIterator[bytes]:
            yield b"event: response.created\n" + sse_event(orjson.dumps(created))
            raise RuntimeError("the engine died")  # uvicorn drops the connection

        return StreamingResponse(events())

    async with RecordingEngine() as recorder:
        recorder.app.add("POST", "/v1/responses", broken)
        await control_plane.register("rec-a", "rec", recorder.base_url)
        base_url = str(control_plane.client.base_url).rstrip("/") + "/v1"
        async with AsyncUnifiedInferenceClient.create(
            control_plane_url=base_url, api_key=KEY, max_retries=0
        ) as aclient:
            stream = await aclient.responses("x", model="rec", stream=True)
            first = await anext(stream)
            assert first.type == "response.created"
            with pytest.raises(SageError) as caught:
                await anext(stream)
    # The edge's Responses `error` event, read back: its code and the engine it names.
    assert stream.response is None
    assert caught.value.code == "engine_disconnected"
    assert "rec-a" in caught.value.message
