"""The simulator's POST /v1/messages (Anthropic's Messages API), as vLLM serves it: the
request becomes a chat request, runs through the sim's chat generation, and its reply or
chunk stream is turned into Anthropic's message or event stream
(vllm/entrypoints/anthropic/serving.py), text only.

Errors come in vLLM's Anthropic shape: `{"type": "error", "error": {"type", "message"}}`
with vLLM's error type names (its translate_error_response).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson

from sage.common.exceptions import InvalidRequestError
from sage.common.http import JSONResponse, Request, Response, StreamingResponse, sse_event

ChatHandler = Callable[[dict[str, Any], Request], Awaitable[Response | StreamingResponse]]

# OpenAI finish reason → Anthropic stop reason (vLLM's _to_anthropic_stop_reason, no tools)
_LENGTH = "length"


def _text(content: Any, field: str) -> str:
    """A turn's text: a string, or its text blocks joined (other blocks are not simulated)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(block.get("text") or "" for block in content if isinstance(block, dict))
    raise InvalidRequestError(f"{field} must be a string or a list of blocks", param=field)


def as_chat(body: dict[str, Any]) -> dict[str, Any]:
    """The chat request vLLM makes of a Messages request (its to_chat_completion_request,
    text only): the system prompt first, stop_sequences as stop, usage always streamed."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list", param="messages")
    if body.get("max_tokens") is None:
        raise InvalidRequestError("max_tokens is required", param="max_tokens")
    turns: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None:
        turns.append({"role": "system", "content": _text(system, "system")})
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequestError("a message must be an object", param=f"messages.{i}")
        turns.append(
            {
                "role": message.get("role"),
                "content": _text(message.get("content"), f"messages.{i}.content"),
            }
        )
    chat: dict[str, Any] = {"messages": turns, "max_tokens": body["max_tokens"]}
    for key in ("model", "temperature", "top_p", "top_k", "stream"):
        if body.get(key) is not None:
            chat[key] = body[key]
    if body.get("stop_sequences"):
        chat["stop"] = body["stop_sequences"]
    if body.get("stream"):
        chat["stream_options"] = {"include_usage": True}
    return chat


def _stop(finish_reason: str | None, stop_reason: Any) -> tuple[str | None, str | None]:
    """(stop_reason, stop_sequence) as vLLM maps a chat finish."""
    if finish_reason == _LENGTH:
        return "max_tokens", None
    if finish_reason != "stop":
        return None, None
    if isinstance(stop_reason, str):
        return "stop_sequence", stop_reason
    return "end_turn", None


def _usage(usage: dict[str, Any] | None) -> dict[str, int]:
    usage = usage or {}
    return {
        "input_tokens": int(usage.get("prompt_tokens") or 0),
        "output_tokens": int(usage.get("completion_tokens") or 0),
    }


def as_message(chat: dict[str, Any]) -> dict[str, Any]:
    """A chat completion as an Anthropic message (vLLM's messages_full_converter)."""
    choice = chat["choices"][0]
    stop_reason, stop_sequence = _stop(choice.get("finish_reason"), choice.get("stop_reason"))
    return {
        "id": chat["id"],
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": choice["message"].get("content") or ""}],
        "model": chat["model"],
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": _usage(chat.get("usage")),
        "kv_transfer_params": chat.get("kv_transfer_params"),
        "ec_transfer_params": None,
    }


def _event(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\n" + sse_event(orjson.dumps(data))


async def as_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A chat's SSE chunks as Anthropic's events (vLLM's message_stream_converter): the
    first chunk opens the message, text deltas fill one text block, the usage chunk closes
    it with the stop reason, [DONE] ends it with message_stop (no [DONE] of its own)."""
    started = block_open = False
    finish: tuple[str | None, Any] = (None, None)
    buffer = b""
    async for piece in chunks:
        buffer += piece
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            if not event.startswith(b"data:"):
                continue
            data = event[5:].strip()
            if data == b"[DONE]":
                yield _event("message_stop", {"type": "message_stop"})
                return
            chunk = orjson.loads(data)
            if "error" in chunk:  # a failure after the headers: vLLM's error event
                error = chunk["error"]
                yield _event(
                    "error",
                    {
                        "type": "error",
                        "error": {"type": "internal_error", "message": error.get("message", "")},
                    },
                )
                continue
            if not started:
                started = True
                message = {
                    "id": chunk["id"],
                    "type": "message",
                    "role": "assistant",
                    "content": [],
                    "model": chunk["model"],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": _usage(chunk.get("usage")),
                }
                yield _event("message_start", {"type": "message_start", "message": message})
                continue
            choices = chunk.get("choices") or []
            if not choices:  # the usage chunk
                if block_open:
                    block_open = False
                    yield _event("content_block_stop", {"type": "content_block_stop", "index": 0})
                reason, sequence = _stop(finish[0] or "stop", finish[1])
                yield _event(
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": reason, "stop_sequence": sequence},
                        "usage": _usage(chunk.get("usage")),
                    },
                )
                continue
            choice = choices[0]
            if choice.get("finish_reason") is not None:
                finish = (choice["finish_reason"], choice.get("stop_reason"))
            text = (choice.get("delta") or {}).get("content")
            if text:
                if not block_open:
                    block_open = True
                    yield _event(
                        "content_block_start",
                        {
                            "type": "content_block_start",
                            "index": 0,
                            "content_block": {"type": "text", "text": ""},
                        },
                    )
                yield _event(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": text},
                    },
                )


async def messages(
    body: dict[str, Any], request: Request, chat: ChatHandler
) -> Response | StreamingResponse:
    """POST /v1/messages over the sim's chat handler `chat`."""
    reply = await chat(as_chat(body), request)
    if isinstance(reply, StreamingResponse):
        return StreamingResponse(as_events(reply.chunks))
    if reply.status != 200:
        return reply
    return JSONResponse(as_message(orjson.loads(reply.body)))


def anthropic_error_reply(reply: Response | StreamingResponse) -> Response | StreamingResponse:
    """A vLLM error reply in vLLM's Anthropic shape (translate_error_response)."""
    if isinstance(reply, StreamingResponse) or reply.status < 400:
        return reply
    try:
        error = orjson.loads(reply.body).get("error") or {}
    except (orjson.JSONDecodeError, AttributeError):
        return reply
    if not isinstance(error, dict):
        return reply
    body = {
        "type": "error",
        "error": {"type": str(error.get("type", "")), "message": str(error.get("message", ""))},
    }
    return JSONResponse(body, reply.status)
