"""The scheduler's copy of a model's tokenizer (kv_events routing, local_tokenizer.py) gives
the token ids real vLLM gives: for chats (system prompt and several turns, characters a
tokenizer or a Jinja template could trip on, text parts, a long history) and for completion
prompts, compared with the engine's own POST /tokenize. A difference would make the router
hash other blocks than the engine cached, and every such request would miss."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from sage.services.scheduler.routing.local_tokenizer import load_local_tokenizer
from tests.vllm.conftest import VllmStack

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]

SYSTEM = "You are a terse assistant for a storage team. Answer in one line. " * 12
CHATS: dict[str, list[dict[str, Any]]] = {
    "system and turns": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What is a prefix cache?"},
        {"role": "assistant", "content": "Reused KV blocks of a shared prompt start."},
        {"role": "user", "content": "And when is it evicted?"},
    ],
    "special characters": [
        {"role": "system", "content": "Ünïcödé, 你好, emoji 🚀, tabs\tand\nnewlines  "},
        {"role": "user", "content": "{{ not a variable }} {% raw %} <b>&amp;</b> \\n [CLS] [SEP]"},
        {"role": "assistant", "content": "  leading and trailing spaces  "},
        {"role": "user", "content": "quotes ' \" ` and a backslash \\ at the end\\"},
    ],
    "text parts and a name": [
        {
            "role": "user",
            "name": "ops",
            "content": [
                {"type": "text", "text": "first part"},
                {"type": "text", "text": "second part"},
            ],
        },
    ],
    "long history": [
        {"role": "system", "content": SYSTEM},
        *(
            {"role": role, "content": f"turn {i}: " + "the quick brown fox jumps over it " * 12}
            for i, role in enumerate(["user", "assistant"] * 8 + ["user"])
        ),
    ],
}
PROMPTS = (
    "plain completion text",
    "Ünïcödé 🚀 [SEP] {{ x }} " * 40,
)


def engine_tokens(stack: VllmStack, body: dict[str, Any]) -> list[int]:
    """The engine's own token ids for `body` (vLLM's POST /tokenize)."""
    reply = httpx.post(
        stack.engine_url + "/tokenize",
        json={"model": stack.model, **body},
        headers={"Authorization": f"Bearer {stack.engine_key}"},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    tokens: list[int] = reply.json()["tokens"]
    return tokens


def test_local_token_ids_equal_the_engines(vllm_stack: VllmStack) -> None:
    local = load_local_tokenizer(vllm_stack.model)
    assert local is not None, "the stack's model folder has tokenizer.json and a template"
    for name, messages in CHATS.items():
        for generation_prompt in (True, False):
            doc = {"messages": messages, "add_generation_prompt": generation_prompt}
            text = local.render_chat(doc)
            assert text is not None, name
            expected = engine_tokens(vllm_stack, doc)
            assert local.encode(text, False) == expected, (name, generation_prompt)
    long_ids = local.encode(local.render_chat({"messages": CHATS["long history"]}) or "", False)
    assert len(long_ids) > 1000  # the long chat really is long
    for prompt in PROMPTS:
        for special in (True, False):
            expected = engine_tokens(vllm_stack, {"prompt": prompt, "add_special_tokens": special})
            assert local.encode(prompt, special) == expected, (prompt[:20], special)
