"""Checks on OpenAI request bodies, done once at the edge, naming the bad field.

Only what the control plane needs to route safely is checked; engine-specific sampling
parameters are passed through for the engine to judge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from sage.common.exceptions import InvalidRequestError

# OpenAI's own per-request cap on embedding inputs.
MAX_EMBEDDING_INPUTS = 2048
# Integer fields end up in int32 protobuf fields or engine limits; larger is never valid.
INT32_MAX = 2**31 - 1

_ROLES = frozenset({"system", "user", "assistant", "tool", "function", "developer"})


@dataclass(frozen=True)
class ParsedRequest:
    """The fields the edge routes on; the raw body travels on unchanged."""

    model: str
    stream: bool
    doc: dict[str, Any]


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 saying why not."""
    if not body:
        raise InvalidRequestError("request body is empty; expected a JSON object")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidRequestError(f"request body must be a JSON object, got {type(doc).__name__}")
    return doc


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_common(doc: dict[str, Any]) -> tuple[str, bool]:
    model = doc.get("model")
    if model is None:
        raise InvalidRequestError("model is required", param="model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequestError(
            f"model must be a non-empty string, got {_type_name(model)}", param="model"
        )
    stream = doc.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidRequestError(
            f"stream must be a boolean, got {_type_name(stream)}", param="stream"
        )
    for field in ("max_tokens", "max_completion_tokens", "n"):
        value = doc.get(field)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= INT32_MAX
        ):
            raise InvalidRequestError(
                f"{field} must be a positive integer (at most {INT32_MAX}), got {value!r}",
                param=field,
            )
    for field, low, high in (
        ("temperature", 0.0, 2.0),
        ("top_p", 0.0, 1.0),
        ("presence_penalty", -2.0, 2.0),
        ("frequency_penalty", -2.0, 2.0),
    ):
        value = doc.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidRequestError(
                f"{field} must be a number, got {_type_name(value)}", param=field
            )
        if not low <= value <= high:
            raise InvalidRequestError(
                f"{field} must be between {low:g} and {high:g}, got {value}", param=field
            )
    stop = doc.get("stop")
    if (
        stop is not None
        and not isinstance(stop, str)
        and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise InvalidRequestError("stop must be a string or a list of strings", param="stop")
    options = doc.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequestError("stream_options must be an object", param="stream_options")
    return model, stream


def validate_chat(doc: dict[str, Any]) -> ParsedRequest:
    """A chat completion request: model, messages with roles and content, sane options."""
    model, stream = _check_common(doc)
    messages = doc.get("messages")
    if messages is None:
        raise InvalidRequestError("messages is required", param="messages")
    if not isinstance(messages, list):
        raise InvalidRequestError(
            f"messages must be an array, got {_type_name(messages)}", param="messages"
        )
    if not messages:
        raise InvalidRequestError("messages must not be empty", param="messages")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidRequestError(f"{where} must be an object", param=where)
        role = message.get("role")
        if not isinstance(role, str):
            raise InvalidRequestError(
                f"{where}.role is required and must be a string", param=f"{where}.role"
            )
        if role not in _ROLES:
            raise InvalidRequestError(
                f"{where}.role must be one of {sorted(_ROLES)}, got {role!r}",
                param=f"{where}.role",
            )
        content = message.get("content")
        if content is None and role != "assistant":
            raise InvalidRequestError(f"{where}.content is required", param=f"{where}.content")
        if content is not None and not isinstance(content, str | list):
            raise InvalidRequestError(
                f"{where}.content must be a string or an array of parts, got {_type_name(content)}",
                param=f"{where}.content",
            )
    return ParsedRequest(model, stream, doc)


def validate_completion(doc: dict[str, Any]) -> ParsedRequest:
    """A legacy completion request: model and a prompt."""
    model, stream = _check_common(doc)
    prompt = doc.get("prompt")
    if prompt is None:
        raise InvalidRequestError("prompt is required", param="prompt")
    if not isinstance(prompt, str | list):
        raise InvalidRequestError(
            f"prompt must be a string or an array, got {_type_name(prompt)}", param="prompt"
        )
    return ParsedRequest(model, stream, doc)


def validate_embeddings(doc: dict[str, Any]) -> tuple[str, list[str], int, str]:
    """An embeddings request → (model, inputs, dimensions, encoding_format)."""
    model = doc.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequestError("model is required and must be a non-empty string", param="model")
    raw = doc.get("input")
    if raw is None:
        raise InvalidRequestError("input is required", param="input")
    inputs = [raw] if isinstance(raw, str) else raw
    if not isinstance(inputs, list):
        raise InvalidRequestError("input must be a string or an array of strings", param="input")
    if not inputs:
        raise InvalidRequestError("input must not be empty", param="input")
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise InvalidRequestError(
            f"input has {len(inputs)} items; at most {MAX_EMBEDDING_INPUTS} per request",
            param="input",
        )
    for i, text in enumerate(inputs):
        if not isinstance(text, str):
            raise InvalidRequestError(
                f"input[{i}] must be a string, got {_type_name(text)} "
                "(token arrays are not supported)",
                param=f"input[{i}]",
            )
        if not text:
            raise InvalidRequestError(f"input[{i}] must not be empty", param=f"input[{i}]")
    dimensions = doc.get("dimensions")
    if dimensions is None:
        dimensions = 0
    if (
        isinstance(dimensions, bool)
        or not isinstance(dimensions, int)
        or not 0 <= dimensions <= INT32_MAX
    ):
        raise InvalidRequestError(
            f"dimensions must be a positive integer, got {dimensions!r}", param="dimensions"
        )
    encoding = doc.get("encoding_format")
    if encoding is None:
        encoding = "float"
    if encoding not in ("float", "base64"):
        raise InvalidRequestError(
            "encoding_format must be float or base64", param="encoding_format"
        )
    return model, inputs, dimensions, encoding
