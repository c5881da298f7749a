"""asyncio gRPC server with health, reflection, authentication, error mapping and graceful
shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import propagate, trace

from sage.common.exceptions import InternalError, InvalidRequestError, SageError
from sage.common.utils.logging import request_id_var

from . import metadata as md
from .auth import ServerAuth, process_token
from .status import DETAILS_KEY, INTERNAL_TOKEN_REJECTED, status_details
from .tls import TlsConfig, process_tls

log = logging.getLogger("sage.grpc")
_tracer = trace.get_tracer("sage.grpc")

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"

# Large enough for a batch of embedding vectors or a long prompt.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Registration:
    """One gRPC service to serve: its full name, the generated add_* function, the servicer."""

    full_name: str
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: Any


def error_trailers(exc: SageError) -> tuple[tuple[str, str], ...]:
    """The legacy sage-error* trailers that let a caller rebuild `exc`.

    Superseded by the google.rpc.Status in grpc-status-details-bin (error_metadata), which
    callers read first; still sent for one release so a caller of the previous release (which
    reads only these) keeps getting the exact error in a mixed-version deployment.
    """
    trailers = [(md.ERROR_CLASS, type(exc).__name__)]
    if exc.param:
        trailers.append((md.ERROR_PARAM, exc.param))
    if exc.code:
        trailers.append((md.ERROR_CODE, str(exc.code)))
    if exc.retry_after is not None:
        trailers.append((md.RETRY_AFTER, f"{exc.retry_after:g}"))
    return tuple(trailers)


def error_metadata(exc: SageError) -> tuple[tuple[str, str | bytes], ...]:
    """A failed call's trailing metadata: the standard google.rpc.Status (ErrorInfo,
    BadRequest, RetryInfo) plus the legacy trailers (error_trailers)."""
    details = status_details(exc.grpc_code, status_message(exc), exc)
    return (*error_trailers(exc), (DETAILS_KEY, details))


def status_message(exc: SageError) -> str:
    """`exc`'s message as a status detail: details travel in a trailer (16 KiB cap), so a
    message echoing a huge input must not turn the error into "Stream removed"."""
    return exc.message if len(exc.message) <= 2000 else exc.message[:2000] + "…"


def enter_request(method: str, meta: Mapping[str, str]) -> tuple[Any, Any]:
    """Set request id + trace context from a request's metadata; returns tokens to undo it
    (exit_request)."""
    rid = meta.get(md.REQUEST_ID) or uuid.uuid4().hex
    rid_token = request_id_var.set(rid)
    span_cm = _tracer.start_as_current_span(
        method, context=propagate.extract(meta), kind=trace.SpanKind.SERVER
    )
    span_cm.__enter__()
    return rid_token, span_cm


def exit_request(tokens: tuple[Any, Any]) -> None:
    """Undo enter_request."""
    rid_token, span_cm = tokens
    span_cm.__exit__(None, None, None)
    request_id_var.reset(rid_token)


def _enter_call(method: str, context: Context) -> tuple[Any, Any]:
    """enter_request with the call's invocation metadata."""
    meta = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
    return enter_request(method, meta)


async def _abort_for(exc: BaseException, method: str, context: Context) -> None:
    if isinstance(exc, SageError):
        log.info(
            "rpc error",
            extra={"method": method, "error": type(exc).__name__, "detail": exc.message},
        )
        await context.abort(
            exc.grpc_code, status_message(exc), trailing_metadata=error_metadata(exc)
        )
    if isinstance(exc, NotImplementedError):
        # What the generated base servicer raises for a method this server lacks (having
        # set UNIMPLEMENTED on the context): callers may fall back on that status.
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented here")
    log.exception("unexpected error in rpc", extra={"method": method})
    await context.abort(
        grpc.StatusCode.INTERNAL,
        f"internal error in {method}: {type(exc).__name__}",
        trailing_metadata=error_metadata(
            InternalError(f"internal error in {method}: {type(exc).__name__}")
        ),
    )


async def _decode(decode: Any, raw: Any, method: str, context: Context) -> Any:
    """Parse the request here rather than in grpc, which answers UNKNOWN on a malformed
    message; the caller's fault is INVALID_ARGUMENT."""
    if decode is None:
        return raw
    try:
        return decode(raw)
    except Exception as exc:
        error = InvalidRequestError(f"malformed request message for {method}: {str(exc)[:200]}")
        await context.abort(
            error.grpc_code, status_message(error), trailing_metadata=error_metadata(error)
        )


def _unauthenticated(handler: Handler, method: str) -> Handler:
    """A handler of `handler`'s kind that refuses the call without reading its request."""
    message = (
        f"{method}: missing or wrong internal token ({md.INTERNAL_TOKEN}); calls between "
        "SAGE services carry the stack's token (SAGE_INTERNAL_TOKEN or "
        "$SAGE_HOME/llm/internal.token)"
    )

    code = grpc.StatusCode.UNAUTHENTICATED
    details = status_details(code, message, reason=INTERNAL_TOKEN_REJECTED)

    async def refuse(context: Context) -> None:
        log.warning("unauthenticated rpc refused", extra={"method": method, "peer": context.peer()})
        await context.abort(code, message, trailing_metadata=((DETAILS_KEY, details),))

    async def unary(request: Any, context: Context) -> Any:
        await refuse(context)

    async def streamed(request: Any, context: Context) -> AsyncIterator[Any]:
        await refuse(context)
        yield  # pragma: no cover - abort raised

    serialize = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary, response_serializer=serialize)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(streamed, response_serializer=serialize)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary, response_serializer=serialize)
    return grpc.stream_stream_rpc_method_handler(streamed, response_serializer=serialize)


