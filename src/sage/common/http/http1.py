"""Http1Pool: the one HTTP/1.1 keep-alive client for calls to engines.

The scheduler's chat and completion calls, the embedding service's batches, the scheduler's
/metrics scrape and lifecycle's health checks and registration probe all go through it.

Why not aiohttp: on a kept-alive loopback connection an aiohttp POST costs ~0.18 ms of
process CPU (request/response objects, stream readers, timers, tracing hooks), a large part
of the gateway's added latency. A bare `asyncio.Protocol` that writes the request in one
call and parses the reply with httptools (llhttp, the parser uvicorn uses) does the same
exchange in ~0.08 ms (p50 wall 0.35 → 0.22 ms against the sim engine, on uvloop). It only
does what engine calls need: POST a body or GET a path, and return the status and the whole
body (`post`, `get`) or the status and then the body as it arrives (`stream`, for SSE).
Redirects are never followed: a 3xx is a reply like any other.

Streams: body chunks collect in the connection's list until the one reader takes them all
at once (no queue, one future per wait); past `stream_buffer_limit` unread bytes the socket
stops being read until the reader catches up. A stream that ends early closes its
connection, which is how the engine learns to stop generating.

What it does keep from a real client: per-origin LIFO pools of idle connections (capped),
TLS with a caller-supplied context, a total and a connect timeout, one transparent retry
when a reused idle connection turns out to have been closed by the server before it sent
anything (uvicorn drops idle keep-alives after 5 s), and errors split the way failover
needs them: not connected (safe to retry anywhere) vs. dropped after sending vs. garbage.
A stream's DisconnectedError means exactly that the reply was cut short: the scheduler
resumes the stream elsewhere on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, Literal, NoReturn, cast
from urllib.parse import urlsplit

import httptools

from sage.common.grpc.tls import process_tls

__all__ = [
    "ConnectError",
    "DisconnectedError",
    "Http1Error",
    "Http1Pool",
    "Http1Stream",
    "ProtocolError",
    "engine_tls_context",
]

_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
# Parsed base URLs kept; engines are few, this only bounds a pathological caller.
_MAX_TARGETS: Final = 4096
# A streamed reply's body bytes buffered unread before reading from the socket pauses.
STREAM_BUFFER_LIMIT: Final = 1 << 20
# Reply bytes a released stream may still take (unread) before its connection is pooled.
_DRAIN_MAX_BYTES: Final = 64 * 1024


class Http1Error(Exception):
    """Base of the errors Http1Pool raises (timeouts are the builtin TimeoutError)."""


class ConnectError(Http1Error):
    """No connection could be made (refused, unreachable, DNS, TLS handshake, none within
    the connect timeout); nothing was sent, so the request may go to another server."""


class DisconnectedError(Http1Error):
    """The connection broke after the request was (partly) sent and before the reply was
    whole; the server may or may not have acted on it."""


class ProtocolError(Http1Error):
    """The server's reply was not valid HTTP/1.x."""


class _StaleConnection(Exception):
    """A reused idle connection closed before any reply byte, right after the request went
    out: the server had dropped it while idle, so the request was never worked on."""


# A close later than this after the request was sent may come from an engine that was
# working on it (a non-streamed reply sends nothing until it is done): not retried here,
# so the request is not run twice; the scheduler fails it over instead.
_STALE_WINDOW_S = 0.1


@dataclass(frozen=True, slots=True)
class _Target:
    """One base URL, parsed once: where to connect and what to put in the request line."""

    key: tuple[str, str, int]  # (scheme, host, port): the pool key
    host: str
    port: int
    tls: bool
    prefix: bytes  # the base URL's own path, put before every request path
    host_header: bytes


def _parse_target(base_url: str) -> _Target:
    try:
        parts = urlsplit(base_url)
        scheme = parts.scheme.lower()
        default_port = _DEFAULT_PORTS[scheme]
        port = parts.port or default_port
        host = parts.hostname
        if not host:
            raise ValueError("no host")
        shown = f"[{host}]" if ":" in host else host
        if port != default_port:
            shown = f"{shown}:{port}"
        return _Target(
            key=(scheme, host, port),
            host=host,
            port=port,
            tls=scheme == "https",
            prefix=parts.path.encode("ascii"),
            host_header=shown.encode("ascii" if shown.isascii() else "idna"),
        )
    except (KeyError, ValueError) as exc:  # UnicodeError is a ValueError
        raise Http1Error(f"not an http(s) base URL: {base_url!r}") from exc


