"""The official openai SDK (sync and async) against a real stack: edge → scheduler →
simulator engines (chat and embeddings), with API keys and rate limits configured.

The services run in the test's event loop, so sync SDK calls go through asyncio.to_thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from sage.common.config.settings import SageSettings
from sage.common.http.testing import RecordingEngine

KEY = "sk-sdk-unlimited"
LIMITED_KEY = "sk-sdk-limited"
EMBED_DIM = 16


@pytest.fixture
def settings(settings: SageSettings, tmp_path: Path) -> SageSettings:
    """One unlimited key from the environment variable, one limited key from a file."""
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(
        yaml.safe_dump([{"key": LIMITED_KEY, "tenant": "limited", "rate_limit_rpm": 1}])
    )
    return settings.model_copy(update={"api_keys": f"{KEY}:sdk", "api_keys_file": keys_file})


@pytest.fixture(scope="module")
def engines(module_sim_engine: Callable[..., str]) -> dict[str, str]:
    """A chat simulator and an embedding simulator, shared by the module."""
    return {
        "sim": module_sim_engine(),
        "sim-embedding": module_sim_engine(
            "--embedding-dim", str(EMBED_DIM), model="sim-embedding"
        ),
    }


@pytest.fixture
async def recorder() -> AsyncIterator[RecordingEngine]:
    """A recording engine, to see what the SDK's requests look like at the engine."""
    async with RecordingEngine() as engine:
        yield engine


@pytest.fixture
async def base_url(control_plane: Any, engines: dict[str, str], recorder: RecordingEngine) -> str:
    """The edge's /v1 URL with every engine registered."""
    await control_plane.register("sim-0", "sim", engines["sim"])
    await control_plane.register(
        "emb-0", "sim-embedding", engines["sim-embedding"], kind="embedding"
    )
    await control_plane.register("rec-0", "rec", recorder.base_url)
    return str(control_plane.client.base_url).rstrip("/") + "/v1"


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    """An async SDK client with retries off, so errors surface at once."""
    async with openai.AsyncOpenAI(base_url=base_url, api_key=KEY, max_retries=0) as sdk:
        yield sdk


MESSAGES: list[Any] = [{"role": "user", "content": "写一份日报"}]


async def test_async_chat_and_models(client: openai.AsyncOpenAI) -> None:
    models = [m.id async for m in client.models.list()]
    assert {"sim", "sim-embedding", "rec"} <= set(models)
    reply = await client.chat.completions.create(model="sim", messages=MESSAGES, max_tokens=5)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert len((reply.choices[0].message.content or "").split()) == 5
    assert reply.usage is not None and reply.usage.completion_tokens == 5


async def test_async_streaming_chat_with_usage(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="sim",
        messages=MESSAGES,
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            usage = chunk.usage
    assert len(text.split()) == 4
    assert usage is not None and usage.completion_tokens == 4


async def test_async_completions(client: openai.AsyncOpenAI) -> None:
    reply = await client.completions.create(model="sim", prompt="Once", max_tokens=3)
    assert len(reply.choices[0].text.split()) == 3
    stream = await client.completions.create(model="sim", prompt="Once", max_tokens=3, stream=True)
    pieces = [chunk.choices[0].text async for chunk in stream if chunk.choices]
    assert len("".join(pieces).split()) == 3


async def test_async_embeddings_float_and_base64(client: openai.AsyncOpenAI) -> None:
    # the SDK asks for base64 by default and decodes it; float is the explicit form
    default = await client.embeddings.create(model="sim-embedding", input=["hello", "world"])
    floats = await client.embeddings.create(
        model="sim-embedding", input=["hello", "world"], encoding_format="float"
    )
    for result in (default, floats):
        assert [d.index for d in result.data] == [0, 1]
        assert all(len(d.embedding) == EMBED_DIM for d in result.data)
    assert default.data[0].embedding == pytest.approx(floats.data[0].embedding, rel=1e-6)
    assert default.data[0].embedding != pytest.approx(default.data[1].embedding)


async def test_sync_client_in_a_thread(base_url: str) -> None:
    sdk = openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0)
    try:
        chat = await asyncio.to_thread(
            sdk.chat.completions.create, model="sim", messages=MESSAGES, max_tokens=2
        )
        assert len((chat.choices[0].message.content or "").split()) == 2

        def stream_text() -> str:
            stream = sdk.chat.completions.create(
                model="sim", messages=MESSAGES, max_tokens=3, stream=True
            )
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

        assert len((await asyncio.to_thread(stream_text)).split()) == 3
        embedded = await asyncio.to_thread(
            sdk.embeddings.create, model="sim-embedding", input="hello"
        )
        assert len(embedded.data[0].embedding) == EMBED_DIM
        with pytest.raises(openai.NotFoundError):
            await asyncio.to_thread(sdk.chat.completions.create, model="ghost", messages=MESSAGES)
    finally:
        sdk.close()


async def test_sdk_fields_reach_the_engine(
    client: openai.AsyncOpenAI, recorder: RecordingEngine
) -> None:
    tools: Any = [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
            },
        }
    ]
    await client.chat.completions.create(
        model="rec",
        messages=MESSAGES,
        tools=tools,
        tool_choice="auto",
        response_format={"type": "json_object"},
        stop=["END"],
        n=1,
        temperature=0.3,
        top_p=0.8,
        max_completion_tokens=9,
        seed=42,
        logprobs=True,
        top_logprobs=2,
        extra_body={"top_k": 5},
    )
    sent = recorder.last.json()
    assert sent == {
        "model": "rec",
        "messages": MESSAGES,
        "tools": tools,
        "tool_choice": "auto",
        "response_format": {"type": "json_object"},
        "stop": ["END"],
        "n": 1,
        "temperature": 0.3,
        "top_p": 0.8,
        "max_completion_tokens": 9,
        "seed": 42,
        "logprobs": True,
        "top_logprobs": 2,
        "top_k": 5,
    }
    assert "authorization" not in recorder.last.headers  # the client key never reaches engines


async def test_bad_request_error(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="sim", messages=MESSAGES, temperature=5)
    assert info.value.status_code == 400
    assert info.value.param == "temperature"
    assert info.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as empty:
        await client.embeddings.create(model="sim-embedding", input=[])
    assert empty.value.param == "input"


async def test_not_found_error(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="ghost", messages=MESSAGES)
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        await client.embeddings.create(model="ghost", input="x")
    with pytest.raises(openai.NotFoundError):
        stream = await client.chat.completions.create(model="ghost", messages=MESSAGES, stream=True)
        async for _ in stream:
            pass


async def test_authentication_error(base_url: str) -> None:
    async with openai.AsyncOpenAI(base_url=base_url, api_key="sk-wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as info:
            await bad.chat.completions.create(model="sim", messages=MESSAGES)
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            await bad.embeddings.create(model="sim-embedding", input="x")
        with pytest.raises(openai.AuthenticationError):
            await bad.models.list()


async def test_rate_limit_error(base_url: str) -> None:
    async with openai.AsyncOpenAI(base_url=base_url, api_key=LIMITED_KEY, max_retries=0) as sdk:
        await sdk.chat.completions.create(model="sim", messages=MESSAGES, max_tokens=1)
        with pytest.raises(openai.RateLimitError) as info:
            await sdk.chat.completions.create(model="sim", messages=MESSAGES, max_tokens=1)
        assert info.value.status_code == 429
        assert info.value.code == "rate_limit_exceeded"
        assert int(info.value.response.headers["retry-after"]) == 60
        with pytest.raises(openai.RateLimitError):
            await sdk.embeddings.create(model="sim-embedding", input="x")
