"""StreamResume: the continuation request and the rewritten chunks of a resumed stream."""

from __future__ import annotations

from typing import Any

import orjson

from sage.services.scheduler.resume import StreamResume

CHAT = "/v1/chat/completions"


def _chunk(content: str | None = None, role: bool = False, finish: str | None = None) -> bytes:
    delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {"content": content}
    return orjson.dumps(
        {
            "id": "chatcmpl-first",
            "object": "chat.completion.chunk",
            "created": 100,
            "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
    )


def _body(**fields: Any) -> bytes:
    return orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})


def test_chat_continuation_appends_the_sent_text_and_reduces_max_tokens() -> None:
    seen = StreamResume.for_request(CHAT, _body(max_tokens=10, stream=True))
    assert seen is not None
    for payload in (_chunk(role=True), _chunk("Hello"), _chunk(" world")):
        seen.absorb(payload)
    doc = orjson.loads(seen.continuation() or b"")
    assert doc["messages"][-1] == {"role": "assistant", "content": "Hello world"}
    assert doc["continue_final_message"] is True and doc["add_generation_prompt"] is False
    assert doc["max_tokens"] == 8


def test_continuing_a_client_continuation_extends_its_own_assistant_message() -> None:
    body = orjson.dumps(
        {
            "model": "m",
            "messages": [{"role": "assistant", "content": "Once"}],
            "continue_final_message": True,
        }
    )
    seen = StreamResume.for_request(CHAT, body)
    assert seen is not None
    seen.absorb(_chunk(" upon"))
    doc = orjson.loads(seen.continuation() or b"")
    assert doc["messages"] == [{"role": "assistant", "content": "Once upon"}]


def test_completion_continuation_extends_the_prompt() -> None:
    seen = StreamResume.for_request(
        "/v1/completions", orjson.dumps({"model": "m", "prompt": "A", "max_tokens": 3})
    )
    assert seen is not None
    seen.absorb(orjson.dumps({"id": "cmpl-1", "choices": [{"index": 0, "text": " b"}]}))
    doc = orjson.loads(seen.continuation() or b"")
    assert doc["prompt"] == "A b" and doc["max_tokens"] == 2


def test_rewritten_chunks_keep_the_first_id_and_drop_the_second_role_chunk() -> None:
    seen = StreamResume.for_request(CHAT, _body(max_tokens=5))
    assert seen is not None
    seen.absorb(_chunk("a"))
    seen.continuation()
    second = orjson.loads(_chunk(role=True).replace(b"chatcmpl-first", b"chatcmpl-second"))
    assert seen.rewrite(orjson.dumps(second)) is None
    second["choices"][0]["delta"] = {"content": " b"}
    second["created"] = 999
    out = orjson.loads(seen.rewrite(orjson.dumps(second)) or b"")
    assert out["id"] == "chatcmpl-first" and out["created"] == 100
    assert seen.text == "a b"


def test_usage_of_the_continuation_counts_the_prefix_as_completion() -> None:
    seen = StreamResume.for_request(CHAT, _body(max_tokens=5))
    assert seen is not None
    seen.absorb(_chunk("a"))
    seen.absorb(_chunk(" b"))
    seen.continuation()
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    out = orjson.loads(
        seen.rewrite(orjson.dumps({"id": "x", "choices": [], "usage": usage})) or b""
    )
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}


def test_a_used_up_token_budget_needs_no_continuation() -> None:
    seen = StreamResume.for_request(CHAT, _body(max_completion_tokens=2))
    assert seen is not None
    seen.absorb(_chunk("a"))
    seen.absorb(_chunk(" b"))
    assert seen.continuation() is None
    closing = orjson.loads(seen.closing_chunk())
    assert closing["id"] == "chatcmpl-first"
    assert closing["choices"][0]["finish_reason"] == "length"


def test_a_finish_reason_means_nothing_is_missing() -> None:
    seen = StreamResume.for_request(CHAT, _body())
    assert seen is not None
    seen.absorb(_chunk("a", finish="stop"))
    assert seen.finished


def test_streams_that_cannot_be_continued_from_text_are_not_tracked() -> None:
    assert StreamResume.for_request(CHAT, _body(n=2)) is None
    assert StreamResume.for_request("/v1/completions", b'{"prompt": [1, 2, 3]}') is None
    assert StreamResume.for_request("/v1/completions", b'{"prompt": "a", "echo": true}') is None
    assert StreamResume.for_request(CHAT, b"not json") is None


def test_replies_that_are_more_than_text_are_not_continued() -> None:
    """A restart would begin a tool call, reasoning or guided JSON again, not continue it."""
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    assert StreamResume.for_request(CHAT, _body(tools=tools)) is None
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}
    assert StreamResume.for_request(CHAT, _body(response_format=schema)) is None
    assert StreamResume.for_request(CHAT, _body(guided_json={"type": "object"})) is None
    assert StreamResume.for_request(CHAT, _body(tools=[])) is not None  # empty: plain text


def test_a_pd_decode_legs_kv_params_are_not_sent_again() -> None:
    """The blocks the prefill engine held were for the first decode engine only."""
    kv = {"do_remote_prefill": True, "remote_block_ids": [1], "remote_host": "h"}
    seen = StreamResume.for_request(CHAT, _body(kv_transfer_params=kv))
    assert seen is not None
    seen.absorb(orjson.dumps({"id": "c1", "choices": [{"delta": {"content": "Hel"}}]}))
    continuation = seen.continuation()
    assert continuation is not None
    assert "kv_transfer_params" not in orjson.loads(continuation)
