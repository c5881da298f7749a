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
- past `max_connections` open connections a new one is answered 503 and closed at once.

A refused connection is half-closed after the reply and its further input discarded for a
moment (a "lingering close", as nginx does), so the client reads the status instead of a
reset. A request whose head arrives in one piece costs two counters; a timer is armed once
per connection and only again for a head that arrives in pieces.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from sage.common.config.settings import SageSettings
from sage.common.exceptions import ConfigurationError, openai_error_body

# How long a refused connection may keep sending before it is closed regardless.
LINGER_S = 1.0


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Limits on what one HTTP client may hold (see the module doc)."""

    header_timeout_s: float = 10.0
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    max_connections: int = 2048

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "max_header_bytes", "max_headers", "max_connections"):
            if not getattr(self, name) > 0:
                raise ConfigurationError(
                    f"http_{name} must be > 0, got {getattr(self, name)!r}", param=f"http_{name}"
                )

    @classmethod
    def from_settings(cls, settings: SageSettings) -> HttpLimits:
        """The limits named by SAGE_HTTP_HEADER_TIMEOUT_S, SAGE_HTTP_MAX_HEADER_BYTES,
        SAGE_HTTP_MAX_HEADERS and SAGE_HTTP_MAX_CONNECTIONS."""
        return cls(
            header_timeout_s=settings.http_header_timeout_s,
            max_header_bytes=settings.http_max_header_bytes,
            max_headers=settings.http_max_headers,
            max_connections=settings.http_max_connections,
        )


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of `limits` (use `protocol_class`)."""

    limits: ClassVar[HttpLimits] = HttpLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._in_head = True  # between requests or reading a request's head
        self._head_bytes = 0
        self._head_count = 0
        self._heads_done = 0
        self._too_many_headers = False
        self._refused = False

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

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: the reply is out, the rest is read and dropped
        if self._in_head:
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
                        "the request line and headers are over "
                        f"{self.limits.max_header_bytes} bytes",
                        "headers_too_large",
                    )
                    return
                if not self.transport.is_closing():
                    self.data_received(data[room:])
                return
            self._head_bytes += len(data)
        self._feed(data)

    def _feed(self, data: bytes) -> bool:
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
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return True
        if self._in_head and self._head_bytes and self._head_timer is None:
            # A head left unfinished by this chunk: from now on it has header_timeout_s.
            # (A head that arrives whole, the usual case, never arms a timer.)
            self._arm_head_timer()
        return True

    def _bad_request(self) -> None:
        msg = "Invalid HTTP request received."
        self.logger.warning(msg)
        self.send_400_response(msg)

    # --- parser callbacks ----------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_count = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_count += 1
        if self._head_count > self.limits.max_headers:
            self._too_many_headers = True
            raise ValueError("too many headers")  # stops the parser; answered in _feed
        super().on_header(name, value)

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
        if self._head_bytes == 0:
            self.transport.close()  # nothing sent at all: nobody to tell
            return
        self._refuse(
            408,
            f"the request headers did not arrive within {self.limits.header_timeout_s:g} s",
            "request_timeout",
        )

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._linger_timer = None

    def _refuse(self, status: int, message: str, code: str, *, retry_after: bool = False) -> None:
        """Answer `status` with an OpenAI error body, then close (lingering, see module doc)."""
        self._refused = True
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
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
