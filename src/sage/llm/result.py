"""What comes back from the gateway: results, SSE decoding and error mapping.

Shared by the sync and the async client, so both parse replies, decode streams and turn
OpenAI error JSON into `sage.common.exceptions` types in exactly the same way. Nothing
here does I/O.
"""

from __future__ import annotations

import email.utils
import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

import orjson

from sage.common.error_bodies import parse_error_body
from sage.common.exceptions import (
    AuthenticationError,
    ConflictError,
    DeadlineExceededError,
    InternalError,
    InvalidRequestError,
    ModelNotFoundError,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
    SageError,
    ServiceUnavailableError,
    UpstreamError,
)

__all__ = [
    "InferenceResult",
    "RerankResult",
    "ResponseEvent",
    "ResponseUsage",
    "ResponsesResult",
    "ResponsesStreamState",
    "SseDecoder",
    "SseState",
    "StreamState",
    "Usage",
    "error_from_payload",
    "parse_retry_after",
    "response_from_reply",
    "result_from_reply",
    "vectors_from_reply",
]

Kind = Literal["chat", "completion"]


@dataclass(frozen=True, slots=True)
class RerankResult:
    """One reranked document: its place in the caller's list, the cross-encoder's score,
    and its text when the engine returned it."""

    index: int
    relevance_score: float
    document: str | None = None


def _count(doc: Mapping[str, Any], key: str) -> int:
    """A token count of a usage object; missing or odd values count as zero."""
    value = doc.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one request, as the engine reported them (zeros when it did not)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def from_json(cls, doc: Any) -> Usage:
        """From an OpenAI `usage` object; missing or odd values count as zero."""
        if not isinstance(doc, Mapping):
            return cls()
        prompt, completion = _count(doc, "prompt_tokens"), _count(doc, "completion_tokens")
        return cls(prompt, completion, _count(doc, "total_tokens") or prompt + completion)


@dataclass(frozen=True, slots=True)
class InferenceResult:
    """One chat or completion answer with the metadata callers log and bill by.

    `request_id` is the gateway's `x-request-id` (quote it when reporting a problem);
    `latency_ms` is the wall time of the whole call, retries included; `raw` is the reply
    JSON (for a stream: `{"chunks": [...]}` with every decoded chunk).
    """

    request_id: str
    content: str
    model: str
    usage: Usage = field(default_factory=Usage)
    latency_ms: float = 0.0
    finish_reason: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.content


def result_from_reply(
    kind: Kind, reply: Any, *, request_id: str, model: str, started: float
) -> InferenceResult:
    """An InferenceResult from a non-streaming chat/completion reply."""
    if not isinstance(reply, dict):
        raise UpstreamError("the gateway sent a reply that is not a JSON object")
    choices = reply.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else {}
    if not isinstance(choice, dict):
        raise UpstreamError("the gateway sent a malformed choice")
    if kind == "chat":
        message = choice.get("message")
        content = message.get("content") if isinstance(message, dict) else None
    else:
        content = choice.get("text")
    finish = choice.get("finish_reason")
    return InferenceResult(
        request_id=request_id,
        content=content if isinstance(content, str) else "",
        model=str(reply.get("model") or model),
        usage=Usage.from_json(reply.get("usage")),
        latency_ms=(time.perf_counter() - started) * 1000.0,
        finish_reason=finish if isinstance(finish, str) else None,
        raw=reply,
    )


class SseDecoder:
    """Server-sent events, fed line by line; yields each event's data once it is complete."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        """Feed one line (without its newline); returns an event's data at its blank line."""
        if not line:
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return data
        if line.startswith(":"):
            return None  # comment / keep-alive
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        """The last event when the stream ended without its blank line."""
        return self.feed("")


ItemT_co = TypeVar("ItemT_co", covariant=True)


class SseState(Protocol[ItemT_co]):
    """What a stream reader needs of a stream's state: each event's data in, an item (or
    None) out, `done` once the last event came, `end` when the body ended, `finish` on close;
    `request_id` is the stream's x-request-id."""

    @property
    def request_id(self) -> str: ...

    @property
    def done(self) -> bool: ...

    def event(self, data: str) -> ItemT_co | None: ...

    def end(self) -> None: ...

    def finish(self) -> None: ...


