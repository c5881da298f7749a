"""The edge's continuation of a stream whose scheduler replica died: the request asking
another replica for the rest, and its chunks rewritten into the client's stream."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from sage.services.edge.resume import StreamContinuation

HEAD = {"id": "chatcmpl-1", "created": 111, "model": "m"}


def _chat_chunk(content: str | None = None, role: bool = False, **extra: Any) -> bytes:
    delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
    if content is not None:
        delta["content"] = content
    choice = {"index": 0, "delta": delta, "finish_reason": extra.pop("finish", None)}
    return orjson.dumps({**HEAD, "object": "chat.completion.chunk", "choices": [choice], **extra})


def _chat(**body: Any) -> StreamContinuation:
    doc = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}
    tracker = StreamContinuation.for_request(True, orjson.dumps(doc))
    assert tracker is not None
    return tracker


def test_chat_continues_from_the_text_sent_with_the_rest_of_its_budget() -> None:
    tracker = _chat(max_tokens=10, min_tokens=5)
    for payload in (_chat_chunk(role=True), _chat_chunk("Hello"), _chat_chunk(" there")):
        tracker.absorb(payload)

    doc = orjson.loads(tracker.continuation())
    assert doc["messages"][-1] == {"role": "assistant", "content": "Hello there"}
    assert doc["continue_final_message"] is True and doc["add_generation_prompt"] is False
    assert doc["max_tokens"] == 8 and doc["min_tokens"] == 3
    assert not tracker.finished and not tracker.exhausted


def test_continuation_chunks_read_as_the_first_stream() -> None:
    tracker = _chat(max_completion_tokens=10)
    tracker.absorb(_chat_chunk(role=True))
    tracker.absorb(_chat_chunk("one"))
    assert orjson.loads(tracker.continuation())["max_completion_tokens"] == 9

    other = {"id": "chatcmpl-2", "created": 222, "model": "m"}
    role = orjson.dumps(
        {**other, "choices": [{"index": 0, "delta": {"role": "assistant"}}], "usage": None}
    )
    assert tracker.rewrite(role) is None  # the client already had a role chunk
    piece = orjson.dumps(
        {**other, "choices": [{"index": 0, "delta": {"content": " two"}, "finish_reason": None}]}
    )
    rewritten = orjson.loads(tracker.rewrite(piece) or b"")
    assert (rewritten["id"], rewritten["created"]) == ("chatcmpl-1", 111)
    usage = orjson.dumps(
        {
            **other,
            "choices": [],
            "usage": {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8},
        }
    )
    # The token sent before was prompt to the continuation: it counts as completion.
    assert orjson.loads(tracker.rewrite(usage) or b"")["usage"] == {
        "prompt_tokens": 6,
        "completion_tokens": 2,
        "total_tokens": 8,
    }
    assert tracker.text == "one two"


def test_an_assistant_prefix_the_client_asked_to_continue_grows() -> None:
    tracker = _chat(
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "So"}],
        continue_final_message=True,
    )
    tracker.absorb(_chat_chunk(" far"))
    doc = orjson.loads(tracker.continuation())
    assert doc["messages"][-1] == {"role": "assistant", "content": "So far"}
    assert len(doc["messages"]) == 2


def test_completion_prompt_takes_the_text_and_a_spent_budget_closes() -> None:
    tracker = StreamContinuation.for_request(
        False, orjson.dumps({"model": "m", "prompt": "Once", "max_tokens": 2})
    )
    assert tracker is not None
    for text in (" upon", " a"):
        tracker.absorb(orjson.dumps({**HEAD, "choices": [{"index": 0, "text": text}]}))
    assert orjson.loads(tracker.continuation())["prompt"] == "Once upon a"
    assert tracker.exhausted
    closing = orjson.loads(tracker.closing_chunk())
    assert closing["id"] == "chatcmpl-1" and closing["object"] == "text_completion"
    assert closing["choices"][0]["finish_reason"] == "length"


def test_a_finish_reason_sent_means_nothing_is_missing() -> None:
    tracker = _chat()
    tracker.absorb(_chat_chunk("done", finish="stop"))
    assert tracker.finished


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}),
        orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [1]}),
        orjson.dumps(
            {
                "model": "m",
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_object"},
            }
        ),
        orjson.dumps({"model": "m", "messages": []}),
    ],
    ids=["not-json", "two-choices", "tools", "structured", "no-messages"],
)
def test_replies_that_are_more_than_one_text_are_not_continued(body: bytes) -> None:
    assert StreamContinuation.for_request(True, body) is None


def test_echo_and_token_prompts_are_not_continued() -> None:
    echo = orjson.dumps({"model": "m", "prompt": "x", "echo": True})
    ids = orjson.dumps({"model": "m", "prompt": [1, 2, 3]})
    assert StreamContinuation.for_request(False, echo) is None
    assert StreamContinuation.for_request(False, ids) is None
