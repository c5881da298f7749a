"""The gateway's POST /tokenize and /detokenize against real vLLM: the same replies as the
engine's own routes (prompt and chat), a round trip back to the text, and the client's
tokenize/detokenize over them."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from sage.llm import UnifiedInferenceClient
from tests.vllm.conftest import VllmStack

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]

PROMPT = "hello world from the gateway"
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Count the tokens of this chat, please."},
]


def _post(url: str, path: str, body: dict[str, Any], headers: dict[str, str]) -> Any:
    reply = httpx.post(url + path, json=body, headers=headers, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_gateway_tokenize_is_the_engines(vllm_stack: VllmStack) -> None:
    engine = {"Authorization": f"Bearer {vllm_stack.engine_key}"}
    bodies: list[dict[str, Any]] = [
        {"prompt": PROMPT, "return_token_strs": True},
        {"prompt": PROMPT, "add_special_tokens": False},
        {"messages": CHAT},
        {"messages": CHAT, "add_generation_prompt": False},
    ]
    for body in bodies:
        body = {"model": vllm_stack.model, **body}
        via_gateway = _post(vllm_stack.gateway, "/tokenize", body, {})
        assert via_gateway == _post(vllm_stack.engine_url, "/tokenize", body, engine), body
        assert via_gateway["count"] == len(via_gateway["tokens"]) > 0

    ids = _post(
        vllm_stack.gateway,
        "/tokenize",
        {"model": vllm_stack.model, "prompt": PROMPT, "add_special_tokens": False},
        {},
    )["tokens"]
    detok = {"model": vllm_stack.model, "tokens": ids}
    text = _post(vllm_stack.gateway, "/detokenize", detok, {})
    assert text == _post(vllm_stack.engine_url, "/detokenize", detok, engine)
    assert text["prompt"].strip() == PROMPT

    with UnifiedInferenceClient.create(control_plane_url=vllm_stack.gateway) as client:
        assert client.tokenize(PROMPT, model=vllm_stack.model, add_special_tokens=False) == ids
        assert client.detokenize(ids, model=vllm_stack.model).strip() == PROMPT
        chat_ids = client.tokenize(CHAT, model=vllm_stack.model)
    engine_chat = _post(
        vllm_stack.engine_url, "/tokenize", {"model": vllm_stack.model, "messages": CHAT}, engine
    )
    assert chat_ids == engine_chat["tokens"]