def stream_event_json(data: str) -> dict[str, Any]:
    """The JSON object of one stream event's data; anything else is the gateway's fault."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise UpstreamError(f"the gateway sent a malformed stream event: {data[:200]!r}") from exc
    if not isinstance(doc, dict):
        raise UpstreamError("the gateway sent a stream event that is not a JSON object")
    return doc


class StreamState:
    """Accumulates a stream's chunks into text deltas and, at the end, an InferenceResult."""

    def __init__(self, kind: Kind, *, request_id: str, model: str, started: float) -> None:
        self.kind: Kind = kind
        self.request_id = request_id
        self.model = model
        self.started = started
        self.chunks: list[dict[str, Any]] = []
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.usage = Usage()
        self.done = False
        self.ended: float | None = None

    def event(self, data: str) -> str | None:
        """Handle one SSE data payload; returns the text delta it carries, if any.

        Raises the mapped SageError for an error event (the HTTP status is already 200
        by then, so errors after the first byte travel inside the stream).
        """
        if data.strip() == "[DONE]":
            self.done = True
            self.finish()
            return None
        chunk = stream_event_json(data)
        if "error" in chunk:
            raise error_from_payload(None, chunk, model=self.model)
        self.chunks.append(chunk)
        if isinstance(chunk.get("model"), str):
            self.model = chunk["model"]
        if chunk.get("usage"):
            self.usage = Usage.from_json(chunk["usage"])
        delta: str | None = None
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            if self.kind == "chat":
                piece = (choice.get("delta") or {}).get("content")
            else:
                piece = choice.get("text")
            if isinstance(piece, str) and piece:
                delta = piece if delta is None else delta + piece
            if isinstance(choice.get("finish_reason"), str):
                self.finish_reason = choice["finish_reason"]
        if delta:
            self.parts.append(delta)
        return delta or None

    def end(self) -> None:
        """The body ended: without [DONE] or a finish reason, it broke off."""
        if not self.done and self.finish_reason is None:
            raise UpstreamError("the stream ended before [DONE]")

    def finish(self) -> None:
        """Stop the latency clock (at [DONE] or when the stream is closed)."""
        if self.ended is None:
            self.ended = time.perf_counter()

    def result(self) -> InferenceResult:
        """Everything received so far, as one InferenceResult."""
        ended = self.ended if self.ended is not None else time.perf_counter()
        return InferenceResult(
            request_id=self.request_id,
            content="".join(self.parts),
            model=self.model,
            usage=self.usage,
            latency_ms=(ended - self.started) * 1000.0,
            finish_reason=self.finish_reason,
            raw={"chunks": self.chunks},
        )


# ---- the Responses API


@dataclass(frozen=True, slots=True)
class ResponseUsage:
    """Token counts of one Responses reply (the Responses API names them input/output)."""

    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0


@dataclass(frozen=True, slots=True)
class ResponsesResult:
    """A Responses API reply (OpenAI's Response object) with what callers read typed.

    `status` is "completed", "incomplete" (see `incomplete_reason`, e.g.
    "max_output_tokens"), "failed" or, in a stream's first events, "in_progress";
    `output_text` joins the output_text parts of its message items, as OpenAI's SDK does;
    `output` holds the items as sent and `raw` the whole object.
    """

    id: str
    model: str
    status: str
    output_text: str
    output: list[dict[str, Any]] = field(default_factory=list)
    usage: ResponseUsage | None = None
    incomplete_reason: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.output_text


def response_from_reply(reply: Any) -> ResponsesResult:
    """A ResponsesResult from a Response object (a reply, or a stream event's `response`)."""
    if not isinstance(reply, dict) or not isinstance(reply.get("id"), str):
        raise UpstreamError("the gateway sent a Responses reply without an `id`")
    items = [item for item in reply.get("output") or () if isinstance(item, dict)]
    text = "".join(
        part["text"]
        for item in items
        if item.get("type") == "message"
        for part in item.get("content") or ()
        if isinstance(part, dict)
        and part.get("type") == "output_text"
        and isinstance(part.get("text"), str)
    )
    usage = reply.get("usage")
    details = reply.get("incomplete_details")
    reason = details.get("reason") if isinstance(details, dict) else None
    return ResponsesResult(
        id=reply["id"],
        model=str(reply.get("model") or ""),
        status=str(reply.get("status") or ""),
        output_text=text,
        output=items,
        usage=(
            ResponseUsage(
                _count(usage, "input_tokens"),
                _count(usage, "output_tokens"),
                _count(usage, "total_tokens"),
            )
            if isinstance(usage, dict)
            else None
        ),
        incomplete_reason=reason if isinstance(reason, str) else None,
        raw=reply,
    )


@dataclass(frozen=True, slots=True)
class ResponseEvent:
    """One event of a streamed Responses reply, typed as OpenAI names it
    (response.created, response.output_text.delta, ..., response.completed).

    `delta` is set on output_text deltas, `response` on events that carry the Response
    object (created, in_progress, completed, incomplete, failed); `data` is the event's JSON.
    """

    type: str
    sequence_number: int | None
    data: dict[str, Any]
    delta: str | None = None
    response: ResponsesResult | None = None


# The events after which a Responses stream carries nothing more.
RESPONSE_END_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})


