"""HttpExecutionCoordinator: the one place that talks HTTP to engines.

Unary and streamed calls go through Http1Pool (sage.common.http.http1), a lean keep-alive
HTTP/1.1 client. Engine JSON passes through as raw bytes; streaming responses are split into
SSE events as they arrive, never buffered whole.
While a trace is active, each engine call gets a client span and carries W3C `traceparent`
to the engine; without one (no exporter, no incoming trace) it costs one check.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Iterator, Mapping

from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from sage.common.engine_errors import MAX_ENGINE_MESSAGE_CHARS as MAX_ENGINE_MESSAGE_CHARS
from sage.common.engine_errors import engine_error
from sage.common.engine_keys import engine_key, is_managed
from sage.common.exceptions import DeadlineExceededError, SageError, UpstreamError
from sage.common.http.http1 import (
    ConnectError,
    DisconnectedError,
    Http1Error,
    Http1Pool,
    engine_tls_context,
)

from .registry import EngineRecord

_JSON = {"content-type": "application/json"}
_tracer = trace.get_tracer("sage.scheduler.executor")


@functools.lru_cache(maxsize=4096)
def _json_with_key(key: str) -> Mapping[str, str]:
    return {**_JSON, "authorization": f"Bearer {key}"}


def engine_headers(engine: EngineRecord) -> Mapping[str, str]:
    """The request headers for `engine`: JSON, plus the engine's own key when lifecycle
    started it (derived from the stack's token; external engines get none, and a caller's
    Authorization never reaches any engine). Cached: no dict is built per request."""
    key = engine_key(engine.engine_id, is_managed(engine.backend))
    return _JSON if key is None else _json_with_key(key)


def _engine_span(engine: EngineRecord, path: str) -> tuple[Span | None, Mapping[str, str]]:
    """A client span for one engine call and the headers carrying its context, when a trace
    is active; otherwise (None, the plain headers). The span is not made current, so an
    async generator holding it across yields never leaks it into the caller's context."""
    if not trace.get_current_span().get_span_context().is_valid:
        return None, engine_headers(engine)
    span = _tracer.start_span(
        f"POST {path}",
        kind=SpanKind.CLIENT,
        attributes={
            "http.request.method": "POST",
            "url.full": engine.base_url + path,
            "sage.engine_id": engine.engine_id,
            "sage.model": engine.model,
        },
    )
    headers = dict(engine_headers(engine))
    propagate.inject(headers, context=trace.set_span_in_context(span))
    return span, headers


def _end_span(span: Span, status: int | None, error: BaseException | None) -> None:
    if status is not None:
        span.set_attribute("http.response.status_code", status)
    if error is not None:
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, type(error).__name__))
    span.end()


class EngineUnreachableError(UpstreamError):
    """The engine did not accept the connection; safe to retry on another engine."""

    default_code = "engine_unreachable"


class EngineDisconnectedError(UpstreamError):
    """The engine dropped the connection (it died or restarted) before its reply was whole;
    the request may be sent again elsewhere, from where the client's view of it stopped."""

    default_code = "engine_disconnected"


def _engine_error(engine: EngineRecord, status: int, content: bytes) -> SageError:
    """Map an engine's non-2xx reply to a SageError (sage.common.engine_errors): an
    OpenAI-shaped error keeps its message (clipped); any other body (an HTML page, some
    other service's reply, a redirect) is summarised, so a caller never reads what an
    address answered."""
    return engine_error(engine.engine_id, status, content)


@contextlib.contextmanager
def _http1_errors(engine: EngineRecord) -> Iterator[None]:
    """Http1Pool failures → SageErrors; a refused or dropped connection may be retried
    elsewhere (EngineUnreachableError, EngineDisconnectedError), nothing else."""
    try:
        yield
    except ConnectError as exc:
        raise EngineUnreachableError(
            f"engine {engine.engine_id} at {engine.base_url} is unreachable: {exc}"
        ) from exc
    except DisconnectedError as exc:
        raise EngineDisconnectedError(
            f"engine {engine.engine_id} dropped the connection: {exc}"
        ) from exc
    except TimeoutError as exc:
        raise DeadlineExceededError(f"engine {engine.engine_id} timed out") from exc
    except Http1Error as exc:
        raise UpstreamError(f"engine {engine.engine_id} failed: {exc!r}") from exc


def _split_events(buffer: bytearray) -> list[bytes]:
    """Pop every complete SSE event's data payload from `buffer`."""
    payloads: list[bytes] = []
    while True:
        end = buffer.find(b"\n\n")
        sep = 2
        crlf = buffer.find(b"\r\n\r\n")
        if crlf != -1 and (end == -1 or crlf < end):
            end, sep = crlf, 4
        if end == -1:
            return payloads
        event = bytes(buffer[:end])
        del buffer[: end + sep]
        data = [line[5:].lstrip() for line in event.splitlines() if line.startswith(b"data:")]
        if data:
            payloads.append(b"\n".join(data))


