"""Http1Pool against real sockets: raw servers scripted byte by byte, a TLS server with a
throwaway certificate, and the real sim engine through HttpExecutionCoordinator. Unary
requests (post) first, then streamed ones (stream, and the coordinator's stream_sse)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gc
import hashlib
import ipaddress
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import orjson
import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sage.common.exceptions import (
    DeadlineExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    UpstreamError,
)
from sage.common.http.http1 import (
    STREAM_BUFFER_LIMIT,
    ConnectError,
    DisconnectedError,
    Http1Error,
    Http1Pool,
    Http1Stream,
    ProtocolError,
)
from sage.common.utils.processes import free_port
from sage.services.scheduler.executor import (
    EngineDisconnectedError,
    EngineUnreachableError,
    HttpExecutionCoordinator,
    _split_events,
)
from sage.services.scheduler.registry import EngineKind, EngineRecord

JSON = {"content-type": "application/json"}
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello"

Handler = Callable[["RawServer", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A TCP (optionally TLS) server whose handler scripts each connection's bytes; it
    counts accepted connections and keeps every request it read."""

    def __init__(self, handler: Handler, ssl_ctx: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl_ctx = ssl_ctx
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed_by_peer = asyncio.Event()  # a handler saw the client close
        self._request_seen = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"{'https' if self.ssl_ctx else 'http'}://127.0.0.1:{self.port}"

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, ssl=self.ssl_ctx)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handler(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """One whole request (head and Content-Length body), or None once the client has
        closed the connection (a FIN, or a RST when it closed with our bytes unread)."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_peer.set()
            return None
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        self._request_seen.set()
        return request

    async def wait_requests(self, count: int) -> None:
        """Until `count` requests have arrived in all."""
        while len(self.requests) < count:
            self._request_seen.clear()
            await asyncio.wait_for(self._request_seen.wait(), 5)


async def serve_ok(
    server: RawServer, reader: asyncio.StreamReader, w: asyncio.StreamWriter
) -> None:
    while await server.read_request(reader) is not None:
        w.write(OK)
        await w.drain()


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST rather than a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def engine(base_url: str) -> EngineRecord:
    return EngineRecord("e0", "sim", EngineKind.LLM, base_url)


async def test_content_length_reply_and_request_bytes() -> None:
    pool = Http1Pool()
    async with RawServer(serve_ok) as srv:
        status, body = await pool.post(
            srv.base_url, "/v1/x", b'{"a":1}', {**JSON, "traceparent": "00-ab-cd-01"}, 5.0
        )
        assert (status, body) == (200, b"hello")
        head, _, sent = srv.requests[0].partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0] == b"POST /v1/x HTTP/1.1"
        assert f"Host: 127.0.0.1:{srv.port}".encode() in lines
        assert b"Content-Length: 7" in lines
        assert b"content-type: application/json" in lines
        assert b"traceparent: 00-ab-cd-01" in lines
        assert sent == b'{"a":1}'
        await pool.aclose()


async def test_chunked_reply_in_pieces() -> None:
    async def chunked(srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while await srv.read_request(r) is not None:
            for piece in (
                b"HTTP/1.1 200 OK\r\nTransfer-",
                b"Encoding: chunked\r\n\r\n5\r\nhel",
                b"lo\r\n6\r\n world\r\n",
                b"0\r\n\r\n",
            ):
                w.write(piece)
                await w.drain()
                await asyncio.sleep(0.01)

    pool = Http1Pool()
    async with RawServer(chunked) as srv:
        assert await pool.post(srv.base_url, "/", b"", JSON, 5.0) == (200, b"hello world")
        assert await pool.post(srv.base_url, "/", b"", JSON, 5.0) == (200, b"hello world")
        assert srv.connections == 1
        await pool.aclose()


async def test_keep_alive_reuses_one_connection() -> None:
    pool = Http1Pool()
    async with RawServer(serve_ok) as srv:
        for _ in range(3):
            assert await pool.post(srv.base_url, "/", b"x", JSON, 5.0) == (200, b"hello")
        assert srv.connections == 1 and len(srv.requests) == 3
        assert pool.idle_count() == 1
        await pool.aclose()
        assert pool.idle_count() == 0
        await asyncio.wait_for(srv.closed_by_peer.wait(), 5)


async def test_idle_connections_are_capped_and_reused_lifo() -> None:
    release = asyncio.Event()

    async def slow(srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while await srv.read_request(r) is not None:
            await release.wait()
            w.write(OK)
            await w.drain()

    pool = Http1Pool(max_idle_per_host=2)
    async with RawServer(slow) as srv:
        calls = [
            asyncio.create_task(pool.post(srv.base_url, "/", b"", JSON, 5.0)) for _ in range(4)
        ]
        await srv.wait_requests(4)
        release.set()
        assert await asyncio.gather(*calls) == [(200, b"hello")] * 4
        assert srv.connections == 4 and pool.idle_count() == 2
        await pool.post(srv.base_url, "/", b"", JSON, 5.0)
        assert srv.connections == 4
        await pool.aclose()


async def test_interim_100_continue_is_skipped() -> None:
    async def interim(srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while await srv.read_request(r) is not None:
            w.write(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)
            await w.drain()

    pool = Http1Pool()
    async with RawServer(interim) as srv:
        for _ in range(2):
            assert await pool.post(srv.base_url, "/", b"", JSON, 5.0) == (200, b"hello")
        assert srv.connections == 1
        await pool.aclose()


async def test_aclose_drops_idle_and_in_flight_connections_but_pool_stays_usable() -> None:
    release = asyncio.Event()

    async def gated(srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while await srv.read_request(r) is not None:
            await release.wait()
            w.write(OK)
            await w.drain()

    pool = Http1Pool()
    async with RawServer(gated) as srv:
        call = asyncio.create_task(pool.post(srv.base_url, "/", b"", JSON, 5.0))
        await srv.wait_requests(1)
        await pool.aclose()
        release.set()
        assert await call == (200, b"hello")
        assert pool.idle_count() == 0  # it finished after aclose: closed, not pooled
        assert await pool.post(srv.base_url, "/", b"", JSON, 5.0) == (200, b"hello")
        assert srv.connections == 2 and pool.idle_count() == 1
        await pool.aclose()


@pytest.mark.parametrize("later", [False, True])
async def test_bytes_after_the_reply_make_the_connection_unusable(later: bool) -> None:
    async def chatty(srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while await srv.read_request(r) is not None:
            w.write(OK if later else OK + OK)
            await w.drain()
            if later:
                await asyncio.sleep(0.05)
                w.write(OK)  # to an idle connection
                await w.drain()

    pool = Http1Pool()
    async with RawServer(chatty) as srv:
        assert await pool.post(srv.base_url, "/", b"", JSON, 5.0) == (200, b"hello")
        for _ in range(100):
            if pool.idle_count() == 0:
                break
            await asyncio.sleep(0.01)
        assert pool.idle_count() == 0
        assert await pool.post(srv.base_url, "/", b"", JSON, 5.0) == (200, b"hello")
        assert srv.connections == 2
        await pool.aclose()


async def test_connection_close_reply_is_not_reused() -> None:
    async def close_each(srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await srv.read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()
        await asyncio.sleep(0.5)  # the client must not wait for the close to return

    pool = Http1Pool()
    async with RawServer(close_each) as srv:
        for _ in range(2):
            assert await asyncio.wait_for(pool.post(srv.base_url, "/", b"", JSON, 5.0), 0.4) == (
                200,
                b"ok",
            )
            assert pool.idle_count() == 0
        assert srv.connections == 2
        await pool.aclose()


async def test_reply_delimited_by_eof() -> None:
    async def http10(srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await srv.read_request(r)
        w.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil ")
        await w.drain()
        await asyncio.sleep(0.02)
        w.write(b"the end")
        await w.drain()  # the handler returning closes the connection

    pool = Http1Pool()
    async with RawServer(http10) as srv:
        for _ in range(2):
            assert await pool.post(srv.base_url, "/", b"", JSON, 5.0) == (200, b"until the end")
        assert srv.connections == 2 and pool.idle_count() == 0
        await pool.aclose()


async def test_server_dropping_idle_connection_is_noticed() -> None:
    async def one_per_conn(
        srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        await srv.read_request(r)
        w.write(OK)  # keep-alive promised, then closed while idle (uvicorn's idle timeout)
        await w.drain()

    pool = Http1Pool()
    async with RawServer(one_per_conn) as srv:
        assert await pool.post(srv.base_url, "/", b"", JSON, 5.0) == (200, b"hello")
        for _ in range(100):
            if pool.idle_count() == 0:
                break
            await asyncio.sleep(0.01)
        assert pool.idle_count() == 0  # connection_lost took it out of the pool
        assert await pool.post(srv.base_url, "/", b"", JSON, 5.0) == (200, b"hello")
        assert srv.connections == 2
        await pool.aclose()


@pytest.mark.parametrize("rst", [False, True])
async def test_stale_reused_connection_is_retried_once_on_a_fresh_one(rst: bool) -> None:
    """The server drops a kept-alive connection just as the next request arrives (before
    the client could notice): that request goes again on a new connection."""

    async def drop_second(srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        first = srv.connections == 1
        await srv.read_request(r)
        w.write(OK)
        await w.drain()
        if await srv.read_request(r) is not None and first:
            if rst:
                reset(w)
            return  # closes without a reply byte
        w.write(OK)
        await w.drain()

    pool = Http1Pool()
    async with RawServer(drop_second) as srv:
        assert await pool.post(srv.base_url, "/", b"a", JSON, 5.0) == (200, b"hello")
        assert await pool.post(srv.base_url, "/", b"b", JSON, 5.0) == (200, b"hello")
        assert srv.connections == 2 and len(srv.requests) == 3
        await pool.aclose()


async def test_a_reused_connection_closed_while_the_engine_worked_is_not_retried() -> None:
    """An engine that dies (or a proxy that cuts) after holding a non-streamed request for
    a while: the close is not a stale keep-alive, so the request must not run twice here
    (the scheduler fails it over instead)."""

    async def slow_then_die(
        srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        await srv.read_request(r)
        w.write(OK)
        await w.drain()
        if await srv.read_request(r) is not None:
            await asyncio.sleep(0.5)  # working on it, then gone without a reply byte

    pool = Http1Pool()
    async with RawServer(slow_then_die) as srv:
        assert await pool.post(srv.base_url, "/", b"a", JSON, 5.0) == (200, b"hello")
        with pytest.raises(DisconnectedError):
            await pool.post(srv.base_url, "/", b"b", JSON, 5.0)
        assert len(srv.requests) == 2 and srv.connections == 1
        await pool.aclose()


async def test_reset_on_fresh_connection_is_a_disconnect_not_retried() -> None:
    async def rst(srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await srv.read_request(r)
        reset(w)

    pool = Http1Pool()
    async with RawServer(rst) as srv:
        with pytest.raises(DisconnectedError):
            await pool.post(srv.base_url, "/", b"x", JSON, 5.0)
        await asyncio.sleep(0.05)
        assert srv.connections == 1 and len(srv.requests) == 1
        await pool.aclose()


async def test_drop_mid_reply_on_reused_connection_is_not_retried() -> None:
    async def partial(srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await srv.read_request(r)
        w.write(OK)
        await srv.read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort")
        await w.drain()

    pool = Http1Pool()
    async with RawServer(partial) as srv:
        await pool.post(srv.base_url, "/", b"", JSON, 5.0)
        with pytest.raises(DisconnectedError, match="mid-reply"):
            await pool.post(srv.base_url, "/", b"", JSON, 5.0)
        await asyncio.sleep(0.05)
        assert srv.connections == 1 and len(srv.requests) == 2
        await pool.aclose()


async def test_connect_refused() -> None:
    pool = Http1Pool()
    with pytest.raises(ConnectError):
        await pool.post(f"http://127.0.0.1:{free_port()}", "/", b"", JSON, 5.0)
    with pytest.raises(ConnectError):
        await pool.post("http://no-such-host.invalid:80", "/", b"", JSON, 5.0)
    with pytest.raises(Http1Error):
        await pool.post("ftp://127.0.0.1:1", "/", b"", JSON, 5.0)


async def test_no_connection_within_the_connect_timeout_is_a_connect_error() -> None:
    """A host that drops the SYN (cut off; here a listener whose accept queue is full):
    nothing was sent, so it is a ConnectError (the scheduler fails over), not a timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        queued = []
        for _ in range(4):  # fill the accept queue: later SYNs go unanswered
            sock = socket.socket()
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(("127.0.0.1", port))
            queued.append(sock)
        pool = Http1Pool(connect_timeout_s=0.2)
        try:
            with pytest.raises(ConnectError, match=r"no connection within 0\.2s"):
                await pool.post(f"http://127.0.0.1:{port}", "/", b"", JSON, 30.0)
            executor = HttpExecutionCoordinator(connect_timeout_s=0.2)
            with pytest.raises(EngineUnreachableError):
                await executor.post_json(engine(f"http://127.0.0.1:{port}"), "/", b"{}")
            await executor.aclose()
        finally:
            for sock in queued:
                sock.close()
            await pool.aclose()


async def test_timeout_closes_the_connection() -> None:
    async def silent(srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await srv.read_request(r)
        await srv.read_request(r)  # returns None when the client closes

    pool = Http1Pool()
    async with RawServer(silent) as srv:
        with pytest.raises(TimeoutError):
            await pool.post(srv.base_url, "/", b"", JSON, 0.2)
        await asyncio.wait_for(srv.closed_by_peer.wait(), 5)
        assert pool.idle_count() == 0
        await pool.aclose()


async def test_cancelled_request_closes_its_connection() -> None:
    async def silent(srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await srv.read_request(r)
        await srv.read_request(r)

    pool = Http1Pool()
    async with RawServer(silent) as srv:
        call = asyncio.create_task(pool.post(srv.base_url, "/", b"", JSON, 30.0))
        await srv.wait_requests(1)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.wait_for(srv.closed_by_peer.wait(), 5)
        assert pool.idle_count() == 0
        await pool.aclose()


async def test_error_status_body_is_returned() -> None:
    reply = b'{"error":{"message":"model nope does not exist","param":"model"}}'

    async def not_found(srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while await srv.read_request(r) is not None:
            w.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n" % len(reply) + reply)
            await w.drain()

    pool = Http1Pool()
    async with RawServer(not_found) as srv:
        assert await pool.post(srv.base_url, "/", b"", JSON, 5.0) == (404, reply)
        assert pool.idle_count() == 1  # an error reply leaves the connection usable
        await pool.aclose()
        executor = HttpExecutionCoordinator()
        with pytest.raises(ModelNotFoundError):
            await executor.post_json(engine(srv.base_url), "/v1/chat/completions", b"{}")
        await executor.aclose()


async def test_malformed_reply() -> None:
    async def garbage(srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await srv.read_request(r)
        w.write(b"SMTP is not HTTP\r\n\r\n")
        await w.drain()
        await srv.read_request(r)

    pool = Http1Pool()
    async with RawServer(garbage) as srv:
        with pytest.raises(ProtocolError):
            await pool.post(srv.base_url, "/", b"", JSON, 5.0)
        assert pool.idle_count() == 0
        executor = HttpExecutionCoordinator()
        with pytest.raises(UpstreamError) as info:
            await executor.post_json(engine(srv.base_url), "/v1/completions", b"{}")
        assert type(info.value) is UpstreamError
        await executor.aclose()


async def test_header_with_line_break_is_refused() -> None:
    with pytest.raises(ValueError):
        await Http1Pool().post("http://127.0.0.1:1", "/", b"", {"x": "a\r\nEvil: 1"}, 1.0)


# -- GET (health checks, /metrics, the registration probe) ----------------------------


async def test_get_sends_no_body_and_shares_the_kept_alive_connection() -> None:
    pool = Http1Pool()
    async with RawServer(serve_ok) as srv:
        auth = {"authorization": "Bearer k"}
        assert await pool.get(srv.base_url + "/base", "/metrics", auth, 5.0) == (200, b"hello")
        assert await pool.post(srv.base_url, "/v1/x", b"{}", JSON, 5.0) == (200, b"hello")
        assert await pool.get(srv.base_url, "/health", {}, 5.0) == (200, b"hello")
        assert srv.connections == 1
        first = srv.requests[0]
        assert (
            first
            == (
                f"GET /base/metrics HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\n"
                "authorization: Bearer k\r\n\r\n"
            ).encode()
        )
        assert srv.requests[2].startswith(b"GET /health HTTP/1.1\r\n")
        await pool.aclose()


async def test_get_returns_a_redirect_without_following_it() -> None:
    async def redirect(srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while await srv.read_request(r) is not None:
            w.write(
                b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://169.254.169.254/\r\n"
                b"Content-Length: 0\r\n\r\n"
            )
            await w.drain()

    pool = Http1Pool()
    async with RawServer(redirect) as srv:
        assert await pool.get(srv.base_url, "/metrics", {}, 5.0) == (307, b"")
        assert len(srv.requests) == 1
        await pool.aclose()


async def test_get_timeout_and_refusal() -> None:
    async def silent(srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await srv.read_request(r)
        await asyncio.sleep(30)

    pool = Http1Pool()
    async with RawServer(silent) as srv:
        with pytest.raises(TimeoutError):
            await pool.get(srv.base_url, "/health", {}, 0.2)
        assert pool.idle_count() == 0  # a timed-out connection is never reused
    with pytest.raises(ConnectError):
        await pool.get(f"http://127.0.0.1:{free_port()}", "/health", {}, 5.0)
    await pool.aclose()


async def test_get_stream_reads_a_large_body_in_pieces() -> None:
    """stream(method="GET"): a reply too large to take whole (the registration probe stops
    reading past its limit) arrives piece by piece, and leaving early drops it."""
    chunk = b"x" * 65536

    async def large(srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await srv.read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (len(chunk) * 64))
        try:
            for _ in range(64):
                w.write(chunk)
                await w.drain()
        except ConnectionError:  # the client closed with our bytes unread: a RST
            srv.closed_by_peer.set()
            return
        await srv.read_request(r)  # None: the client closed the connection

    pool = Http1Pool()
    async with RawServer(large) as srv:
        got = 0
        async with await pool.stream(
            srv.base_url, "/v1/models", b"", {}, 5.0, method="GET"
        ) as reply:
            assert reply.status == 200
            async for piece in reply:
                got += len(piece)
                if got > 4 * len(chunk):
                    break
        assert srv.requests[0].startswith(b"GET /v1/models HTTP/1.1\r\n")
        assert b"Content-Length" not in srv.requests[0]
        await asyncio.wait_for(srv.closed_by_peer.wait(), 5)
        assert pool.idle_count() == 0
    with pytest.raises(ValueError):
        await pool.stream("http://127.0.0.1:1", "/", b"body", {}, 1.0, method="GET")
    await pool.aclose()


async def test_executor_maps_failures_like_aiohttp() -> None:
    executor = HttpExecutionCoordinator(request_timeout_s=0.3)
    with pytest.raises(EngineUnreachableError):
        await executor.post_json(engine(f"http://127.0.0.1:{free_port()}"), "/", b"{}")

    async def rst(srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await srv.read_request(r)
        reset(w)

    async with RawServer(rst) as srv:
        with pytest.raises(EngineDisconnectedError):
            await executor.post_json(engine(srv.base_url), "/", b"{}")

    async def silent(srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await srv.read_request(r)
        await srv.read_request(r)

    async with RawServer(silent) as srv:
        with pytest.raises(DeadlineExceededError):
            await executor.post_json(engine(srv.base_url), "/", b"{}")

    async def busy(srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await srv.read_request(r)
        w.write(b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 4\r\n\r\nbusy")
        await w.drain()

    async with RawServer(busy) as srv:
        with pytest.raises(OverloadedError):
            await executor.post_json(engine(srv.base_url), "/", b"{}")
    await executor.aclose()


# --- TLS ---------------------------------------------------------------------------------
def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "srv.crt", tmp_path / "srv.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


async def test_https_with_a_trusted_self_signed_certificate(tmp_path: Path) -> None:
    cert_file, key_file = _self_signed(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert_file, key_file)
    trusting = Http1Pool(ssl_context=ssl.create_default_context(cafile=str(cert_file)))
    async with RawServer(serve_ok, ssl_ctx=server_ctx) as srv:
        for _ in range(2):
            assert await trusting.post(srv.base_url, "/", b"x", JSON, 5.0) == (200, b"hello")
            stream = await trusting.stream(srv.base_url, "/", b"x", JSON, 5.0)
            assert (stream.status, await stream.read()) == (200, b"hello")
        assert srv.connections == 1
        await trusting.aclose()
        strict = Http1Pool(ssl_context=lambda: ssl.create_default_context())
        with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await strict.post(srv.base_url, "/", b"x", JSON, 5.0)
        await strict.aclose()


# --- the real sim engine -----------------------------------------------------------------
async def test_sim_engine_chat_through_the_executor(sim_engine: Callable[..., str]) -> None:
    base = sim_engine("--ttft-ms", "0", "--tpot-ms", "0")
    executor = HttpExecutionCoordinator()
    request = orjson.dumps(
        {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    )
    for _ in range(3):
        reply = orjson.loads(
            await executor.post_json(engine(base), "/v1/chat/completions", request)
        )
        assert reply["object"] == "chat.completion"
        assert reply["choices"][0]["message"]["role"] == "assistant"
        assert reply["usage"]["completion_tokens"] >= 1
    assert executor._pool.idle_count() == 1  # one kept-alive connection served all three
    await executor.aclose()


# --- streamed replies ----------------------------------------------------------------------
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
LAST_CHUNK = b"0\r\n\r\n"
DONE = b"data: [DONE]\n\n"
# The most one socket read hands the protocol (asyncio: 256 KiB; uvloop: 256,000 bytes).
ONE_READ = 256 * 1024


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def event(n: int) -> bytes:
    return b'data: {"n":%d}\n\n' % n


async def sse_reply(
    w: asyncio.StreamWriter, count: int, *, done: bool = True, end: bool = True
) -> None:
    """An SSE reply of `count` events, [DONE] and the chunked terminator, in one write."""
    events = b"".join(chunk(event(i)) for i in range(count))
    w.write(SSE_HEAD + events + (chunk(DONE) if done else b"") + (LAST_CHUNK if end else b""))
    await w.drain()


async def serve_sse(srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while await srv.read_request(r) is not None:
        await sse_reply(w, 3)


async def endless(srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """One event every 10 ms until the client leaves (then `closed_by_peer` is set)."""
    await srv.read_request(r)
    gone = asyncio.ensure_future(srv.read_request(r))
    w.write(SSE_HEAD)
    n = 0
    while not gone.done():
        w.write(chunk(event(n)))
        n += 1
        await w.drain()
        await asyncio.sleep(0.01)


async def eventually(check: Callable[[], bool]) -> None:
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met within 5 s")


async def test_stream_hands_out_chunks_as_they_arrive() -> None:
    """Lock-step: each piece is sent only once the previous one was read, so each read
    returns exactly one piece (an event may be split across pieces)."""
    pieces = [event(0), event(1)[:5], event(1)[5:] + event(2), DONE]
    read = asyncio.Event()

    async def lockstep(srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while await srv.read_request(r) is not None:
            w.write(SSE_HEAD)
            for piece in pieces:
                read.clear()
                w.write(chunk(piece))
                await w.drain()
                await read.wait()
            w.write(LAST_CHUNK)
            await w.drain()

    pool = Http1Pool()
    async with RawServer(lockstep) as srv:
        stream = await pool.stream(srv.base_url, "/v1/chat/completions", b"{}", JSON, 5.0)
        assert isinstance(stream, Http1Stream) and stream.status == 200
        got = []
        async for data in stream:
            got.append(data)
            read.set()
        assert got == pieces
        assert srv.requests[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
        assert pool.idle_count() == 1  # whole and kept alive: pooled
        await pool.aclose()


async def test_stream_chunks_that_arrive_together_come_out_together() -> None:
    async def burst(srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await srv.read_request(r)
        w.write(SSE_HEAD + chunk(event(0)) + chunk(event(1)) + chunk(event(2)))
        await w.drain()
        await srv.read_request(r)  # until the client leaves

    pool = Http1Pool()
    async with RawServer(burst) as srv:
        async with await pool.stream(srv.base_url, "/", b"", JSON, 5.0) as stream:
            data = await stream.read_chunk()
            while data.count(b"\n\n") < 3:  # a slow machine may still split the burst
                data += await stream.read_chunk()
            assert data == event(0) + event(1) + event(2)
        await asyncio.wait_for(srv.closed_by_peer.wait(), 5)  # closed early: never pooled
        assert pool.idle_count() == 0
        await pool.aclose()


async def test_complete_streams_reuse_one_connection() -> None:
    pool = Http1Pool()
    executor = HttpExecutionCoordinator()
    async with RawServer(serve_sse) as srv:
        for _ in range(3):
            stream = await pool.stream(srv.base_url, "/", b"", JSON, 5.0)
            assert await stream.read() == event(0) + event(1) + event(2) + DONE
        for _ in range(3):
            payloads = [p async for p in executor.stream_sse(engine(srv.base_url), "/", b"{}")]
            assert payloads == [b'{"n":0}', b'{"n":1}', b'{"n":2}']
        assert srv.connections == 2 and len(srv.requests) == 6
        assert pool.idle_count() == 1
        await eventually(lambda: executor._pool.idle_count() == 1)
        await pool.aclose()
        await executor.aclose()


async def test_done_before_the_terminator_pools_the_connection_once_it_arrives() -> None:
    """vLLM writes `[DONE]` and the chunked terminator separately: the stream ends at
    [DONE], and the connection is pooled when the terminator follows."""
    gate = asyncio.Event()

    async def late_end(srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while await srv.read_request(r) is not None:
            await sse_reply(w, 2, end=False)
            await gate.wait()
            gate.clear()
            w.write(LAST_CHUNK)
            await w.drain()

    executor = HttpExecutionCoordinator()
    async with RawServer(late_end) as srv:
        for _ in range(2):
            payloads = [p async for p in executor.stream_sse(engine(srv.base_url), "/", b"{}")]
            assert payloads == [b'{"n":0}', b'{"n":1}']
            assert executor._pool.idle_count() == 0  # the reply is not whole yet
            gate.set()
            await eventually(lambda: executor._pool.idle_count() == 1)
        assert srv.connections == 1
        await executor.aclose()


async def test_released_stream_whose_reply_never_ends_is_closed() -> None:
    async def no_end(srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await srv.read_request(r)
        await sse_reply(w, 1, end=False)
        await srv.read_request(r)  # until the client leaves

    pool = Http1Pool()
    async with RawServer(no_end) as srv:
        stream = await pool.stream(srv.base_url, "/", b"", JSON, 5.0)
        data = b""
        while not data.endswith(DONE):
            data += await stream.read_chunk()
        stream.release(within_s=0.1)
        await asyncio.wait_for(srv.closed_by_peer.wait(), 5)
        assert pool.idle_count() == 0
        await pool.aclose()


@pytest.mark.parametrize("rst", [False, True])
async def test_engine_dying_mid_stream_is_a_disconnect(rst: bool) -> None:
    """Two events, then the connection drops: both events are handed out, then
    DisconnectedError (the coordinator: EngineDisconnectedError, which resume acts on).

    Lock-step, not sleeps: the engine sends event 1 only once event 0 was read, and drops
    the connection only once event 1 was read. A RST discards whatever the client's kernel
    still holds unread, so dropping after a fixed pause lost event 1 on a loaded machine."""
    read: list[asyncio.Event] = []  # read[n]: event n reached the consumer

    async def dies(srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await srv.read_request(r)
        w.write(SSE_HEAD + chunk(event(0)))
        await w.drain()
        await asyncio.wait_for(read[0].wait(), 5)
        w.write(chunk(event(1)))
        await w.drain()
        await asyncio.wait_for(read[1].wait(), 5)
        if rst:
            reset(w)

    def arrived(got: bytes) -> None:
        for n, seen in enumerate(read):
            if event(n) in got:
                seen.set()

    pool = Http1Pool()
    async with RawServer(dies) as srv:
        read[:] = [asyncio.Event(), asyncio.Event()]
        stream = await pool.stream(srv.base_url, "/", b"", JSON, 5.0)
        got = b""
        with pytest.raises(DisconnectedError, match="mid-reply"):
            async for data in stream:
                got += data
                arrived(got)
        assert got == event(0) + event(1)
        with pytest.raises(DisconnectedError):  # and stays failed
            await stream.read_chunk()
        assert pool.idle_count() == 0

        read[:] = [asyncio.Event(), asyncio.Event()]
        executor = HttpExecutionCoordinator()
        payloads = []
        with pytest.raises(EngineDisconnectedError):
            async for payload in executor.stream_sse(engine(srv.base_url), "/", b"{}"):
                payloads.append(payload)
                arrived(b"".join(b"data: %s\n\n" % p for p in payloads))
        assert payloads == [b'{"n":0}', b'{"n":1}']
        assert srv.connections == 2 and executor._pool.idle_count() == 0
        await executor.aclose()
        await pool.aclose()


async def test_stream_ending_without_done_is_a_disconnect() -> None:
    """A whole reply with no [DONE]: the engine gave up mid-reply, as far as we know."""

    async def no_done(srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while await srv.read_request(r) is not None:
            await sse_reply(w, 2, done=False)

    executor = HttpExecutionCoordinator()
    async with RawServer(no_done) as srv:
        payloads = []
        with pytest.raises(EngineDisconnectedError, match="before \\[DONE\\]"):
            async for payload in executor.stream_sse(engine(srv.base_url), "/", b"{}"):
                payloads.append(payload)
        assert payloads == [b'{"n":0}', b'{"n":1}']
        assert executor._pool.idle_count() == 1  # the reply itself was whole
        await executor.aclose()


async def test_eof_delimited_stream_ends_at_eof() -> None:
    async def http10(srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await srv.read_request(r)
        w.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n" + event(0))
        await w.drain()
        await asyncio.sleep(0.02)
        w.write(DONE)
        await w.drain()  # the handler returning closes the connection

    executor = HttpExecutionCoordinator()
    async with RawServer(http10) as srv:
        for _ in range(2):
            payloads = [p async for p in executor.stream_sse(engine(srv.base_url), "/", b"{}")]
            assert payloads == [b'{"n":0}']
        pool = Http1Pool()
        stream = await pool.stream(srv.base_url, "/", b"", JSON, 5.0)
        assert await stream.read() == event(0) + DONE
        assert srv.connections == 3 and pool.idle_count() == 0
        await pool.aclose()
        await executor.aclose()


@pytest.mark.parametrize("elsewhere", [False, True])
async def test_closing_a_stream_early_closes_its_connection(elsewhere: bool) -> None:
    pool = Http1Pool()
    async with RawServer(endless) as srv:
        stream = await pool.stream(srv.base_url, "/", b"", JSON, 5.0)
        assert (await stream.read_chunk()).startswith(event(0))
        if elsewhere:  # closed by another task while this one waits to read
            asyncio.get_running_loop().call_soon(stream.close)
            with pytest.raises(Http1Error, match="closed"):
                while True:
                    await stream.read_chunk()  # the chunks until the close, then this
        else:
            stream.close()
        await asyncio.wait_for(srv.closed_by_peer.wait(), 5)
        assert pool.idle_count() == 0
        with pytest.raises(Http1Error, match="closed"):
            await stream.read_chunk()
        stream.close()  # again: nothing
        await pool.aclose()


async def _consumer_leaves(how: str) -> None:
    """The coordinator's stream, left after two payloads in one of several ways: the engine
    sees the connection close, and the next request gets a new one."""
    executor = HttpExecutionCoordinator()
    async with RawServer(endless) as srv:
        base = srv.base_url
        if how == "cancel":
            got: list[bytes] = []

            async def consume() -> None:
                async for payload in executor.stream_sse(engine(base), "/", b"{}"):
                    got.append(payload)

            task = asyncio.create_task(consume())
            await eventually(lambda: len(got) >= 2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            gen = executor.stream_sse(engine(base), "/", b"{}")
            assert await anext(gen) == b'{"n":0}'
            assert await anext(gen) == b'{"n":1}'
            if how == "aclose":
                await gen.aclose()  # type: ignore[attr-defined]
            else:  # dropped: asyncio's async-generator finalizer closes it
                del gen
                gc.collect()
        await asyncio.wait_for(srv.closed_by_peer.wait(), 5)
        assert executor._pool.idle_count() == 0
        assert executor._pool._slots._value == 2048
    await executor.aclose()


@pytest.mark.parametrize("how", ["aclose", "cancel", "dropped"])
async def test_consumer_leaving_early_closes_the_connection(how: str) -> None:
    await _consumer_leaves(how)


async def test_dropped_stream_closes_its_connection_and_frees_its_slot() -> None:
    pool = Http1Pool(max_connections=1)
    async with RawServer(endless) as srv:
        stream = await pool.stream(srv.base_url, "/", b"", JSON, 5.0)
        await stream.read_chunk()
        del stream
        gc.collect()
        await asyncio.wait_for(srv.closed_by_peer.wait(), 5)
        srv.closed_by_peer.clear()
        stream = await pool.stream(srv.base_url, "/", b"", JSON, 1.0)  # the slot is free
        stream.close()
        assert srv.connections == 2
        await pool.aclose()


async def test_stream_holds_a_connection_slot_until_it_ends() -> None:
    async def mixed(srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if srv.connections == 1:
            await endless(srv, r, w)
        else:
            await serve_ok(srv, r, w)

    pool = Http1Pool(max_connections=1)
    async with RawServer(mixed) as srv:
        stream = await pool.stream(srv.base_url, "/", b"", JSON, 5.0)
        with pytest.raises(TimeoutError):
            await pool.post(srv.base_url, "/", b"", JSON, 0.1)
        stream.close()
        assert await pool.post(srv.base_url, "/", b"", JSON, 5.0) == (200, b"hello")
        await pool.aclose()


async def test_stream_total_timeout_covers_the_body() -> None:
    async def stalls(srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await srv.read_request(r)
        w.write(SSE_HEAD + chunk(event(0)))
        await w.drain()
        await srv.read_request(r)  # until the client leaves

    pool = Http1Pool()
    async with RawServer(stalls) as srv:
        loop = asyncio.get_running_loop()
        begun = loop.time()
        stream = await pool.stream(srv.base_url, "/", b"", JSON, 0.3)
        assert await stream.read_chunk() == event(0)
        with pytest.raises(TimeoutError):
            await stream.read_chunk()
        assert 0.25 < loop.time() - begun < 3
        await asyncio.wait_for(srv.closed_by_peer.wait(), 5)
        assert pool.idle_count() == 0
        srv.closed_by_peer.clear()

        executor = HttpExecutionCoordinator(request_timeout_s=0.3)
        payloads = []
        with pytest.raises(DeadlineExceededError):
            async for payload in executor.stream_sse(engine(srv.base_url), "/", b"{}"):
                payloads.append(payload)
        assert payloads == [b'{"n":0}']
        await asyncio.wait_for(srv.closed_by_peer.wait(), 5)
        await executor.aclose()
        await pool.aclose()


async def test_stream_error_status_reads_the_whole_error_body() -> None:
    busy = b'{"error":{"message":"too many requests","type":"overloaded"}}'
    bad = b'{"error":{"message":"max_tokens is too large","param":"max_tokens"}}'

    async def errors(srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while await srv.read_request(r) is not None:
            body = busy if len(srv.requests) % 2 else bad
            status = b"429 Too Many Requests" if body is busy else b"400 Bad Request"
            w.write(b"HTTP/1.1 %s\r\nTransfer-Encoding: chunked\r\n\r\n" % status)
            w.write(chunk(body[:10]))
            await w.drain()
            await asyncio.sleep(0.02)
            w.write(chunk(body[10:]) + LAST_CHUNK)
            await w.drain()

    pool = Http1Pool()
    executor = HttpExecutionCoordinator()
    async with RawServer(errors) as srv:
        stream = await pool.stream(srv.base_url, "/", b"", JSON, 5.0)
        assert stream.status == 429 and await stream.read() == busy
        stream = await pool.stream(srv.base_url, "/", b"", JSON, 5.0)
        assert stream.status == 400 and await stream.read() == bad
        assert pool.idle_count() == 1  # error replies leave the connection usable
        with pytest.raises(OverloadedError, match="too many requests"):
            async for _ in executor.stream_sse(engine(srv.base_url), "/", b"{}"):
                pass
        with pytest.raises(InvalidRequestError, match="max_tokens is too large") as info:
            async for _ in executor.stream_sse(engine(srv.base_url), "/", b"{}"):
                pass
        assert info.value.param == "max_tokens"
        assert srv.connections == 2 and executor._pool.idle_count() == 1
        await pool.aclose()
        await executor.aclose()


async def test_stream_backpressure_bounds_the_buffer() -> None:
    """The server writes 5 MiB as fast as it can, the reader is slow: the client never
    holds more than the limit plus one socket read, and gets every byte, in order."""
    total = 5 << 20
    payload = bytes(range(256)) * 256  # 64 KiB

    async def firehose(srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while await srv.read_request(r) is not None:
            w.write(SSE_HEAD)
            for _ in range(total // len(payload)):
                w.write(chunk(payload))
                await w.drain()
            w.write(LAST_CHUNK)
            await w.drain()

    pool = Http1Pool()
    async with RawServer(firehose) as srv:
        stream = await pool.stream(srv.base_url, "/", b"", JSON, 10.0)
        conn = stream._conn
        assert conn is not None
        received, reads, digest = 0, 0, hashlib.sha256()
        async for data in stream:
            digest.update(data)
            received += len(data)
            reads += 1
            assert stream.buffered == 0
            await asyncio.sleep(0.02)
        assert received == total
        assert digest.digest() == hashlib.sha256(payload * (total // len(payload))).digest()
        assert STREAM_BUFFER_LIMIT < conn.peak_buffered <= STREAM_BUFFER_LIMIT + ONE_READ
        assert reads >= total // (STREAM_BUFFER_LIMIT + ONE_READ)
        # Reading resumed and the connection is whole: pooled and reusable.
        assert pool.idle_count() == 1
        assert await (await pool.stream(srv.base_url, "/", b"", JSON, 10.0)).read() != b""
        assert srv.connections == 1
        await pool.aclose()


async def test_stream_malformed_body_is_a_protocol_error() -> None:
    async def garbage(srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await srv.read_request(r)
        w.write(SSE_HEAD + chunk(event(0)))
        await w.drain()
        await asyncio.sleep(0.02)
        w.write(b"not-a-chunk-size\r\n")
        await w.drain()
        await srv.read_request(r)

    executor = HttpExecutionCoordinator()
    async with RawServer(garbage) as srv:
        payloads = []
        with pytest.raises(UpstreamError) as info:
            async for payload in executor.stream_sse(engine(srv.base_url), "/", b"{}"):
                payloads.append(payload)
        assert type(info.value) is UpstreamError and "malformed" in str(info.value)
        assert payloads == [b'{"n":0}']
        assert executor._pool.idle_count() == 0
        await executor.aclose()


async def test_stream_on_stale_connection_is_retried_but_not_after_the_head() -> None:
    async def drop_second(srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        first = srv.connections == 1
        while await srv.read_request(r) is not None:
            if first and len(srv.requests) == 2:
                return  # kept alive, then closed as the next request arrives: no reply byte
            if len(srv.requests) == 4:
                w.write(SSE_HEAD + chunk(event(0)))  # the head, then gone
                await w.drain()
                return
            await sse_reply(w, 1)

    pool = Http1Pool()
    async with RawServer(drop_second) as srv:
        for _ in range(2):  # the second is retried on a new connection
            stream = await pool.stream(srv.base_url, "/", b"", JSON, 5.0)
            assert await stream.read() == event(0) + DONE
        assert srv.connections == 2 and len(srv.requests) == 3
        stream = await pool.stream(srv.base_url, "/", b"", JSON, 5.0)
        with pytest.raises(DisconnectedError):
            await stream.read()
        assert srv.connections == 2 and len(srv.requests) == 4  # not retried
        await pool.aclose()


async def test_stream_connect_errors() -> None:
    pool = Http1Pool()
    with pytest.raises(ConnectError):
        await pool.stream(f"http://127.0.0.1:{free_port()}", "/", b"", JSON, 5.0)
    executor = HttpExecutionCoordinator()
    with pytest.raises(EngineUnreachableError):
        async for _ in executor.stream_sse(engine(f"http://127.0.0.1:{free_port()}"), "/", b""):
            pass
    assert pool._slots._value == 2048
    await executor.aclose()
    await pool.aclose()


def _sans_ids(chunk: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in chunk.items() if k not in ("id", "created")}


async def _aiohttp_payloads(url: str, body: bytes) -> list[bytes]:
    """What the coordinator's aiohttp-based stream_sse yielded, for comparison."""
    payloads: list[bytes] = []
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers=JSON) as resp,
    ):
        assert resp.status == 200
        buffer = bytearray()
        async for data in resp.content.iter_any():
            buffer += data
            for payload in _split_events(buffer):
                if payload == b"[DONE]":
                    return payloads
                payloads.append(payload)
    raise AssertionError("no [DONE]")


async def _sim_stream(base: str) -> None:
    executor = HttpExecutionCoordinator()
    path = "/v1/chat/completions"
    for usage in (False, True):
        request = orjson.dumps(
            {
                "model": "sim",
                "messages": [{"role": "user", "content": "tell me a story"}],
                "max_tokens": 8,
                "stream": True,
                "stream_options": {"include_usage": usage},
            }
        )
        reference = [
            _sans_ids(orjson.loads(p)) for p in await _aiohttp_payloads(base + path, request)
        ]
        for _ in range(3):
            payloads = [p async for p in executor.stream_sse(engine(base), path, request)]
            chunks = [orjson.loads(p) for p in payloads]
            assert [_sans_ids(c) for c in chunks] == reference
            assert all(c["object"] == "chat.completion.chunk" for c in chunks)
            with_choices = [c for c in chunks if c["choices"]]
            assert with_choices[-1]["choices"][0]["finish_reason"] is not None
            assert all(c["choices"][0]["finish_reason"] is None for c in with_choices[:-1])
            assert (chunks[-1].get("usage") is not None) is usage
            await eventually(lambda: executor._pool.idle_count() == 1)  # reused each time
    await executor.aclose()


async def test_sim_engine_stream_through_the_executor(sim_engine: Callable[..., str]) -> None:
    """The real sim engine: the same payloads aiohttp read, one kept-alive connection."""
    await _sim_stream(sim_engine("--ttft-ms", "0", "--tpot-ms", "0"))


def test_sim_engine_stream_on_uvloop(sim_engine: Callable[..., str]) -> None:
    uvloop.run(_sim_stream(sim_engine("--ttft-ms", "0", "--tpot-ms", "1")))


# --- the same on uvloop, which the scheduler runs on --------------------------------------
# uvloop's transports are not asyncio's classes and its TLS is its own: the main scenarios
# run there too.
UVLOOP_SCENARIOS: dict[str, Callable[[Path], Coroutine[Any, Any, None]]] = {
    "content_length": lambda _: test_content_length_reply_and_request_bytes(),
    "chunked": lambda _: test_chunked_reply_in_pieces(),
    "keep_alive": lambda _: test_keep_alive_reuses_one_connection(),
    "eof_delimited": lambda _: test_reply_delimited_by_eof(),
    "idle_dropped": lambda _: test_server_dropping_idle_connection_is_noticed(),
    "stale_fin": lambda _: test_stale_reused_connection_is_retried_once_on_a_fresh_one(False),
    "stale_rst": lambda _: test_stale_reused_connection_is_retried_once_on_a_fresh_one(True),
    "reset": lambda _: test_reset_on_fresh_connection_is_a_disconnect_not_retried(),
    "mid_reply": lambda _: test_drop_mid_reply_on_reused_connection_is_not_retried(),
    "refused": lambda _: test_connect_refused(),
    "timeout": lambda _: test_timeout_closes_the_connection(),
    "cancel": lambda _: test_cancelled_request_closes_its_connection(),
    "executor_errors": lambda _: test_executor_maps_failures_like_aiohttp(),
    "https": test_https_with_a_trusted_self_signed_certificate,
    "stream_pieces": lambda _: test_stream_hands_out_chunks_as_they_arrive(),
    "stream_reuse": lambda _: test_complete_streams_reuse_one_connection(),
    "stream_late_end": lambda _: (
        test_done_before_the_terminator_pools_the_connection_once_it_arrives()
    ),
    "stream_never_ends": lambda _: test_released_stream_whose_reply_never_ends_is_closed(),
    "stream_dies_fin": lambda _: test_engine_dying_mid_stream_is_a_disconnect(False),
    "stream_dies_rst": lambda _: test_engine_dying_mid_stream_is_a_disconnect(True),
    "stream_eof": lambda _: test_eof_delimited_stream_ends_at_eof(),
    "stream_close": lambda _: test_closing_a_stream_early_closes_its_connection(False),
    "stream_close_elsewhere": lambda _: test_closing_a_stream_early_closes_its_connection(True),
    "stream_leave_aclose": lambda _: _consumer_leaves("aclose"),
    "stream_leave_cancel": lambda _: _consumer_leaves("cancel"),
    "stream_leave_dropped": lambda _: _consumer_leaves("dropped"),
    "stream_dropped": lambda _: test_dropped_stream_closes_its_connection_and_frees_its_slot(),
    "stream_slot": lambda _: test_stream_holds_a_connection_slot_until_it_ends(),
    "stream_timeout": lambda _: test_stream_total_timeout_covers_the_body(),
    "stream_errors": lambda _: test_stream_error_status_reads_the_whole_error_body(),
    "stream_backpressure": lambda _: test_stream_backpressure_bounds_the_buffer(),
    "stream_malformed": lambda _: test_stream_malformed_body_is_a_protocol_error(),
    "stream_stale": lambda _: test_stream_on_stale_connection_is_retried_but_not_after_the_head(),
}


@pytest.mark.parametrize("scenario", sorted(UVLOOP_SCENARIOS))
def test_on_uvloop(scenario: str, tmp_path: Path) -> None:
    uvloop.run(UVLOOP_SCENARIOS[scenario](tmp_path))


async def test_abort_breaks_every_connection_to_an_origin_and_no_other() -> None:
    """abort(base_url): a unary request and a stream waiting on an engine that answers
    nothing fail at once with DisconnectedError (the stream after the event it had), its
    idle connection is closed too, and another origin's requests are untouched."""
    release = asyncio.Event()

    async def silent(srv: RawServer, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while (request := await srv.read_request(r)) is not None:
            if b"POST /idle" in request:
                w.write(OK)
                await w.drain()
                continue
            if b"POST /stream" in request:
                w.write(SSE_HEAD + chunk(event(0)))
                await w.drain()
            await release.wait()  # then nothing more, the socket left open (a lost host)

    pool = Http1Pool()
    async with RawServer(silent) as lost, RawServer(serve_ok) as other:
        assert await pool.post(lost.base_url, "/idle", b"", JSON, 5.0) == (200, b"hello")
        assert await pool.post(other.base_url, "/", b"", JSON, 5.0) == (200, b"hello")
        unary = asyncio.create_task(pool.post(lost.base_url, "/unary", b"", JSON, 30.0))
        stream = await pool.stream(lost.base_url, "/stream", b"", JSON, 30.0)
        assert await stream.read_chunk() == event(0)
        await lost.wait_requests(3)
        assert pool.abort(lost.base_url, "node n1 was lost") == 2
        with pytest.raises(DisconnectedError, match="node n1 was lost"):
            await unary
        with pytest.raises(DisconnectedError, match="node n1 was lost"):
            await stream.read_chunk()
        await asyncio.sleep(0)
        assert pool.idle_count() == 1  # only the other origin's connection is left
        assert await pool.post(other.base_url, "/", b"", JSON, 5.0) == (200, b"hello")
        assert other.connections == 1
        assert pool.abort(lost.base_url, "again") == 0
        release.set()
        await pool.aclose()
