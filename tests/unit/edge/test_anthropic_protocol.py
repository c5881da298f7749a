"""Anthropic's Messages API at the edge: the documented request schema accepts exactly what
the edge's validation accepts, and SageErrors become Anthropic's error types and statuses."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sage.common.apikeys import InvalidApiKeyError
from sage.common.exceptions import (
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    RateLimitError,
    SageError,
    ServiceUnavailableError,
    UpstreamError,
)
from sage.protocol.anthropic import AnthropicMessagesRequest, anthropic_error
from sage.protocol.openai import decode
from sage.services.edge.openapi import openapi_document

DOC = openapi_document()
jsonschema = pytest.importorskip("jsonschema")
VALIDATOR = jsonschema.Draft202012Validator(
    {"components": DOC["components"], "$ref": "#/components/schemas/AnthropicMessagesRequest"}
)
MSG = [{"role": "user", "content": "hi"}]
BLOCKS = [{"role": "user", "content": [{"type": "text", "text": "x"}]}]
BODIES: list[dict[str, Any]] = [
    {"model": "m", "max_tokens": 5, "messages": MSG},
    {"model": "m", "max_tokens": 5, "messages": MSG, "system": "terse", "stream": True},
    {
        "model": "m",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}],
    },
    {"model": "m", "max_tokens": 5, "messages": MSG, "temperature": 1, "top_k": 3, "top_p": 0.5},
    {
        "model": "m",
        "max_tokens": 5,
        "messages": MSG,
        "stop_sequences": ["a"],
        "metadata": {"user_id": "u"},
    },
    {"model": "m", "max_tokens": 5, "messages": MSG, "tools": [{"name": "t"}]},  # passed on
    {"model": "m", "messages": MSG},
    {"model": "m", "max_tokens": 0, "messages": MSG},
    {"model": "m", "max_tokens": 5, "messages": []},
    {"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]},
    {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": []}]},
    {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": 5}]},
    {"model": "m", "max_tokens": 5, "messages": MSG, "temperature": 1.5},
    {"model": "m", "max_tokens": 5, "messages": MSG, "stop_sequences": "a"},
    {"model": " ", "max_tokens": 5, "messages": MSG},
    {"max_tokens": 5, "messages": MSG},
]


def _accepted(body: dict[str, Any]) -> bool:
    try:
        decode(json.dumps(body).encode(), AnthropicMessagesRequest)
    except InvalidRequestError:
        return False
    return True


@pytest.mark.parametrize("body", BODIES, ids=lambda b: str(b)[:70])
def test_schema_agrees_with_validation(body: dict[str, Any]) -> None:
    assert VALIDATOR.is_valid(body) == _accepted(body)


def test_a_bad_field_is_named() -> None:
    with pytest.raises(InvalidRequestError) as bad:
        decode(
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}',
            AnthropicMessagesRequest,
        )
    status, body = anthropic_error(bad.value)
    assert status == 400 and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]


@pytest.mark.parametrize(
    ("exc", "status", "kind"),
    [
        (ModelNotFoundError("nope"), 404, "not_found_error"),
        (InvalidApiKeyError("no key"), 401, "authentication_error"),
        (RateLimitError("tenant over its limit"), 429, "rate_limit_error"),
        (OverloadedError("queue full"), 529, "overloaded_error"),
        (ServiceUnavailableError("scheduler down"), 503, "overloaded_error"),
        (UpstreamError("engine failed"), 502, "api_error"),
    ],
)
def test_errors_map_to_anthropics_types(exc: SageError, status: int, kind: str) -> None:
    assert anthropic_error(exc) == (
        status,
        {"type": "error", "error": {"type": kind, "message": exc.message}},
    )