# The Responses API's stream ends with one of these events, not [DONE].
_RESPONSE_ENDS = (b'"response.completed"', b'"response.incomplete"', b'"response.failed"')
# So does Anthropic's Messages API stream (/v1/messages), with message_stop.
_MESSAGE_ENDS = (b'"message_stop"',)


def _finished_without_done(path: str, last: bytes) -> bool:
    """Whether a stream that ended without [DONE] is whole: a Responses or Messages API
    stream whose last event is its terminal one."""
    if path.endswith("/messages"):
        return any(end in last for end in _MESSAGE_ENDS)
    return path.endswith("/responses") and any(end in last for end in _RESPONSE_ENDS)


async def _traced(payloads: AsyncIterator[bytes], span: Span) -> AsyncIterator[bytes]:
    """`payloads`, ending `span` when the stream ends, fails or is abandoned."""
    error: Exception | None = None
    try:
        async for payload in payloads:
            yield payload
    except Exception as exc:
        error = exc
        raise
    finally:
        _end_span(span, None, error)


class HttpExecutionCoordinator:
    """Sends requests to engines over pooled HTTP/1.1 keep-alive connections.

    Not httpx: under load its per-request cost was ~60% of the scheduler's CPU (py-spy,
    bench/gateway_overhead.py); not aiohttp either: Http1Pool costs less than half of its
    CPU per request (sage.common.http.http1). `max_connections` caps engine requests in
    flight, unary and streamed together (each holds one connection, a stream until it
    ends); more wait for a free one within `request_timeout_s`, which covers a whole
    stream, not just its start.
    """

    def __init__(
        self,
        *,
        request_timeout_s: float = 600.0,
        connect_timeout_s: float = 5.0,
        max_connections: int = 2048,
    ) -> None:
        self._request_timeout_s = request_timeout_s
        # https engines are verified against SAGE_TLS_CA_FILE (our cert for mTLS); the
        # context is built on the first https connection.
        self._pool = Http1Pool(
            connect_timeout_s=connect_timeout_s,
            max_connections=max_connections,
            ssl_context=engine_tls_context,
        )

    async def aclose(self) -> None:
        """Close every pooled connection."""
        await self._pool.aclose()

    def abort(self, engine: EngineRecord, reason: str) -> int:
        """Break every connection to `engine` now, as if it had dropped them: each call
        under way there raises EngineDisconnectedError (so it fails over, or a stream
        resumes elsewhere). Returns how many calls were cut."""
        return self._pool.abort(engine.base_url, reason)

    async def post_json(self, engine: EngineRecord, path: str, body: bytes) -> bytes:
        """POST raw JSON to the engine and return its raw JSON reply."""
        span, headers = _engine_span(engine, path)
        status: int | None = None
        try:
            with _http1_errors(engine):
                status, content = await self._pool.post(
                    engine.base_url, path, body, headers, self._request_timeout_s
                )
            if status >= 300:  # a redirect is an error: engine calls never follow one
                raise _engine_error(engine, status, content)
        except BaseException as exc:
            if span is not None:
                _end_span(span, status, exc if isinstance(exc, Exception) else None)
            raise
        if span is not None:
            _end_span(span, status, None)
        return content

    def stream_sse(self, engine: EngineRecord, path: str, body: bytes) -> AsyncIterator[bytes]:
        """POST and yield each SSE `data:` payload as it arrives, stopping at `[DONE]`."""
        span, headers = _engine_span(engine, path)
        payloads = self._stream_sse(engine, path, body, headers)
        return payloads if span is None else _traced(payloads, span)

    async def _stream_sse(
        self, engine: EngineRecord, path: str, body: bytes, headers: Mapping[str, str]
    ) -> AsyncIterator[bytes]:
        with _http1_errors(engine):
            stream = await self._pool.stream(
                engine.base_url, path, body, headers, self._request_timeout_s
            )
        try:
            if stream.status >= 300:
                with _http1_errors(engine):
                    content = await stream.read()
                raise _engine_error(engine, stream.status, content)
            buffer = bytearray()
            last = b""
            with _http1_errors(engine):
                async for chunk in stream:
                    buffer += chunk
                    for payload in _split_events(buffer):
                        if payload == b"[DONE]":
                            # Done: the connection is pooled once the reply's last bytes
                            # (the chunked terminator) are in; nothing more is read here.
                            stream.release()
                            return
                        yield payload
                        last = payload
            if _finished_without_done(path, last):
                stream.release()
                return
            # The body ended without [DONE]: the engine went away mid-reply.
            raise EngineDisconnectedError(
                f"engine {engine.engine_id} closed the stream before [DONE]"
            )
        finally:
            # Left early (the caller stopped, or an error): the connection is closed, so the
            # engine sees the disconnect and stops generating.
            stream.close()