class ResponsesStreamState:
    """A Responses event stream read so far: events out, the final Response kept.

    An `error` event raises its SageError (the HTTP status is 200 by then); a body that
    ends before response.completed (or incomplete/failed) raises UpstreamError.
    """

    def __init__(self, *, request_id: str, model: str) -> None:
        self.request_id = request_id
        self.model = model
        self.parts: list[str] = []
        self.response: ResponsesResult | None = None
        self.done = False

    def event(self, data: str) -> ResponseEvent:
        """One event's data as a ResponseEvent; raises the mapped error of an error event."""
        doc = stream_event_json(data)
        kind = doc.get("type")
        if kind == "error" or "error" in doc:
            raise error_from_payload(None, _error_event_body(doc), model=self.model)
        if not isinstance(kind, str):
            raise UpstreamError("the gateway sent a Responses event without a `type`")
        delta = doc.get("delta") if kind == "response.output_text.delta" else None
        if isinstance(delta, str):
            self.parts.append(delta)
        carried = doc.get("response")
        response = response_from_reply(carried) if isinstance(carried, dict) else None
        if kind in RESPONSE_END_EVENTS:
            self.done = True
            self.response = response
        number = doc.get("sequence_number")
        return ResponseEvent(
            type=kind,
            sequence_number=number if isinstance(number, int) else None,
            data=doc,
            delta=delta if isinstance(delta, str) else None,
            response=response,
        )

    def end(self) -> None:
        """The body ended: before a final event, it broke off."""
        if not self.done:
            raise UpstreamError("the Responses stream ended before response.completed")

    def finish(self) -> None:
        """Nothing to stop: a Responses result carries no client-side clock."""

    @property
    def output_text(self) -> str:
        """The text deltas received so far, joined."""
        return "".join(self.parts)


def _error_event_body(doc: dict[str, Any]) -> Any:
    """A Responses `error` event ({type, code, message, param}) in OpenAI's error shape,
    so its `code` is read as a reply's would be; other shapes pass as they are."""
    if doc.get("type") == "error" and "error" not in doc:
        return {"error": {key: doc.get(key) for key in ("message", "code", "param")}}
    return doc


def vectors_from_reply(reply: Any, expected: int) -> list[list[float]]:
    """The vectors of an embeddings reply in input order; checks one per input came back."""
    data = reply.get("data") if isinstance(reply, dict) else None
    if not isinstance(data, list) or len(data) != expected:
        got = len(data) if isinstance(data, list) else "no"
        raise UpstreamError(f"the gateway sent {got} embeddings for {expected} inputs")
    try:
        ordered = sorted(data, key=lambda item: int(item["index"]))
        return [[float(v) for v in item["embedding"]] for item in ordered]
    except (KeyError, TypeError, ValueError) as exc:
        raise UpstreamError(f"the gateway sent a malformed embeddings reply: {exc}") from exc


# ---- errors

_BY_STATUS: dict[int, type[SageError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    408: DeadlineExceededError,
    409: ConflictError,
    413: InvalidRequestError,
    422: InvalidRequestError,
    429: OverloadedError,
    500: InternalError,
    502: UpstreamError,
    503: ServiceUnavailableError,
    504: DeadlineExceededError,
}

# For errors inside a stream, where no HTTP status says what happened.
_BY_TYPE: dict[str, type[SageError]] = {
    "invalid_request_error": InvalidRequestError,
    "authentication_error": AuthenticationError,
    "permission_error": PermissionDeniedError,
    "not_found_error": NotFoundError,
    "rate_limit_error": OverloadedError,
    "service_unavailable": ServiceUnavailableError,
    "upstream_error": UpstreamError,
    "timeout": DeadlineExceededError,
    "internal_error": InternalError,
}


@functools.cache
def _by_code() -> dict[str, type[SageError]]:
    """error `code` → the most specific class of the hierarchy that declares it."""
    found: dict[str, type[SageError]] = {}
    pending: list[type[SageError]] = [SageError]
    while pending:
        cls = pending.pop(0)  # breadth first: subclasses override their bases
        # Only the shared hierarchy: its constructors all take (message, *, param, ...).
        if cls.default_code is not None and cls.__module__ == SageError.__module__:
            found[cls.default_code] = cls
        pending.extend(cls.__subclasses__())
    return found


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (delta-seconds or an HTTP date); None when absent or odd."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_from_payload(
    status: int | None,
    payload: Any,
    *,
    text: str = "",
    retry_after: float | None = None,
    model: str | None = None,
) -> SageError:
    """The SageError an OpenAI error reply (HTTP status + JSON) or stream error event means.

    The error `code` wins (it is the most specific), then the HTTP status, then the error
    `type`; `model` is the model the request named, so ModelNotFoundError can say which.
    """
    body = parse_error_body(payload)  # OpenAI's, vLLM's, TEI's, FastAPI's shapes
    raw_code = body.code if body else None
    if status is None and isinstance(raw_code, int):
        status = raw_code  # vLLM puts the HTTP status in `code`
    code = raw_code if isinstance(raw_code, str) else None
    message = (body.message if body else None) or text[:300] or f"HTTP {status or 'error'}"
    param = body.param if body else None
    type_ = body.type if body else None
    cls = _by_code().get(code or "")
    if cls is None and status is not None:
        cls = _BY_STATUS.get(status)
    if cls is None and type_ is not None:
        cls = _BY_TYPE.get(type_)
    if cls is None:
        cls = InvalidRequestError if status is not None and 400 <= status < 500 else InternalError
    if issubclass(cls, ModelNotFoundError):
        error: SageError = cls(model or param or "model", message=message)
        error.retry_after = retry_after
        if code is not None:
            error.code = code
        return error
    return cls(message, param=param, code=code, retry_after=retry_after)
