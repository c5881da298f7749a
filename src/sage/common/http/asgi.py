"""Request/response types and a path router over raw ASGI."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from opentelemetry import propagate, trace

from sage.common.exceptions import (
    InvalidRequestError,
    NotFoundError,
    SageError,
    openai_error_body,
)
from sage.common.utils.logging import request_id_var

from .cors import CorsPolicy
from .guard import SAFE_METHODS, BrowserGuard

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("sage.http")

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
# A caller's x-request-id is kept only in this shape: it lands in logs and gRPC metadata,
# where spaces, `=` or control characters could forge fields.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_T = TypeVar("_T")
# Request.unless_disconnected starts watching for a disconnect after this long.
WATCH_AFTER_S = 0.05


class PayloadTooLargeError(InvalidRequestError):
    """The request body is over the configured limit."""

    http_status = 413
    default_code = "payload_too_large"


class ClientDisconnected(Exception):
    """The HTTP client went away before the body was read."""


@dataclass(slots=True)
class Request:
    """One HTTP request; the body is read on demand, at most `max_body_bytes`."""

    method: str
    path: str
    query: bytes
    headers: dict[str, str]
    receive: Receive
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    _body: bytes | None = None
    # Set by a handler once it knows the model, so metrics can label the request by it.
    model: str = ""

    async def body(self) -> bytes:
        """The whole body; raises PayloadTooLargeError past the limit."""
        if self._body is not None:
            return self._body
        declared = self.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise PayloadTooLargeError(
                f"request body of {declared} bytes is over the limit of {self.max_body_bytes}"
            )
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise PayloadTooLargeError(
                        f"request body is over the limit of {self.max_body_bytes} bytes"
                    )
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        self._body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return self._body

    async def json(self) -> Any:
        """The body parsed as JSON; malformed JSON is an InvalidRequestError."""
        raw = await self.body()
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequestError(f"request body is not valid JSON: {exc}") from None

    async def wait_disconnect(self) -> None:
        """Return when the client disconnects (only meaningful after the body was read)."""
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                return

    async def unless_disconnected(
        self, awaitable: Awaitable[_T], watch_after_s: float = WATCH_AFTER_S
    ) -> _T:
        """Await `awaitable` in this task, cancelling it if the client disconnects first
        (ClientDisconnected then), so an abandoned request stops upstream too.

        Call it once the body was read. The task watching `receive` starts only after
        `watch_after_s`: a quick reply never pays for it (~30 us a request), and a client
        gone before then is noticed as soon as the watch starts.
        """
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        watcher: asyncio.Task[None] | None = None
        watching = True

        def client_gone(done: asyncio.Task[None]) -> None:
            if watching and not done.cancelled():
                task.cancel()

        def watch() -> None:
            nonlocal watcher
            watcher = loop.create_task(self.wait_disconnect())
            watcher.add_done_callback(client_gone)

        timer = loop.call_later(watch_after_s, watch)
        try:
            return await awaitable
        except asyncio.CancelledError:
            if watcher is not None and watcher.done() and not watcher.cancelled():
                task.uncancel()
                raise ClientDisconnected from None
            raise
        finally:
            watching = False  # a callback already scheduled must not cancel us later
            timer.cancel()
            if watcher is not None:
                watcher.cancel()


@dataclass(slots=True)
class Response:
    """A complete response with a bytes body."""

    body: bytes = b""
    status: int = 200
    content_type: bytes = b"application/json"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    async def send(self, send: Send, extra_headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        headers = [
            (b"content-type", self.content_type),
            (b"content-length", str(len(self.body)).encode()),
            *self.headers,
            *extra_headers,
        ]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


def JSONResponse(
    obj: Any, status: int = 200, headers: list[tuple[bytes, bytes]] | None = None
) -> Response:
    """A Response whose body is `obj` serialised with orjson."""
    return Response(orjson.dumps(obj), status, b"application/json", headers or [])


@dataclass(slots=True)
class StreamingResponse:
    """A response whose body chunks come from an async iterator, sent as they arrive."""

    chunks: AsyncIterator[bytes]
    status: int = 200
    content_type: bytes = b"text/event-stream"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    async def send(
        self,
        send: Send,
        extra_headers: Iterable[tuple[bytes, bytes]] = (),
        receive: Receive | None = None,
    ) -> None:
        """Stream the chunks; with `receive`, stop producing as soon as the client leaves.

        uvicorn's `send` silently drops data after a disconnect, so without watching
        `receive` an abandoned stream would keep an engine busy until it finished.
        """
        headers = [
            (b"content-type", self.content_type),
            (b"cache-control", b"no-cache"),
            *self.headers,
            *extra_headers,
        ]
        if receive is None:
            await self._pump(send, headers)
            return
        pump = asyncio.ensure_future(self._pump(send, headers))
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            done, _ = await asyncio.wait({pump, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if pump in done:
                pump.result()
            else:
                log.info("client disconnected mid-stream; cancelling upstream")
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _pump(self, send: Send, headers: list[tuple[bytes, bytes]]) -> None:
        started = False
        try:
            async for chunk in self.chunks:
                if not started:
                    await send(
                        {"type": "http.response.start", "status": self.status, "headers": headers}
                    )
                    started = True
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if not started:
                await send(
                    {"type": "http.response.start", "status": self.status, "headers": headers}
                )
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            aclose = getattr(self.chunks, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def sse_event(data: bytes) -> bytes:
    """One server-sent event carrying `data` (already JSON)."""
    return b"data: " + data + b"\n\n"


def error_response(exc: SageError, headers: list[tuple[bytes, bytes]] | None = None) -> Response:
    """The OpenAI error JSON response for a SageError (Retry-After on overload)."""
    extra = list(headers or [])
    if exc.retry_after is not None:
        extra.append((b"retry-after", str(max(1, round(exc.retry_after))).encode()))
    return JSONResponse(exc.to_openai(), exc.http_status, extra)


Handler = Callable[[Request], Awaitable[Response | StreamingResponse]]
# Called once per finished request: (method, route, model, status, seconds).
Observer = Callable[[str, str, str, int, float], None]
# The route label of requests that matched no route (keeps metric labels bounded).
UNMATCHED_ROUTE = "unmatched"


class App:
    """An ASGI app: exact-path routing, OpenAI errors for everything that goes wrong."""

    def __init__(
        self,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        on_startup: Callable[[], Awaitable[None]] | None = None,
        on_shutdown: Callable[[], Awaitable[None]] | None = None,
        observer: Observer | None = None,
        cors: CorsPolicy | None = None,
        guard: BrowserGuard | None = None,
    ) -> None:
        self._routes: dict[str, dict[str, Handler]] = {}
        self._prefix_routes: list[tuple[str, dict[str, Handler]]] = []
        # "/engines/{engine_id}/logs": each {name} one path segment, matched in order
        self._template_routes: list[tuple[re.Pattern[str], str, dict[str, Handler]]] = []
        self.max_body_bytes = max_body_bytes
        self._on_startup = on_startup
        self._on_shutdown = on_shutdown
        self._observer = observer
        self._cors = cors
        self._guard = guard
        # Requests being handled now, streams included.
        self.in_flight = 0

    def route(self, method: str, path: str) -> Callable[[Handler], Handler]:
        """Decorator: register `handler` for METHOD PATH (a `{name}` matches one path segment,
        a trailing `*` any rest)."""

        def register(handler: Handler) -> Handler:
            self.add(method, path, handler)
            return handler

        return register

    def add(self, method: str, path: str, handler: Handler) -> None:
        if path.endswith("*"):
            prefix = path[:-1]
            for existing_prefix, methods in self._prefix_routes:
                if existing_prefix == prefix:
                    methods[method.upper()] = handler
                    return
            self._prefix_routes.append((prefix, {method.upper(): handler}))
            self._prefix_routes.sort(key=lambda item: -len(item[0]))
            return
        if "{" in path:
            for _, template, methods in self._template_routes:
                if template == path:
                    methods[method.upper()] = handler
                    return
            pattern = re.compile(
                "".join(
                    "[^/]+" if part.startswith("{") else re.escape(part)
                    for part in re.split(r"(\{[^}/]+\})", path)
                )
            )
            self._template_routes.append((pattern, path, {method.upper(): handler}))
            return
        self._routes.setdefault(path, {})[method.upper()] = handler

    def routes(self) -> list[tuple[str, str]]:
        """Every (METHOD, path) registered; prefix routes keep their trailing `*`."""
        exact = [(m, path) for path, methods in self._routes.items() for m in methods]
        exact += [(m, path) for _, path, methods in self._template_routes for m in methods]
        prefixed = [(m, p + "*") for p, methods in self._prefix_routes for m in methods]
        return sorted(exact + prefixed)

    def match(self, path: str) -> tuple[str, dict[str, Handler]] | None:
        """(route, handlers by method) for `path`; the route is the registered pattern."""
        methods = self._routes.get(path)
        if methods is None and len(path) > 1 and path.endswith("/"):
            path = path.rstrip("/")
            methods = self._routes.get(path)
        if methods is not None:
            return path, methods
        for pattern, template, by_method in self._template_routes:
            if pattern.fullmatch(path):
                return template, by_method
        for prefix, prefixed in self._prefix_routes:
            if path.startswith(prefix):
                return prefix + "*", prefixed
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    if self._on_startup is not None:
                        await self._on_startup()
                except Exception as exc:  # startup failure must be reported, not hidden
                    log.exception("startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    if self._on_shutdown is not None:
                        await self._on_shutdown()
                finally:
                    await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        # The request id travels HTTP → gRPC metadata → logs, and back in the response.
        request_id = headers.get("x-request-id")
        if request_id is None or _REQUEST_ID.fullmatch(request_id) is None:
            request_id = uuid.uuid4().hex
        extra = [(b"x-request-id", request_id.encode("latin-1"))]
        if self._guard is not None:
            try:
                self._guard.check_source(method, headers)
            except SageError as exc:
                log.info("refused: %s", exc.message, extra={"method": method, "path": path[:200]})
                await error_response(exc).send(send, extra)
                if self._observer is not None:
                    self._observer(method, UNMATCHED_ROUTE, "", exc.http_status, 0.0)
                return
        if self._cors is not None:
            origin = headers.get("origin")
            if origin is not None:
                if method == "OPTIONS" and "access-control-request-method" in headers:
                    await self._preflight(self._cors, origin, path, headers, extra, send)
                    return
                extra.extend(self._cors.response_headers(origin))
        token = request_id_var.set(request_id)
        self.in_flight += 1
        try:
            with _tracer.start_as_current_span(
                f"{method} {path}", context=propagate.extract(headers), kind=trace.SpanKind.SERVER
            ):
                await self._dispatch(scope, receive, send, path, method, headers, extra)
        finally:
            self.in_flight -= 1
            request_id_var.reset(token)

    async def _preflight(
        self,
        cors: CorsPolicy,
        origin: str,
        path: str,
        headers: dict[str, str],
        extra: list[tuple[bytes, bytes]],
        send: Send,
    ) -> None:
        matched = self.match(path)
        methods = matched[1] if matched is not None else {m: None for m, _ in self.routes()}
        status, cors_headers, body = cors.preflight(origin, headers, methods)
        content = [(b"content-length", str(len(body)).encode()), *cors_headers, *extra]
        await send({"type": "http.response.start", "status": status, "headers": content})
        await send({"type": "http.response.body", "body": body})

    async def _dispatch(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        path: str,
        method: str,
        headers: dict[str, str],
        extra: list[tuple[bytes, bytes]],
    ) -> None:
        started = time.perf_counter()
        matched = self.match(path)
        response: Response | StreamingResponse
        request: Request | None = None
        if matched is None:
            route = UNMATCHED_ROUTE
            response = error_response(
                NotFoundError(f"no route for {method} {path}", code="unknown_url")
            )
        else:
            route, methods = matched
            handler = methods.get(method)
            if handler is None:
                response = JSONResponse(
                    openai_error_body(
                        f"method {method} is not allowed on {path}",
                        "invalid_request_error",
                        None,
                        "method_not_allowed",
                    ),
                    405,
                    [(b"allow", ", ".join(sorted(methods)).encode())],
                )
            else:
                request = Request(
                    method,
                    path,
                    scope.get("query_string", b""),
                    headers,
                    receive,
                    self.max_body_bytes,
                )
                try:
                    if self._guard is not None and method not in SAFE_METHODS:
                        self._guard.check_body_type(method, headers)
                    response = await handler(request)
                except SageError as exc:
                    response = error_response(exc)
                except ClientDisconnected:
                    if self._observer is not None:
                        # nginx's "client closed request", so abandoned calls stay visible
                        elapsed = time.perf_counter() - started
                        self._observer(method, route, request.model, 499, elapsed)
                    return
                except Exception:
                    log.exception("unhandled error on %s %s", method, path)
                    response = JSONResponse(
                        openai_error_body(
                            "internal server error", "internal_error", None, "internal_error"
                        ),
                        500,
                    )
        try:
            if isinstance(response, StreamingResponse):
                await response.send(send, extra, receive)
            else:
                await response.send(send, extra)
        finally:
            if self._observer is not None:
                self._observer(
                    method,
                    route,
                    request.model if request is not None else "",
                    response.status,
                    time.perf_counter() - started,
                )
