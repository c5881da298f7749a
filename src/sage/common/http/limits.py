"""Connection and header limits for uvicorn's httptools protocol, which has none of its own.

Without them one client holds memory and sockets for free: 200 connections sending 1 MB
of never-ending headers took the edge from 75 to 296 MB (and it stayed there), and
connections that trickle a header byte now and then were never closed. Here:

- a request's head (request line and headers) must be complete within `header_timeout_s`
  of the connection opening, or (on a kept-alive connection) of the first chunk that left
  it unfinished: else 408 (or a plain close if nothing came) — slow-loris connections end
  within that bound plus the event loop's delay;
- a head over `max_header_bytes` or `max_headers` gets 431 before more of it is buffered:
  the parser is fed only up to the byte limit, so a flood costs at most that per connection;
- past `max_connections` open connections a new one is answered 503 and closed at once;
- a chunked body's end (from the last chunk's header through its trailer fields) is held
  to the same rules as a head: it must arrive within `header_timeout_s` of the chunk that
  left it unfinished (408), its bytes are capped at `max_header_bytes` (431; the parser is
  fed a chunked body in pieces of at most that, and counting starts with the piece after
  the one holding the last chunk header, so at most twice that is ever buffered), and its
  fields count towards `max_headers`. Trailer fields are then dropped, not merged into the
  request's headers (RFC 9110 6.5.1);
- a request body may not stall: 408 once nothing of it came for `body_idle_timeout_s`, or
  once it averages under `body_min_rate` bytes/s past its first `body_idle_timeout_s`
  (a body trickled a byte at a time is cut within that bound). Time the server itself is
  not reading (the app has not taken what came, a pipelined request waits, the client
  waits for "100 Continue") does not count. If the app already answered, the connection
  is just closed.

A refused connection is half-closed after the reply and its further input discarded for a
moment (a "lingering close", as nginx does), so the client reads the status instead of a
reset. A request whose head arrives in one piece costs two counters; a timer is armed once
per connection and only again for a head that arrives in pieces, or a body that does (one
timer per such request, rescheduling itself rather than re-armed on every read).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from sage.common.config.settings import HttpSettings, SageSettings
from sage.common.exceptions import ConfigurationError, openai_error_body

# How long a refused connection may keep sending before it is closed regardless.
LINGER_S = 1.0


# The defaults are the settings' (SAGE_HTTP_*), kept in one place.
_DEFAULTS = HttpSettings()


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Limits on what one HTTP client may hold (see the module doc)."""

    header_timeout_s: float = _DEFAULTS.header_timeout_s
    max_header_bytes: int = _DEFAULTS.max_header_bytes
    max_headers: int = _DEFAULTS.max_headers
    max_connections: int = _DEFAULTS.max_connections
    body_idle_timeout_s: float = _DEFAULTS.body_idle_timeout_s
    body_min_rate: int = _DEFAULTS.body_min_rate  # bytes/s; 0: none

    def __post_init__(self) -> None:
        for name in (
            "header_timeout_s",
            "max_header_bytes",
            "max_headers",
            "max_connections",
            "body_idle_timeout_s",
        ):
            if not getattr(self, name) > 0:
                raise ConfigurationError(
                    f"http_{name} must be > 0, got {getattr(self, name)!r}", param=f"http_{name}"
                )
        if not self.body_min_rate >= 0:
            raise ConfigurationError(
                f"http_body_min_rate must be >= 0, got {self.body_min_rate!r}",
                param="http_body_min_rate",
            )

    @classmethod
    def from_settings(cls, settings: SageSettings) -> HttpLimits:
        """The limits named by SAGE_HTTP_HEADER_TIMEOUT_S, SAGE_HTTP_MAX_HEADER_BYTES,
        SAGE_HTTP_MAX_HEADERS, SAGE_HTTP_MAX_CONNECTIONS, SAGE_HTTP_BODY_IDLE_TIMEOUT_S and
        SAGE_HTTP_BODY_MIN_RATE."""
        return cls(**settings.http.model_dump())


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of `limits` (use `protocol_class`)."""

    limits: ClassVar[HttpLimits] = HttpLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None  # a head's or a chunked end's
        self._body_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._in_head = True  # between requests or reading a request's head
        self._head_bytes = 0
        self._head_count = 0
        self._heads_done = 0
        self._too_many_headers = False
        self._refused = False
        # A chunked body: its last chunk header came with no data after it (the body's end
        # and its trailer, or a chunk whose data is still to come), the bytes fed since.
        self._chunked = False
        self._chunk_open = False
        self._new_chunk = False  # a chunk header in the piece being fed
        self._trailer_bytes = 0
        # A body that did not arrive with its head: when its reading started, its last data
        # came, and how much came.
        self._body_start = 0.0
        self._body_last = 0.0
        self._body_bytes = 0

    # --- connection ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        limits = self.limits
        if len(self.connections) > limits.max_connections:
            self._refuse(
                503,
                f"the server has {limits.max_connections} open connections, its limit; "
                "try again shortly",
                "too_many_connections",
                retry_after=True,
            )
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def eof_received(self) -> None:
        if self._refused:
            self.transport.close()
        else:
            super().eof_received()

    def data_received(self, data: bytes | memoryview) -> None:
        if self._refused:
            return  # lingering: the reply is out, the rest is read and dropped
        if not self._in_head:  # a request's body (or a chunked body's end)
            if self._body_timer is not None:
                self._body_last = self.loop.time()
                self._body_bytes += len(data)
            if self._chunked:
                self._feed_chunked(data)
            else:
                self._feed(data)
            return
        # a request's head (and what follows it in the same read)
        room = self.limits.max_header_bytes - self._head_bytes
        if len(data) > room:
            # Feed only what fits: if the head ends in it, go on with the rest.
            heads_done = self._heads_done
            self._head_bytes += room
            if not self._feed(data[:room]) or self._refused:
                return
            if self._heads_done == heads_done:
                self._refuse(
                    431,
                    f"the request line and headers are over {self.limits.max_header_bytes} bytes",
                    "headers_too_large",
                )
                return
            if not self.transport.is_closing():
                self.data_received(data[room:])
            return
        self._head_bytes += len(data)
        self._feed(data)

    def _feed_chunked(self, data: bytes | memoryview) -> None:
        """Feed a chunked body in pieces of at most max_header_bytes, counting the bytes that
        follow a chunk header with no data after it (its end and trailer) like a head's."""
        limit = self.limits.max_header_bytes
        view = memoryview(data)
        while view:
            if self._in_head or not self._chunked:  # it ended: the rest is the next request's
                self.data_received(view)
                return
            room = limit - self._trailer_bytes if self._chunk_open else limit
            if room <= 0:
                self._refuse(
                    431,
                    "the chunked request body's trailer is over "
                    f"{self.limits.max_header_bytes} bytes",
                    "headers_too_large",
                )
                return
            piece, view = view[:room], view[room:]
            self._new_chunk = False
            if not self._feed(piece) or self._refused or self.transport.is_closing():
                return
            if self._chunk_open and not self._new_chunk:
                self._trailer_bytes += len(piece)

    def _feed(self, data: bytes | memoryview) -> bool:
        """uvicorn's data_received, with the limit errors answered as such."""
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self._too_many_headers:
                self._refuse(
                    431,
                    f"the request has over {self.limits.max_headers} headers",
                    "too_many_headers",
                )
            else:
                self._bad_request()
            return False
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self._cancel_timers()  # the connection is the WebSocket protocol's now
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return True
        if self._in_head:
            if self._head_bytes and self._head_timer is None:
                # A head left unfinished by this chunk: from now on it has header_timeout_s.
                # (A head that arrives whole, the usual case, never arms a timer.)
                self._arm_head_timer()
        else:
            # A body left unfinished (one that arrives with its head arms nothing).
            if self._body_timer is None:
                self._arm_body_timer()
            if self._chunk_open and self._head_timer is None:
                self._arm_head_timer()  # the body's end has header_timeout_s, like a head
        return True

    def _bad_request(self) -> None:
        msg = "Invalid HTTP request received."
        self.logger.warning(msg)
        self.send_400_response(msg)

    # --- parser callbacks ----------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_count = 0
        self._chunked = self._chunk_open = False
        self._trailer_bytes = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_count += 1  # trailer fields included
        if self._head_count > self.limits.max_headers:
            self._too_many_headers = True
            raise ValueError("too many headers")  # stops the parser; answered in _feed
        if self._in_head:
            if len(name) == 17 and name.lower() == b"transfer-encoding":
                self._chunked = True
            super().on_header(name, value)
        # else a trailer field: counted, then dropped (RFC 9110 6.5.1: not merged into the
        # headers the app may already have read)

    def on_chunk_header(self) -> None:
        self._chunk_open = self._new_chunk = True
        self._trailer_bytes = 0

    def on_body(self, body: bytes) -> None:
        if self._chunk_open:
            self._chunk_open = False
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
        super().on_body(body)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._heads_done += 1
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0
        self._chunk_open = False
        if self._head_timer is not None:  # a chunked body's end's
            self._head_timer.cancel()
            self._head_timer = None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    # --- timers and refusals -------------------------------------------------------------
    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(
                self.limits.header_timeout_s, self._head_timed_out
            )

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self._refused:
            return
        if not self._in_head:
            self._refuse(
                408,
                "the end of the chunked request body (its last chunk and trailer) did not "
                f"arrive within {self.limits.header_timeout_s:g} s",
                "request_timeout",
            )
            return
        if self._head_bytes == 0:
            self.transport.close()  # nothing sent at all: nobody to tell
            return
        self._refuse(
            408,
            f"the request headers did not arrive within {self.limits.header_timeout_s:g} s",
            "request_timeout",
        )

    def _arm_body_timer(self) -> None:
        now = self.loop.time()
        self._body_start = self._body_last = now
        self._body_bytes = 0
        self._body_timer = self.loop.call_at(
            now + self.limits.body_idle_timeout_s, self._body_timed_out
        )

    def _body_timed_out(self) -> None:
        """Check the body's deadlines; answer 408 past one, else check again at the next."""
        self._body_timer = None
        if self._in_head or self._refused or self.transport.is_closing():
            return
        cycle = self.cycle
        if self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
            self._arm_body_timer()  # the wait is the server's, not the client's: start over
            return
        limits = self.limits
        idle_deadline = self._body_last + limits.body_idle_timeout_s
        deadline = idle_deadline
        if limits.body_min_rate:
            deadline = min(
                deadline,
                self._body_start
                + limits.body_idle_timeout_s
                + self._body_bytes / limits.body_min_rate,
            )
        if self.loop.time() < deadline - 0.001:
            self._body_timer = self.loop.call_at(deadline, self._body_timed_out)
            return
        if deadline == idle_deadline:
            message = f"nothing of the request body arrived for {limits.body_idle_timeout_s:g} s"
        else:
            message = f"the request body arrived slower than {limits.body_min_rate} bytes/s"
        self._refuse(408, message, "request_timeout")

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = self._linger_timer = None

    def _refuse(self, status: int, message: str, code: str, *, retry_after: bool = False) -> None:
        """Answer `status` with an OpenAI error body, then close (lingering, see module doc).

        While a request's body is read, its app is told the client left (so it answers
        nothing more); if it already began an answer, the connection is just closed."""
        self._refused = True
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None
        cycle = self.cycle
        if not self._in_head and cycle is not None:
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
            if cycle.response_started:
                self.transport.close()
                return
        body = orjson.dumps(openai_error_body(message, "invalid_request_error", None, code))
        head = [
            STATUS_LINE[status],
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n",
        ]
        if retry_after:
            head.append(b"retry-after: 1\r\n")
        transport = self.transport
        transport.write(b"".join((*head, b"\r\n", body)))
        if transport.can_write_eof():
            transport.write_eof()
            self._linger_timer = self.loop.call_later(LINGER_S, transport.close)
        else:
            transport.close()


def protocol_class(limits: HttpLimits) -> type[LimitedHttpToolsProtocol]:
    """A LimitedHttpToolsProtocol subclass bound to `limits`, for uvicorn.Config(http=...)."""
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), {"limits": limits})