def _header_block(headers: Mapping[str, str]) -> bytes:
    lines = []
    for name, value in headers.items():
        line = f"{name}: {value}\r\n"
        if line.count("\n") != 1 or "\r" in line[:-2]:
            raise ValueError(f"header {name!r} contains a line break")
        lines.append(line)
    return "".join(lines).encode("latin-1")


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection carrying one request at a time.

    The protocol callbacks fill in the reply and resolve `_waiter`; the pool owns the
    connection between requests (`idle_in` is the list it sits in while idle).

    A unary request's waiter resolves when the reply is whole. A streamed one's resolves at
    the reply's head; its body chunks then collect in `_body` until the Http1Stream takes
    them, which parks a fresh `_waiter` while nothing is buffered (one consumer, one future
    per wait, none per chunk). Reading pauses above the stream's buffer limit.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, generation: int) -> None:
        self._loop = loop
        self.generation = generation  # the pool's at creation; aclose() moves the pool on
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.requests = 0
        self._sent_at = 0.0
        self.idle_in: list[_Connection] | None = None
        self.open_in: set[_Connection] | None = None  # the pool's open ones of its origin
        self._active = False  # a request is out: its reply's bytes are expected
        # Per-reply state, reset by send().
        self.status = 0
        self.keep_alive = False
        self._body: list[bytes] = []
        self._got_bytes = False
        self._headers_done = False
        self._framed = False  # Content-Length or Transfer-Encoding seen
        self._done = False
        # Streamed replies only.
        self._streaming = False
        self._in_body = False  # the head was handed to the caller; the body follows
        self._buffered = 0  # body bytes received and not yet taken
        self.peak_buffered = 0  # the most ever buffered at once (tests, diagnostics)
        self._limit = 0
        self._paused = False
        self._error: Exception | None = None  # raised once the buffered body is taken
        self.timed_out = False
        self._timer: asyncio.TimerHandle | None = None
        self._drained: Callable[[], None] | None = None  # set while draining (see drain())

    # --- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # asyncio and uvloop set it already; cheap insurance, once per connection.
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if not self._active or self._done:
            # Bytes nobody asked for (idle, or after a whole reply): the stream is out of step.
            self.close()
            return
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ProtocolError("unexpected protocol upgrade in a reply"))
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"malformed HTTP reply: {exc}"))
        if self._in_body:
            self._stream_data_in()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.idle_in is not None:
            # Dropped while idle: leave the pool now rather than when someone takes it.
            with contextlib.suppress(ValueError):
                self.idle_in.remove(self)
            self.idle_in = None
        if self.open_in is not None:
            self.open_in.discard(self)
            self.open_in = None
        if not self._active or self._done:
            return
        if self._in_body:
            if exc is None and not self._framed and self._error is None:
                # No Content-Length, not chunked: the body is whatever came before EOF.
                self.keep_alive = False
                self._done = True
            elif self._error is None:
                why = f"{exc!r}" if exc is not None else "EOF"
                self._error = DisconnectedError(f"server closed the connection mid-reply: {why}")
            self._wake()
            return
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if exc is None and self._headers_done and not self._framed:
            self.keep_alive = False
            waiter.set_result(None)
        elif (
            not self._got_bytes
            and self.requests > 1
            and self._loop.time() - self._sent_at < _STALE_WINDOW_S
        ):
            waiter.set_exception(_StaleConnection())
        else:
            why = f"{exc!r}" if exc is not None else "EOF"
            stage = "mid-reply" if self._got_bytes else "before replying"
            waiter.set_exception(DisconnectedError(f"server closed the connection {stage}: {why}"))

    # --- httptools callbacks -----------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._done:  # a second reply in the same read: pipelining we never asked for
            raise ProtocolError("a reply nobody asked for")

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered == b"content-length" or lowered == b"transfer-encoding":
            self._framed = True

    def on_headers_complete(self) -> None:
        self._headers_done = True
        self.status = self._parser.get_status_code()
        if self._streaming and self.status >= 200:
            # The head is what a stream's caller waits for; the body is read as it comes.
            self._in_body = True
            waiter, self._waiter = self._waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)

    def on_message_complete(self) -> None:
        if 100 <= self.status < 200:  # an interim reply (100 Continue); the real one follows
            self._headers_done = self._framed = False
            self._body.clear()
            self._buffered = 0
            return
        self._done = True
        self.keep_alive = self._parser.should_keep_alive()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- used by the pool --------------------------------------------------------------
    def send(self, request: bytes, stream_limit: int = 0) -> asyncio.Future[None]:
        """Write one request; the future resolves when its reply is whole or, with a
        `stream_limit` (the most body bytes to buffer before pausing), at its head."""
        self.requests += 1
        self._sent_at = self._loop.time()
        self.status = 0
        self.keep_alive = False
        self._body = []
        self._got_bytes = self._headers_done = self._framed = self._done = False
        self._active = True
        if stream_limit:
            self._streaming = True
            self._limit = stream_limit
            self._in_body = self._paused = False
            self._buffered = self.peak_buffered = 0
            self._error = None
        elif self._streaming:
            self._streaming = self._in_body = False
        waiter = self._waiter = self._loop.create_future()
        if self.closed or self._transport is None or self._transport.is_closing():
            waiter.set_exception(
                _StaleConnection()
                if self.requests > 1
                else DisconnectedError("connection closed before the request was sent")
            )
        else:
            self._transport.write(request)
        return waiter

    def finish(self) -> bytes:
        """The reply body; the connection is ready for another request."""
        self._waiter = None
        self._active = False
        body = self._body
        return body[0] if len(body) == 1 else b"".join(body)

    def reusable(self) -> bool:
        return (
            self.keep_alive
            and not self.closed
            and not (self._transport is None or self._transport.is_closing())
        )

    def _fail(self, exc: Exception) -> None:
        if self._in_body:
            if not self._done and self._error is None:
                self._error = exc
        else:
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_exception(exc)
        self.close()

    def close(self) -> None:
        self.keep_alive = False
        if self._transport is not None:
            self._transport.close()

    def abort(self, error: DisconnectedError) -> bool:
        """Break the connection now, as if the server had dropped it: a request waiting on
        it fails with `error` (a stream after the body bytes that did arrive). Nothing is
        flushed: the peer may be unreachable. True when a request was cut."""
        cut = self._active and not self._done and self._drained is None
        if cut:
            if self._in_body:
                if self._error is None:
                    self._error = error
                self._wake()
            else:
                waiter = self._waiter
                if waiter is not None and not waiter.done():
                    waiter.set_exception(error)
        self.keep_alive = False
        if self._transport is not None:
            self._transport.abort()
        return cut

    # --- streamed replies (used by Http1Stream) ----------------------------------------
    def _stream_data_in(self) -> None:
        """After each read of a streamed body: flow control, then wake the reader."""
        if self._drained is not None:
            self._body.clear()  # nobody reads it any more
            if self._done:
                self._end_drain()
            elif self._buffered > _DRAIN_MAX_BYTES:
                self.close()
            return
        if self._buffered > self.peak_buffered:
            self.peak_buffered = self._buffered
        if self._buffered > self._limit and not self._paused and not self._done:
            self._paused = True
            if self._transport is not None:
                self._transport.pause_reading()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def arm(self, deadline: float) -> None:
        """Fail the stream with TimeoutError at `deadline` (the loop's clock)."""
        if not self._done and not self.closed:
            self._timer = self._loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        self._timer = None
        self.timed_out = True
        self.close()
        self._wake()

    def take(self) -> bytes:
        """Every body byte buffered now, in one piece; reading resumes if it was paused."""
        body = self._body
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self._buffered = 0
        if self._paused:
            self._resume()
        return data

    def end_stream(self) -> None:
        """The stream's caller is done with it: no timer, no reader, reading on."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake()  # a read waiting in another task sees the stream ended
        self._waiter = None
        self._active = self._in_body = False
        self._body.clear()
        self._buffered = 0
        if self._paused:
            self._resume()

    def _resume(self) -> None:
        self._paused = False
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def drain(self, release: Callable[[], None], within_s: float) -> None:
        """Let the rest of the reply (e.g. a chunked body's terminator, after the last SSE
        event) arrive unread, then `release` the connection; closed if that takes longer
        than `within_s` or more than _DRAIN_MAX_BYTES."""
        self._drained = release
        self._waiter = None
        self._body.clear()
        self._buffered = 0
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(within_s, self._expire)
        if self._paused:
            self._resume()

    def _end_drain(self) -> None:
        release, self._drained = self._drained, None
        self.end_stream()
        if release is not None:
            release()


class Http1Stream:
    """A streamed reply: `status` at once, then the body as it arrives.

    Iterate it (or call read_chunk()) for body chunks: everything that arrived since the
    last read comes as one piece. The reply ends with the iteration; the connection goes
    back to the pool if the reply was whole and kept alive. Ending it early — close(), a
    cancelled read, an exception, or the stream being dropped — closes the connection, so
    the server sees the client leave (vLLM then aborts the generation). `release()` is
    for a caller that has all it wants before the reply's last bytes (the SSE `[DONE]`
    event before the chunked terminator): the connection stays open a moment for the
    rest and is pooled once the reply is whole.

    Errors: DisconnectedError when the connection drops before the reply is whole (after
    the body bytes that did arrive), ProtocolError for a malformed reply, TimeoutError once
    the pool's total timeout, counted from the request, has passed.
    """

    __slots__ = ("_conn", "_error", "_key", "_pool", "status")

    def __init__(
        self, pool: Http1Pool, key: tuple[str, str, int], conn: _Connection, deadline: float
    ) -> None:
        self._pool: Http1Pool | None = pool
        self._key = key
        self._conn: _Connection | None = conn
        self._error: BaseException | None = None
        self.status = conn.status
        conn.arm(deadline)

    def __aiter__(self) -> Http1Stream:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.read_chunk()
        if not chunk:
            raise StopAsyncIteration
        return chunk

    async def read_chunk(self) -> bytes:
        """The body bytes that arrived since the last read, waiting for some if none did;
        b"" once the reply is whole."""
        conn = self._conn
        if conn is None:
            if self._error is not None:
                raise self._error
            return b""
        while True:
            if conn.timed_out:
                self._abort(TimeoutError("the HTTP exchange timed out"))
            if conn._body:
                return conn.take()
            if conn._done:
                self._complete()
                return b""
            error = conn._error
            if error is not None:
                self._abort(error)
            waiter = conn._waiter = conn._loop.create_future()
            try:
                await waiter
            except BaseException as exc:  # cancelled: the stream's state is unknown
                self._abort(exc)
            finally:
                conn._waiter = None
            if self._conn is not conn:  # ended by another task meanwhile
                return await self.read_chunk()

    async def read(self) -> bytes:
        """The rest of the body, whole (for error replies and tests)."""
        chunks = []
        while chunk := await self.read_chunk():
            chunks.append(chunk)
        return b"".join(chunks)

    @property
    def buffered(self) -> int:
        """Body bytes received and not read yet."""
        return self._conn._buffered if self._conn is not None else 0

    def close(self) -> None:
        """End the stream: the connection is pooled if the reply was whole, else closed."""
        conn = self._conn
        if conn is None:
            return
        if conn._done and not conn.timed_out:
            self._complete()
            return
        if self._error is None:
            self._error = Http1Error("the stream was closed")
        conn.close()
        self._end()

    def release(self, within_s: float = 1.0) -> None:
        """End the stream, expecting only the reply's framing to follow (see class doc)."""
        conn = self._conn
        pool = self._pool
        if conn is None or pool is None or conn._done or not conn._framed or conn._error:
            self.close()  # whole (pooled), or broken or EOF-delimited (closed)
            return
        if conn.timed_out or conn.closed or conn._transport is None:
            self.close()
            return
        key = self._key
        self._conn = self._pool = None
        pool._slots.release()
        conn.drain(lambda: pool._release(key, conn), within_s)

    async def __aenter__(self) -> Http1Stream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Dropped unfinished (a caller that neither read to the end nor closed): the
        # connection must not stay open nor its slot stay taken.
        if self._conn is not None:
            with contextlib.suppress(Exception):  # e.g. the loop is closed already
                self.close()

    def _complete(self) -> None:
        conn = self._conn
        pool = self._pool
        assert conn is not None and pool is not None
        self._end()
        pool._release(self._key, conn)

    def _abort(self, error: BaseException) -> NoReturn:
        conn = self._conn
        self._error = error
        if conn is not None:
            conn.close()
        self._end()
        raise error

    def _end(self) -> None:
        conn, pool = self._conn, self._pool
        self._conn = self._pool = None
        if conn is not None:
            conn.end_stream()
        if pool is not None:
            pool._slots.release()


