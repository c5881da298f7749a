"""The one parser of OpenAI-style error bodies, whoever sent them.

Engines, providers and our own edge answer errors in a handful of shapes:

- OpenAI's, which vLLM, the sim and the edge send too: `{"error": {"message", "type",
  "param", "code"}}` (vLLM puts the HTTP status in `code`, an int);
- vLLM's older ErrorResponse, flat: `{"object": "error", "message", "type", "param", "code"}`;
- TEI's `{"error": "...", "error_type": "..."}`, and the bare `{"error": "Unauthorized"}` of
  vLLM's API-key check;
- FastAPI's own (vLLM's unknown routes, Infinity): `{"detail": "Not Found"}` or a validation
  list `{"detail": [{"loc": [...], "msg": "..."}]}`;
- other providers': `{"error": {"msg" | "detail": ...}}`, a top-level `message`, `Message`
  (AWS) or `msg`.

`parse_error_body` reads them all into one ErrorBody; `openai` says whether the shape is one
of the first three, which is what callers that pass an engine's words on (clipped) to users
require (sage.common.engine_errors): any other body is summarised instead, so a user never
reads what some address answered. What each caller does with the parts is its own business.

Plain code: orjson only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

__all__ = ["ErrorBody", "loads_error_body", "parse_error_body"]

# FastAPI's `loc` starts with where the field was; the rest names it.
_LOC_SOURCES = frozenset({"body", "query", "path", "header", "cookie"})
# Top-level keys that carry an error's words in non-OpenAI shapes, in the order tried.
_TOP_LEVEL_TEXT = ("message", "Message", "detail", "msg")


@dataclass(frozen=True, slots=True)
class ErrorBody:
    """What an error body says. `message` is None when it carries no words (an error
    object with only a code); `openai` is True for OpenAI's, vLLM's and TEI's shapes."""

    message: str | None
    type: str | None = None
    param: str | None = None
    code: str | int | None = None
    openai: bool = False


def loads_error_body(content: bytes | str) -> ErrorBody | None:
    """`parse_error_body` of a raw reply; None when it is not JSON."""
    try:
        doc = orjson.loads(content)
    except orjson.JSONDecodeError:
        return None
    return parse_error_body(doc)


def parse_error_body(doc: Any) -> ErrorBody | None:
    """The error a decoded JSON reply (or stream event) carries; None when it is no error
    shape we know (see the module docstring for the shapes, tried in that order)."""
    if not isinstance(doc, dict):
        return None
    err = doc.get("error")
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return _fields(err, err["message"], openai=True)
    if doc.get("object") == "error" and isinstance(doc.get("message"), str):
        return _fields(doc, doc["message"], openai=True)
    if isinstance(err, str):
        error_type = _text(doc.get("error_type"))
        return ErrorBody(err, type=error_type, openai=error_type is not None)
    if isinstance(err, dict):  # an error object without `message`: other words, or none
        words = _text(err.get("msg")) or _text(err.get("detail")) or _top_level_text(doc)
        return _fields(err, words, openai=False)
    words = _top_level_text(doc)
    if words is None:
        return None
    detail = doc.get("detail")
    param = _validation_param(detail) if isinstance(detail, list) else _text(doc.get("param"))
    return ErrorBody(words, param=param)


def _fields(holder: dict[str, Any], message: str | None, *, openai: bool) -> ErrorBody:
    code = holder.get("code")
    if isinstance(code, bool) or not isinstance(code, str | int):
        code = None
    return ErrorBody(
        message,
        type=_text(holder.get("type")),
        param=_text(holder.get("param")),
        code=code,
        openai=openai,
    )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _top_level_text(doc: dict[str, Any]) -> str | None:
    for key in _TOP_LEVEL_TEXT:
        value = doc.get(key)
        if isinstance(value, str):
            return value
        if key == "detail" and isinstance(value, list):
            return _validation_message(value)
        if value is not None:
            return orjson.dumps(value).decode()
    return None


def _validation_message(detail: list[Any]) -> str:
    """FastAPI's validation list as `body.encoding_format: Input should be 'float'; ...`."""
    parts = []
    for item in detail:
        if isinstance(item, dict):
            loc = item.get("loc")
            where = ".".join(map(str, loc)) if isinstance(loc, list) else ""
            msg = str(item.get("msg") or "")
            parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts) if parts else orjson.dumps(detail).decode()


def _validation_param(detail: list[Any]) -> str | None:
    """The field the first validation error names: `encoding_format` of `["body",
    "encoding_format"]`, `input.0` of `["body", "input", 0]`."""
    for item in detail:
        loc = item.get("loc") if isinstance(item, dict) else None
        if isinstance(loc, list) and loc:
            named = loc[1:] if loc[0] in _LOC_SOURCES else loc
            return ".".join(map(str, named)) or None
    return None
