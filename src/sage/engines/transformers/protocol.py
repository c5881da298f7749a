"""Parsing OpenAI chat/completions request bodies; every error names the bad field.

The fields and their ranges follow OpenAI's API, plus the vLLM extensions clients of a
vLLM-compatible engine send (top_k, min_tokens, ignore_eos, stop_token_ids).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sage.common.exceptions import InvalidRequestError

__all__ = [
    "ChatRequest",
    "CompletionRequest",
    "Sampling",
    "parse_chat",
    "parse_completion",
]


@dataclass(frozen=True)
class Sampling:
    """The sampling fields of a request, validated; max_tokens is None when not given."""

    max_tokens: int | None
    max_tokens_field: str  # which field set it, for error messages
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool
    min_tokens: int
    presence_penalty: float
    frequency_penalty: float
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class ChatRequest:
    """A validated POST /v1/chat/completions body."""

    model: str | None
    messages: tuple[dict[str, str], ...]  # content flattened to text
    sampling: Sampling


@dataclass(frozen=True)
class CompletionRequest:
    """A validated POST /v1/completions body; a prompt is text or token ids."""

    model: str | None
    prompts: tuple[str | tuple[int, ...], ...]
    sampling: Sampling


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not _is_number(value) or not low <= value <= high:
        raise InvalidRequestError(
            f"{key} must be a number in [{low:g}, {high:g}], got {value!r}", param=key
        )
    return float(value)


def _int(body: dict[str, Any], key: str, low: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not _is_int(value) or value < low:
        raise InvalidRequestError(f"{key} must be an integer >= {low}, got {value!r}", param=key)
    result: int = value
    return result


def _bool(body: dict[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{key} must be a boolean, got {value!r}", param=key)
    return value


def _model(body: dict[str, Any]) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequestError("model must be a string", param="model")
    return model


def _refuse_unsupported(body: dict[str, Any], *, chat: bool) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise InvalidRequestError("this engine supports only n=1", param="n")
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise InvalidRequestError("this engine supports only best_of=1", param="best_of")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") not in (None, 0):
        raise InvalidRequestError("logprobs are not supported by this engine", param="logprobs")
    if chat and body.get("tools"):
        raise InvalidRequestError("tools are not supported by this engine", param="tools")
    if not chat and body.get("echo"):
        raise InvalidRequestError("echo is not supported by this engine", param="echo")
    if not chat and body.get("suffix"):
        raise InvalidRequestError("suffix is not supported by this engine", param="suffix")


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise InvalidRequestError("stop must be a string or a list of strings", param="stop")
    if any(not s for s in stop):
        raise InvalidRequestError("stop strings must not be empty", param="stop")
    return tuple(stop)


def _stop_token_ids(body: dict[str, Any]) -> tuple[int, ...]:
    ids = body.get("stop_token_ids")
    if ids is None:
        return ()
    if not isinstance(ids, list) or not all(_is_int(i) and i >= 0 for i in ids):
        raise InvalidRequestError(
            "stop_token_ids must be a list of non-negative integers", param="stop_token_ids"
        )
    return tuple(ids)


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise InvalidRequestError("stream_options must be an object", param="stream_options")
    flag = options.get("include_usage")
    if flag is not None and not isinstance(flag, bool):
        raise InvalidRequestError(
            "stream_options.include_usage must be a boolean",
            param="stream_options.include_usage",
        )
    return stream, bool(flag)


def _sampling(body: dict[str, Any], *, chat: bool) -> Sampling:
    _refuse_unsupported(body, chat=chat)
    max_tokens = _int(body, "max_tokens", 1)
    field = "max_tokens"
    if chat and body.get("max_completion_tokens") is not None:
        max_tokens = _int(body, "max_completion_tokens", 1)
        field = "max_completion_tokens"
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p <= 0:
        raise InvalidRequestError(f"top_p must be in (0, 1], got {top_p!r}", param="top_p")
    top_k = body.get("top_k")
    if top_k is None or top_k == -1:
        top_k = 0
    elif not _is_int(top_k) or top_k < 0:
        raise InvalidRequestError(
            f"top_k must be -1 (off) or a non-negative integer, got {top_k!r}", param="top_k"
        )
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise InvalidRequestError(f"seed must be an integer, got {seed!r}", param="seed")
    stream, include_usage = _stream_flags(body)
    min_tokens = _int(body, "min_tokens", 0) or 0
    if max_tokens is not None and min_tokens > max_tokens:
        raise InvalidRequestError(
            f"min_tokens ({min_tokens}) must not exceed {field} ({max_tokens})",
            param="min_tokens",
        )
    return Sampling(
        max_tokens=max_tokens,
        max_tokens_field=field,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=_stop(body),
        stop_token_ids=_stop_token_ids(body),
        ignore_eos=_bool(body, "ignore_eos"),
        min_tokens=min_tokens,
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        stream=stream,
        include_usage=include_usage,
    )


def _message_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for j, part in enumerate(content):
            here = f"{where}.content[{j}]"
            if not isinstance(part, dict):
                raise InvalidRequestError(f"{here} must be an object", param=here)
            if part.get("type") != "text":
                raise InvalidRequestError(
                    f"{here}.type must be 'text' (this engine reads text only)",
                    param=f"{here}.type",
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidRequestError(f"{here}.text must be a string", param=f"{here}.text")
            parts.append(text)
        return "\n".join(parts)
    raise InvalidRequestError(
        f"{where}.content must be a string or a list of text parts", param=f"{where}.content"
    )


def _messages(value: Any) -> tuple[dict[str, str], ...]:
    if value is None:
        raise InvalidRequestError("messages is required", param="messages")
    if not isinstance(value, list):
        raise InvalidRequestError("messages must be a list of message objects", param="messages")
    if not value:
        raise InvalidRequestError("messages must not be empty", param="messages")
    messages: list[dict[str, str]] = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidRequestError(f"{where} must be an object", param=where)
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidRequestError(
                f"{where}.role must be a non-empty string", param=f"{where}.role"
            )
        content = message.get("content")
        if content is None:
            if role != "assistant":
                raise InvalidRequestError(f"{where}.content is required", param=f"{where}.content")
            content = ""
        messages.append({"role": role, "content": _message_text(content, where)})
    return tuple(messages)


def _prompts(value: Any) -> tuple[str | tuple[int, ...], ...]:
    if value is None:
        raise InvalidRequestError("prompt is required", param="prompt")
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return tuple(value)
        if all(_is_int(t) for t in value):
            return (tuple(value),)
        if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in value):
            return tuple(tuple(p) for p in value)
    raise InvalidRequestError(
        "prompt must be a string, a list of strings, or token ids", param="prompt"
    )


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequestError("request body must be a JSON object")
    return body


def parse_chat(body: Any) -> ChatRequest:
    """A chat completions body, or InvalidRequestError naming the field."""
    doc = _object(body)
    return ChatRequest(_model(doc), _messages(doc.get("messages")), _sampling(doc, chat=True))


def parse_completion(body: Any) -> CompletionRequest:
    """A completions body, or InvalidRequestError naming the field."""
    doc = _object(body)
    return CompletionRequest(_model(doc), _prompts(doc.get("prompt")), _sampling(doc, chat=False))