class _SageServerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg,misc]
    """Authentication, request id, tracing, and SageError → status for every handler
    (bidirectional streams: the status only). Health and reflection stay open: probes and
    tools use them, and they reveal nothing a port scan does not."""

    def __init__(self, auth: ServerAuth) -> None:
        self._auth = auth

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method
        if method.startswith(("/grpc.health", "/grpc.reflection")):
            return handler
        if not self._auth.allows(handler_call_details.invocation_metadata):
            return _unauthenticated(handler, method)
        if handler.unary_unary is not None:
            inner: Any = handler.unary_unary
            decode: Any = handler.request_deserializer

            async def unary_unary(raw: Any, context: Context) -> Any:
                request = await _decode(decode, raw, method, context)
                rid_token, span_cm = _enter_call(method, context)
                started = time.perf_counter()
                try:
                    return await inner(request, context)
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as exc:  # mapped to a status, never a crash
                    await _abort_for(exc, method, context)
                    raise  # unreachable: abort raises
                finally:
                    log.debug(
                        "rpc done",
                        extra={
                            "method": method,
                            "ms": round((time.perf_counter() - started) * 1e3, 2),
                        },
                    )
                    exit_request((rid_token, span_cm))

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_stream: Any = handler.unary_stream
            decode_stream: Any = handler.request_deserializer

            async def unary_stream(raw: Any, context: Context) -> AsyncIterator[Any]:
                request = await _decode(decode_stream, raw, method, context)
                rid_token, span_cm = _enter_call(method, context)
                try:
                    async for item in inner_stream(request, context):
                        yield item
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as exc:
                    await _abort_for(exc, method, context)
                    raise
                finally:
                    exit_request((rid_token, span_cm))

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            # Long-lived calls (Multiplex) set request id and span per request themselves;
            # here only an error raised by the call as a whole becomes its status.
            inner_bidi: Any = handler.stream_stream

            async def stream_stream(requests: Any, context: Context) -> AsyncIterator[Any]:
                try:
                    async for item in inner_bidi(requests, context):
                        yield item
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as exc:
                    await _abort_for(exc, method, context)
                    raise

            return grpc.stream_stream_rpc_method_handler(
                stream_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


class SageServer:
    """A started-or-not gRPC server plus its health servicer, stopped gracefully."""

    def __init__(
        self,
        server: grpc.aio.Server,
        health_servicer: Any,
        service_names: Sequence[str],
    ) -> None:
        self.server = server
        self.health = health_servicer
        self.service_names = tuple(service_names)
        self._on_stop: list[Callable[[], Awaitable[None]]] = []
        self._on_start: list[Callable[[], Awaitable[None]]] = []
        self._on_drain: list[Callable[[float], Awaitable[None]]] = []

    def on_start(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run `callback` once the server is started (recover state, start timers)."""
        self._on_start.append(callback)

    def on_drain(self, callback: Callable[[float], Awaitable[None]]) -> None:
        """Run `callback(grace)` when shutdown begins, before the server stops: long-lived
        calls (Multiplex) finish what they started and end, instead of being cut at grace."""
        self._on_drain.append(callback)

    def on_stop(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run `callback` after the server stops accepting calls (close pools, save state)."""
        self._on_stop.append(callback)

    async def _set_all(self, status: int) -> None:
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def start(self) -> None:
        """Start serving and report SERVING on health for every service."""
        await self.server.start()
        for callback in self._on_start:
            await callback()
        await self._set_all(health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float = 5.0) -> None:
        """Report NOT_SERVING first so balancers drain, then finish in-flight calls."""
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        begun = time.monotonic()
        if self._on_drain:
            await asyncio.gather(*(callback(grace) for callback in self._on_drain))
        # One grace in all: what the drain used is not given again to unary calls.
        await self.server.stop(max(0.0, grace - (time.monotonic() - begun)))
        for callback in self._on_stop:
            try:
                await callback()
            except Exception:
                log.exception("shutdown callback failed")

    async def wait_for_termination(self) -> None:
        """Block until the server has stopped."""
        await self.server.wait_for_termination()


def create_server(
    addr: str,
    registrations: Sequence[Registration],
    *,
    extra_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),  # type: ignore[type-arg]
    tls: TlsConfig | None = None,
    internal_token: str | None = None,
) -> tuple[SageServer, int]:
    """Build (not start) a server on `addr` (port 0 picks one); returns it and its port.

    It listens with TLS (mTLS with client_auth) when `tls`, or else the process's TLS
    config (SAGE_TLS_*), has a certificate; otherwise plaintext. Every call but health and
    reflection must carry `internal_token` (default: the process's, auth.process_token), with
    or without mTLS, else it is refused with UNAUTHENTICATED.
    """
    tls = tls if tls is not None else process_tls()
    auth = ServerAuth(internal_token if internal_token is not None else process_token())
    if not auth.token:
        raise ValueError("internal_token must not be empty")
    server = grpc.aio.server(
        interceptors=[*extra_interceptors, _SageServerInterceptor(auth)],
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    names = []
    for reg in registrations:
        reg.add_to_server(reg.servicer, server)
        names.append(reg.full_name)
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    if tls.serves_tls:
        port = server.add_secure_port(addr, tls.server_credentials())
    else:
        port = server.add_insecure_port(addr)
    if port == 0:
        raise OSError(f"could not bind gRPC server to {addr}")
    return SageServer(server, health_servicer, names), port


async def serve_until_signalled(sage_server: SageServer, *, grace: float = 5.0) -> None:
    """Start, then run until SIGTERM/SIGINT, then shut down gracefully."""
    await sage_server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.ensure_future(sage_server.wait_for_termination())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    log.info("shutting down", extra={"grace_s": grace})
    await sage_server.stop(grace)
    for task in (waiter, stopper):
        task.cancel()