class Http1Pool:
    """POSTs and GETs over per-origin pools of kept-alive HTTP/1.1 connections (see module doc).

    `max_connections` caps requests in flight, unary or streamed (each holds one
    connection; a stream until it ends); more wait for a slot within their timeout. At most
    `max_idle_per_host` idle connections are kept per (scheme, host, port); the most
    recently used is reused first, so a quiet period lets the server time out the rest. A
    stream buffers at most `stream_buffer_limit` unread body bytes (plus one socket read)
    before it stops reading from the socket, so a slow reader slows the server instead.
    """

    def __init__(
        self,
        *,
        connect_timeout_s: float = 5.0,
        max_connections: int = 2048,
        max_idle_per_host: int = 256,
        ssl_context: ssl.SSLContext | Callable[[], ssl.SSLContext] | None = None,
        stream_buffer_limit: int = STREAM_BUFFER_LIMIT,
    ) -> None:
        if stream_buffer_limit < 1:
            raise ValueError("stream_buffer_limit must be positive")
        self._connect_timeout = connect_timeout_s
        self._stream_limit = stream_buffer_limit
        self._slots = asyncio.Semaphore(max_connections)
        self._max_idle = max_idle_per_host
        self._ssl_source = ssl_context
        self._ssl: ssl.SSLContext | None = (
            ssl_context if isinstance(ssl_context, ssl.SSLContext) else None
        )
        self._targets: dict[str, _Target] = {}
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        # Every open connection per origin, idle or busy, for abort(): kept per connection
        # (added at connect, dropped at close), so a request costs nothing here.
        self._open: dict[tuple[str, str, int], set[_Connection]] = {}
        self._generation = 0

    def idle_count(self) -> int:
        """Idle connections held now (for tests and metrics)."""
        return sum(len(conns) for conns in self._idle.values())

    async def post(
        self,
        base_url: str,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        timeout_s: float,
    ) -> tuple[int, bytes]:
        """POST `body` to `base_url + path`; returns the status and the whole reply body.

        Raises ConnectError, DisconnectedError, ProtocolError, or TimeoutError when the
        whole exchange (waiting for a slot, connecting, replying) takes over `timeout_s`.
        """
        target = self._target(base_url)
        return await self._exchange(target, _request(target, path, body, headers), timeout_s)

    async def get(
        self, base_url: str, path: str, headers: Mapping[str, str], timeout_s: float
    ) -> tuple[int, bytes]:
        """GET `base_url + path`; returns the status and the whole reply body, with post()'s
        errors and timeout. For small replies (health checks, /metrics): a reply of unknown
        size is better read with stream(method="GET")."""
        target = self._target(base_url)
        return await self._exchange(target, _request(target, path, None, headers), timeout_s)

    async def stream(
        self,
        base_url: str,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        timeout_s: float,
        *,
        method: Literal["POST", "GET"] = "POST",
    ) -> Http1Stream:
        """POST `body` to `base_url + path` (or GET it, `body` empty); returns once the
        reply's head is in, with the body to be read from the Http1Stream as it arrives.

        `timeout_s` covers the whole exchange, the body included: reads past it raise
        TimeoutError, and the connection is closed then. Until the head arrives the errors
        are post()'s; a kept-alive connection found closed before any reply byte is retried
        once on a new one, as there.
        """
        target = self._target(base_url)
        if method == "GET" and body:
            raise ValueError("a GET carries no body")
        request = _request(target, path, None if method == "GET" else body, headers)
        deadline = asyncio.get_running_loop().time() + timeout_s
        slots = self._slots
        acquired = False
        try:
            async with asyncio.timeout_at(deadline):
                await slots.acquire()
                acquired = True
                conn = await self._start(target, request, self._stream_limit)
        except BaseException:
            if acquired:
                slots.release()
            raise
        return Http1Stream(self, target.key, conn, deadline)

    def abort(self, base_url: str, reason: str) -> int:
        """Break every connection to `base_url`'s origin at once, as if the server had
        dropped them: each request on one fails with DisconnectedError(`reason`) (post(),
        a stream's reads), which a caller treats as the server gone (the scheduler fails
        it over). For a server known lost whose sockets may hang for minutes (a
        partitioned host). Returns how many requests were cut."""
        conns = self._open.get(self._target(base_url).key)
        if not conns:
            return 0
        error = DisconnectedError(reason)
        return sum(conn.abort(error) for conn in list(conns))

    async def aclose(self) -> None:
        """Close every idle connection; ones in use are closed when their request ends.
        The pool stays usable: later requests open new connections."""
        self._generation += 1
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.idle_in = None
                conn.close()
        await asyncio.sleep(0)  # let the transports run their close callbacks

    # --- internals ---------------------------------------------------------------------
    async def _exchange(
        self, target: _Target, request: bytes, timeout_s: float
    ) -> tuple[int, bytes]:
        """Send `request`; the status and the whole reply body (post()'s errors)."""
        async with asyncio.timeout(timeout_s), self._slots:
            conn = await self._start(target, request, 0)
            status, content = conn.status, conn.finish()
            self._release(target.key, conn)
            return status, content

    def _target(self, base_url: str) -> _Target:
        target = self._targets.get(base_url)
        if target is None:
            target = _parse_target(base_url)
            if len(self._targets) >= _MAX_TARGETS:
                self._targets.clear()
            self._targets[base_url] = target
        return target

    def _take_idle(self, key: tuple[str, str, int]) -> _Connection | None:
        conns = self._idle.get(key)
        while conns:
            conn = conns.pop()
            conn.idle_in = None
            if conn.reusable():
                return conn
            conn.close()
        return None

    def _release(self, key: tuple[str, str, int], conn: _Connection) -> None:
        if conn.generation != self._generation or not conn.reusable():
            conn.close()
            return
        conns = self._idle.get(key)
        if conns is None:
            conns = self._idle[key] = []
        if len(conns) >= self._max_idle:
            conn.close()
            return
        conn.idle_in = conns
        conns.append(conn)

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            source = self._ssl_source
            self._ssl = source() if callable(source) else ssl.create_default_context()
        return self._ssl

    async def _connect(self, target: _Target) -> _Connection:
        loop = asyncio.get_running_loop()
        generation = self._generation
        limit = asyncio.timeout(self._connect_timeout)
        try:
            async with limit:
                if target.tls:
                    _, conn = await loop.create_connection(
                        lambda: _Connection(loop, generation),
                        target.host,
                        target.port,
                        ssl=self._ssl_context(),
                        server_hostname=target.host,
                    )
                else:
                    _, conn = await loop.create_connection(
                        lambda: _Connection(loop, generation), target.host, target.port
                    )
        except TimeoutError as exc:
            # Our connect timeout too: nothing was sent, so the request may go elsewhere (a
            # host cut off drops the SYN; reporting a timeout failed requests a failover
            # would have served).
            why = f"no connection within {self._connect_timeout:g}s" if limit.expired() else exc
            raise ConnectError(f"cannot connect to {_where(target)}: {why}") from exc
        except OSError as exc:  # refused, unreachable, DNS (gaierror), TLS (SSLError)
            raise ConnectError(f"cannot connect to {_where(target)}: {exc}") from exc
        if not conn.closed:
            conns = self._open.get(target.key)
            if conns is None:
                conns = self._open[target.key] = set()
            conns.add(conn)
            conn.open_in = conns
        return conn

    async def _start(self, target: _Target, request: bytes, stream_limit: int) -> _Connection:
        """Send `request` on an idle connection, or a new one, and wait for its whole reply
        (or, with a `stream_limit`, its head); the connection it went out on.

        A kept-alive connection the server had dropped while idle (_StaleConnection) gets
        one fresh try. A send that fails, times out or is cancelled closes its connection
        (its state is unknown; the server sees the disconnect and can abort): never reused.
        """
        conn = self._take_idle(target.key)
        if conn is not None:
            try:
                return await self._send(conn, request, stream_limit)
            except _StaleConnection:
                pass
        return await self._send(await self._connect(target), request, stream_limit)

    @staticmethod
    async def _send(conn: _Connection, request: bytes, stream_limit: int) -> _Connection:
        try:
            await conn.send(request, stream_limit)
        except BaseException:
            conn.close()
            raise
        return conn


def _request(target: _Target, path: str, body: bytes | None, headers: Mapping[str, str]) -> bytes:
    """A POST of `body`, or a GET when it is None: no Content-Length then (RFC 9110: a
    request without a body should not send one)."""
    return b"".join(
        (
            b"GET " if body is None else b"POST ",
            target.prefix,
            path.encode("ascii"),
            b" HTTP/1.1\r\nHost: ",
            target.host_header,
            b"\r\n" if body is None else b"\r\nContent-Length: %d\r\n" % len(body),
            _header_block(headers),
            b"\r\n",
            body or b"",
        )
    )


def _where(target: _Target) -> str:
    return f"{target.key[0]}://{target.host_header.decode()}"


def engine_tls_context() -> ssl.SSLContext:
    """The context https engines are dialled with: our CA and, for mTLS, our certificate
    (SAGE_TLS_*), else the default verifying one. Pass it uncalled as Http1Pool's
    `ssl_context`, so the files are read at the first https connection, not at start."""
    verify = process_tls().httpx_verify()
    return verify if isinstance(verify, ssl.SSLContext) else ssl.create_default_context()
