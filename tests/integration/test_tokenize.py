"""POST /tokenize and /detokenize through the real edge and scheduler to sim engines, and
the clients' tokenize/detokenize over them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from sage.common.config.settings import SageSettings
from sage.common.exceptions import ModelNotFoundError
from sage.common.http.testing import RecordingEngine
from sage.engines.sim.model import tokenize
from sage.llm import UnifiedInferenceClient
from sage.llm.async_client import AsyncUnifiedInferenceClient

KEY = "sk-tok"
AUTH = {"authorization": f"Bearer {KEY}"}
CHAT = [{"role": "user", "content": "count these words please"}]


@pytest.fixture
def settings(settings: SageSettings) -> SageSettings:
    """One API key, so the routes' auth is tested as chat's is."""
    return settings.model_copy(update={"api_keys": KEY})


@pytest.fixture
async def edge(control_plane: Any, sim_engine: Callable[..., str]) -> httpx.AsyncClient:
    """The edge with one sim engine of `sim` (alias `sim-alias`)."""
    await control_plane.register("sim-a", "sim", sim_engine(), aliases=["sim-alias"])
    client: httpx.AsyncClient = control_plane.client
    return client


async def test_tokenize_prompt_and_chat_then_detokenize(edge: httpx.AsyncClient) -> None:
    prompt = await edge.post(
        "/tokenize",
        json={"model": "sim", "prompt": "hello tokenizer world", "return_token_strs": True},
        headers=AUTH,
    )
    assert prompt.status_code == 200, prompt.text
    reply = prompt.json()
    assert reply["tokens"] == tokenize("hello tokenizer world")
    assert reply["count"] == 3 and reply["max_model_len"] > 0
    assert reply["token_strs"] == ["hello", "tokenizer", "world"]

    chat = await edge.post("/tokenize", json={"model": "sim-alias", "messages": CHAT}, headers=AUTH)
    assert chat.status_code == 200, chat.text
    assert set(tokenize("count these words please")) <= set(chat.json()["tokens"])

    back = await edge.post(
        "/detokenize", json={"model": "sim", "tokens": reply["tokens"]}, headers=AUTH
    )
    assert back.status_code == 200, back.text
    assert back.json() == {"prompt": "hello tokenizer world"}


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
        ("/detokenize", {"model": "nope", "tokens": [1]}, 404, "model"),
        ("/tokenize", {"model": "sim"}, 400, "prompt"),
        ("/tokenize", {"prompt": "x"}, 400, "model"),
        ("/detokenize", {"model": "sim", "tokens": [1, -2]}, 400, "tokens[1]"),
        ("/detokenize", {"model": "sim", "tokens": "1 2"}, 400, "tokens"),
    ],
)
async def test_errors_name_the_model_or_field(
    edge: httpx.AsyncClient, path: str, body: dict[str, Any], status: int, param: str
) -> None:
    reply = await edge.post(path, json=body, headers=AUTH)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param, error
    assert param.split("[")[0] in error["message"]


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize"])
async def test_unauthenticated_is_401(edge: httpx.AsyncClient, path: str) -> None:
    reply = await edge.post(path, json={"model": "sim", "prompt": "x", "tokens": [1]})
    assert reply.status_code == 401
    assert reply.json()["error"]["code"] == "invalid_api_key"


async def test_engine_without_the_route_is_404_naming_it(control_plane: Any) -> None:
    async with RecordingEngine() as recorder:
        await control_plane.register("rec-a", "rec", recorder.base_url)
        reply = await control_plane.client.post(
            "/detokenize", json={"model": "rec", "tokens": [1]}, headers=AUTH
        )
    assert reply.status_code == 404, reply.text
    message = reply.json()["error"]["message"]
    assert "rec-a" in message and "/detokenize" in message


async def test_clients_tokenize_and_detokenize(edge: httpx.AsyncClient) -> None:
    url = str(edge.base_url)
    ids = tokenize("a few words")

    def sync_calls() -> tuple[list[int], list[int], str]:
        with UnifiedInferenceClient.create(control_plane_url=url, api_key=KEY) as client:
            return (
                client.tokenize("a few words", model="sim"),
                client.tokenize(CHAT, model="sim"),
                client.detokenize(ids, model="sim"),
            )

    prompt_ids, chat_ids, text = await asyncio.to_thread(sync_calls)
    assert prompt_ids == ids and text == "a few words"
    assert set(tokenize("count these words please")) <= set(chat_ids)

    async with AsyncUnifiedInferenceClient.create(
        control_plane_url=url, api_key=KEY, default_llm_model="sim"
    ) as aclient:
        assert await aclient.tokenize("a few words") == ids
        assert await aclient.detokenize(ids) == "a few words"
        with pytest.raises(ModelNotFoundError):
            await aclient.tokenize("x", model="nope")
