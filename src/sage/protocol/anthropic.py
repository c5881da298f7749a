"""Anthropic's Messages API (POST /v1/messages) as SAGE serves it: the request model the
edge validates, and Anthropic's own error shape.

The edge forwards the raw body to an engine that serves /v1/messages (vLLM does); only
what the gateway checks is typed here, and unknown fields (tools, thinking, ...) pass on
to the engine. Errors use Anthropic's words, not OpenAI's, because Anthropic's SDKs read
`error.type` to pick the exception they raise.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from sage.common.exceptions import OverloadedError, RateLimitError, SageError
from sage.protocol.openai import INT32_MAX, NOT_BLANK

__all__ = [
    "SCHEMA_MODELS",
    "AnthropicContentBlock",
    "AnthropicErrorDetail",
    "AnthropicErrorResponse",
    "AnthropicMessage",
    "AnthropicMessageResponse",
    "AnthropicMessagesRequest",
    "anthropic_error",
    "json_schemas",
]


class _Model(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Keyword-only fields, defaults left out when encoding."""


class AnthropicContentBlock(_Model):
    """One content block (text, image, tool_use, tool_result, ...): the engine judges its
    other fields."""

    type: str
    text: str | None = None


Content = str | Annotated[list[AnthropicContentBlock], msgspec.Meta(min_length=1)]


class AnthropicMessage(_Model):
    """One turn: Anthropic has only user and assistant turns (the system prompt is apart)."""

    role: Literal["user", "assistant"]
    content: Annotated[Content, msgspec.Meta(description="Text, or an array of content blocks.")]


class AnthropicMessagesRequest(_Model):
    """POST /v1/messages. `max_tokens` is required, as Anthropic's API requires it."""

    model: Annotated[
        str,
        msgspec.Meta(min_length=1, pattern=NOT_BLANK, description="Model (or alias) to route to."),
    ]
    messages: Annotated[list[AnthropicMessage], msgspec.Meta(min_length=1)]
    max_tokens: Annotated[
        int, msgspec.Meta(ge=1, le=INT32_MAX, description="Most tokens to generate.")
    ]
    system: str | list[AnthropicContentBlock] | None = None
    stream: Annotated[
        bool | None, msgspec.Meta(description="Stream Anthropic's server-sent events.")
    ] = False
    temperature: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    top_k: Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)] | None = None
    stop_sequences: list[str] | None = None
    metadata: dict[str, Any] | None = None

    @property
    def streaming(self) -> bool:
        return bool(self.stream)


ErrorType = Literal[
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "not_found_error",
    "request_too_large",
    "rate_limit_error",
    "overloaded_error",
    "api_error",
]


class AnthropicErrorDetail(_Model):
    type: ErrorType
    message: str


class AnthropicErrorResponse(_Model):
    """Anthropic's error shape: `{"type": "error", "error": {"type", "message"}}`."""

    type: Literal["error"]
    error: AnthropicErrorDetail


class AnthropicMessageResponse(_Model):
    """The engine's reply (a message), relayed unchanged: vLLM's shape, which may add
    fields of its own."""

    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    content: list[dict[str, Any]]
    model: str
    stop_reason: str | None = None
    stop_sequence: str | None = None
    usage: dict[str, Any] | None = None


SCHEMA_MODELS: tuple[type[_Model], ...] = (
    AnthropicMessagesRequest,
    AnthropicMessageResponse,
    AnthropicErrorResponse,
)


def json_schemas(ref_prefix: str = "#/components/schemas/") -> dict[str, Any]:
    """JSON Schemas of the models, by name, with refs under `ref_prefix` (OpenAPI's)."""
    _, schemas = msgspec.json.schema_components(SCHEMA_MODELS, ref_template=ref_prefix + "{name}")
    for schema in schemas.values():
        schema.pop("title", None)
    return schemas


_BY_STATUS: dict[int, ErrorType] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
}
# Anthropic's status for "overloaded": its SDKs retry it.
OVERLOADED_STATUS = 529


def anthropic_error(exc: SageError) -> tuple[int, dict[str, Any]]:
    """The HTTP status and Anthropic error body for `exc`: a full queue (not a tenant's
    rate limit) is Anthropic's overloaded_error (529); a bad field is named in the message."""
    status = exc.http_status
    kind: ErrorType = _BY_STATUS.get(status, "api_error")
    if isinstance(exc, OverloadedError) and not isinstance(exc, RateLimitError):
        status, kind = OVERLOADED_STATUS, "overloaded_error"
    message = exc.message
    if kind == "invalid_request_error" and exc.param and exc.param not in message:
        message = f"{exc.param}: {message}"
    return status, {"type": "error", "error": {"type": kind, "message": message}}
