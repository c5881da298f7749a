"""What an engine's error reply becomes.

Both hops to engines (the scheduler's ExecutionCoordinator and the embedding service's
EmbeddingExecutor) map an engine's non-2xx reply through `engine_error`. An OpenAI-shaped
error (OpenAI's `{"error": {...}}`, vLLM's older `{"object": "error", ...}`, TEI's
`{"error": "...", "error_type": ...}`) keeps its message and param, clipped to one short
line; any other body (an HTML page, some other service's reply, a redirect) is summarised
as `HTTP 500 (html, 1234 bytes)`, never echoed, so a caller never reads what an address
answered. The HTTP status picks the error class. The body is read by
sage.common.error_bodies, the one parser of error bodies.

Plain code: no grpc, no HTTP client or server framework.
"""

from __future__ import annotations

from sage.common.error_bodies import loads_error_body
from sage.common.exceptions import (
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    SageError,
    UpstreamError,
)

__all__ = [
    "MAX_ENGINE_MESSAGE_CHARS",
    "clip",
    "engine_error",
    "openai_error_parts",
    "summarise_reply",
]

# An engine's own error message is passed on up to this many characters; anything else an
# engine (or whatever answers at its address) sends is summarised, never echoed.
MAX_ENGINE_MESSAGE_CHARS = 300
_MAX_PARAM_CHARS = 64
# Statuses that mean the caller's request was refused as such (a 400 for the caller).
_INVALID_REQUEST_STATUSES = (400, 413, 422)


def clip(text: str, limit: int) -> str:
    """`text` on one line, without control characters, at most `limit` characters."""
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def openai_error_parts(content: bytes) -> tuple[str, str | None] | None:
    """(message, param) of an OpenAI-shaped error body (OpenAI's `{"error": {...}}`, vLLM's
    older `{"object": "error", ...}`, TEI's `{"error": "...", "error_type": ...}`), clipped;
    None for any other body."""
    body = loads_error_body(content)
    if body is None or not body.openai or body.message is None:
        return None
    param = clip(body.param, _MAX_PARAM_CHARS) if body.param else None
    return clip(body.message, MAX_ENGINE_MESSAGE_CHARS), param


def summarise_reply(status: int, content: bytes) -> str:
    """`HTTP 500 (html, 1234 bytes)`: what came back, without what it said."""
    head = content[:64].lstrip().lower()
    if not head:
        kind = "empty"
    elif head.startswith((b"<!doctype html", b"<html", b"<")):
        kind = "html"
    elif head.startswith((b"{", b"[")):
        kind = "json"
    else:
        kind = "text"
    return f"HTTP {status} ({kind}, {len(content)} bytes)"


def engine_error(
    engine_id: str,
    status: int,
    content: bytes,
    *,
    label: str = "engine",
    default_param: str | None = None,
) -> SageError:
    """The SageError for an engine's non-2xx reply (`status`, raw body `content`).

    `label` names the engine in messages ("engine", "embedding engine"); `default_param`
    is the param an invalid-request error names when the engine named none. 400/413/422
    are InvalidRequestError, 429 OverloadedError (retryable elsewhere), a model-naming 404
    ModelNotFoundError, anything else (3xx included: redirects are never followed)
    UpstreamError."""
    who = f"{label} {engine_id}"
    parts = openai_error_parts(content)
    if parts is None:
        what = "a redirect, not followed" if 300 <= status < 400 else "not an OpenAI error"
        message = f"{who} returned {summarise_reply(status, content)}, {what}; see its log"
        param = None
    else:
        message, param = parts
        if status == 404 and (param == "model" or "model" in message.lower()):
            return ModelNotFoundError(param or "model", message=message)
    if status in _INVALID_REQUEST_STATUSES:
        return InvalidRequestError(message, param=param or default_param)
    if status == 429:
        return OverloadedError(f"{who} is overloaded: {message}")
    if parts is None:
        return UpstreamError(message)
    return UpstreamError(f"{who} returned HTTP {status}: {message}")
