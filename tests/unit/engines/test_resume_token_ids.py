"""The sim's token ids, as vLLM 0.32 gives and takes them (`return_token_ids`, token-id
prompts), and the property exact resume rests on: a prompt of prompt ids + the first k
output ids goes on with exactly the rest of the reply."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from sage.engines.sim import SimConfig, chat_prompt_text, create_app, expected_text, tokenize

MESSAGES = [{"role": "user", "content": "tell me about fault tolerance"}]
PROMPT = chat_prompt_text(MESSAGES)


@pytest.fixture
async def sim() -> AsyncIterator[httpx.AsyncClient]:
    # subword tokens: replies that do not re-tokenize from their text, as WordPiece's
    app = create_app(SimConfig(subword_tokens=True))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://sim"
    ) as client:
        yield client


def _events(text: str) -> list[Any]:
    return [
        orjson.loads(line[6:])
        for line in text.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


async def _chat_stream(sim: httpx.AsyncClient, **fields: Any) -> list[Any]:
    body = {"messages": MESSAGES, "max_tokens": 30, "stream": True, **fields}
    response = await sim.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return _events(response.text)


async def _completion(sim: httpx.AsyncClient, **fields: Any) -> list[Any]:
    response = await sim.post("/v1/completions", json={"stream": True, **fields})
    assert response.status_code == 200, response.text
    return _events(response.text)


async def test_chat_stream_returns_prompt_and_output_ids_where_vllm_does(
    sim: httpx.AsyncClient,
) -> None:
    events = await _chat_stream(sim, return_token_ids=True)
    role, content = events[0], events[1:]
    assert role["prompt_token_ids"] == tokenize(PROMPT)
    assert all(len(c["choices"][0]["token_ids"]) == 1 for c in content)
    plain = await _chat_stream(sim)
    assert plain[0]["prompt_token_ids"] is None
    assert all(c["choices"][0]["token_ids"] is None for c in plain[1:])
    # the same chunks otherwise: same keys, same text
    assert [list(c["choices"][0]) for c in plain] == [list(c["choices"][0]) for c in events]
    text = "".join(c["choices"][0]["delta"]["content"] for c in content)
    assert text == expected_text(PROMPT, 30, subword=True)


async def test_unary_replies_carry_the_ids_too(sim: httpx.AsyncClient) -> None:
    chat = await sim.post(
        "/v1/chat/completions",
        json={"messages": MESSAGES, "max_tokens": 4, "return_token_ids": True},
    )
    body = chat.json()
    assert body["prompt_token_ids"] == tokenize(PROMPT)
    assert len(body["choices"][0]["token_ids"]) == 4
    completion = await sim.post(
        "/v1/completions", json={"prompt": "a b", "max_tokens": 2, "return_token_ids": True}
    )
    choice = completion.json()["choices"][0]
    assert choice["prompt_token_ids"] == tokenize("a b") and len(choice["token_ids"]) == 2


async def test_completion_stream_sends_prompt_ids_with_the_first_chunk_only(
    sim: httpx.AsyncClient,
) -> None:
    events = await _completion(sim, prompt=[[5, 6, 7], [8]], max_tokens=3, return_token_ids=True)
    firsts = [e["choices"][0] for e in events[:2]]
    assert [(c["index"], c["prompt_token_ids"]) for c in firsts] == [(0, [5, 6, 7]), (1, [8])]
    assert all(e["choices"][0]["prompt_token_ids"] is None for e in events[2:])
    assert all(len(e["choices"][0]["token_ids"]) == 1 for e in events)


async def test_prompt_ids_and_part_of_the_reply_continue_the_reply_exactly(
    sim: httpx.AsyncClient,
) -> None:
    events = await _chat_stream(sim, return_token_ids=True)
    prompt_ids = events[0]["prompt_token_ids"]
    chunks = [e["choices"][0] for e in events[1:]]
    whole = "".join(c["delta"]["content"] for c in chunks)
    for k in (1, 7, 29):
        sent = [t for c in chunks[:k] for t in c["token_ids"]]
        rest = await _completion(
            sim, prompt=prompt_ids + sent, max_tokens=30 - k, return_token_ids=True
        )
        head = "".join(c["delta"]["content"] for c in chunks[:k])
        assert head + "".join(e["choices"][0]["text"] for e in rest) == whole
        assert rest[-1]["choices"][0]["finish_reason"] == "length"


async def test_continuing_from_text_differs_where_a_word_was_glued(
    sim: httpx.AsyncClient,
) -> None:
    """What makes text resume inexact on real tokenizers, here too: "batch" + "s" reads
    back as one other word."""
    events = await _chat_stream(sim, return_token_ids=True)
    chunks = [e["choices"][0] for e in events[1:]]
    whole = "".join(c["delta"]["content"] for c in chunks)
    glued = next(i for i, c in enumerate(chunks) if i and not c["delta"]["content"][0].isspace())
    head = "".join(c["delta"]["content"] for c in chunks[: glued + 1])
    response = await sim.post(
        "/v1/chat/completions",
        json={
            "messages": [*MESSAGES, {"role": "assistant", "content": head}],
            "continue_final_message": True,
            "add_generation_prompt": False,
            "max_tokens": 30 - glued - 1,
        },
    )
    assert head + response.json()["choices"][0]["message"]["content"] != whole


async def test_continuing_from_text_is_exact_without_glued_words() -> None:
    """The text path's own check: continue_final_message goes on from its last message."""
    app = create_app(SimConfig())
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://sim"
    ) as sim:
        whole = expected_text(PROMPT, 12)
        head = " ".join(whole.split()[:5])
        response = await sim.post(
            "/v1/chat/completions",
            json={
                "messages": [*MESSAGES, {"role": "assistant", "content": head}],
                "continue_final_message": True,
                "max_tokens": 7,
            },
        )
        assert head + response.json()["choices"][0]["message"]["content"] == whole


@pytest.mark.parametrize(
    ("prompt", "param", "kind"),
    [
        # vLLM's request model: ids are ints >= 0 (its first error: the flat list's item)
        ([1, -2], "body.prompt.1", "Bad Request"),
        ([[1], [3, -2]], "body.prompt.0", "Bad Request"),
        # its renderer: "Token id 2147483648 is out of vocabulary"
        ([[1], [2**31]], None, "BadRequestError"),
        ([[1], []], "prompt", "BadRequestError"),
    ],
)
async def test_bad_token_id_prompts_are_vllms_400s(
    sim: httpx.AsyncClient, prompt: Any, param: str | None, kind: str
) -> None:
    response = await sim.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["type"]) == (param, kind)


async def test_return_token_ids_is_read_as_vllms_pydantic_model_reads_a_bool(
    sim: httpx.AsyncClient,
) -> None:
    async def ask(flag: Any) -> httpx.Response:
        body = {"prompt": "a", "max_tokens": 1, "return_token_ids": flag}
        return await sim.post("/v1/completions", json=body)

    assert (await ask("yes")).json()["choices"][0]["token_ids"] is not None
    assert (await ask(0)).json()["choices"][0]["token_ids"] is None
    for bad in ("maybe", [True]):
        response = await ask(bad)
        assert response.status_code == 400
        error = response.json()["error"]
        assert (error["param"], error["type"]) == ("body.return_token_ids", "Bad Request")
