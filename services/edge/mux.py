"""The edge's side of Multiplex: chat, completion and embedding requests as tagged
messages on one long-lived call to the scheduler, instead of one gRPC call each.

A unary call in grpc-python costs ~0.25 ms of client CPU and ~0.5 ms of round trip on a
small host; a message on an open call about half that (bench/RESULTS.md). Each request
keeps what a call gave it: a deadline, a cancel when its client goes away, its request id
and trace context, and the scheduler's SageError rebuilt exactly. A scheduler without
Multiplex (UNIMPLEMENTED) is served with the unary calls, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any, Final

import grpc

from sage.common.exceptions import (
    DeadlineExceededError,
    InternalError,
    InvalidRequestError,
    OverloadedError,
    ServiceUnavailableError,
)
from sage.common.grpc import call_metadata, from_rpc_error, token_metadata
from sage.common.grpc.client import error_from_status, request_metadata
from sage.common.grpc.server import MAX_MESSAGE_BYTES
from sage.common.grpc.tagged import TaggedCall
from sage.rpc.scheduler.v1 import scheduler_pb2 as spb

if TYPE_CHECKING:
    from sage.rpc.scheduler.v1.scheduler_pb2_grpc import SchedulerServiceAsyncStub

log = logging.getLogger("sage.edge.mux")

_STATUS: Final = {code.value[0]: code for code in grpc.StatusCode}
# Multiplex request kind → the scheduler RPC that serves it on a call of its own, used when
# the scheduler has no Multiplex.
_RPC_WITHOUT_MULTIPLEX: Final = {
    "chat": "Chat",
    "complete": "Complete",
    "embed": "Embed",
    "chat_stream": "ChatStream",
    "complete_stream": "CompleteStream",
}
_REPLIES: Final = frozenset({"chat", "complete", "embed"})
_END: Final = object()
# Calls queued together share a message up to this size (one over the gRPC limit would fail
# the whole call, every request on it).
_BATCH_BYTES: Final = 4 << 20
_MAX_CALL_BYTES: Final = MAX_MESSAGE_BYTES - (64 << 10)
# Unread bytes a streamed request may have waiting at the edge (its HTTP client is slow or
# gone) before it is stopped; a whole long generation is a few MiB of chunks.
STREAM_BACKLOG_BYTES: Final = 16 << 20


class _Unsupported(Exception):
    """The scheduler has no Multiplex: use the unary calls."""


class _NotStarted(Exception):
    """The call ended (scheduler draining) before the scheduler read this request; it was
    never started, so it may be sent again."""


class _Waiter:
    """A pending non-streamed request: one reply or one error."""

    __slots__ = ("future",)

    def __init__(self) -> None:
        self.future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def deliver(self, message: Any) -> bool:
        if not self.future.done():
            self.future.set_result(message)
        return True

    def finish(self) -> None:
        self.fail(InternalError("the scheduler ended a non-streamed request without a reply"))

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class _Chunks:
    """A pending streamed request: messages, then the end or an error, in order; the
    consumer takes everything that arrived since it last looked (one HTTP write).

    The scheduler's messages arrive at the pace of the engine, whatever the HTTP client
    reads, so the unread backlog is bounded: past `limit` bytes the request is stopped.
    """

    __slots__ = ("items", "limit", "started", "unread", "waiter")

    def __init__(self, limit: int) -> None:
        self.items: list[Any] = []
        self.started = False
        self.waiter: asyncio.Future[None] | None = None
        self.unread = 0
        self.limit = limit

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def deliver(self, message: Any) -> bool:
        """Queue `message`; False when the unread backlog is over the limit."""
        self.started = True
        self.items.append(message)
        self.unread += message.ByteSize()
        self._wake()
        return self.unread <= self.limit

    def finish(self) -> None:
        self.items.append(_END)
        self._wake()

    def fail(self, exc: BaseException) -> None:
        self.items.append(exc)
        self._wake()

    async def take(self) -> list[Any]:
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        items, self.items = self.items, []
        self.unread = 0
        return items


# One open Multiplex call and the requests waiting on it (sage.common.grpc.tagged).
_Session = TaggedCall[spb.MultiplexCall, _Waiter | _Chunks]


class SchedulerMux:
    """Sends the edge's chat, completion and embedding requests over Multiplex (see the
    module doc)."""

    def __init__(self, stub: SchedulerServiceAsyncStub) -> None:
        self.stub = stub
        self.supported = True
        self._session: _Session | None = None
        self._ids = itertools.count(1)

    def _open(self) -> _Session:
        session = self._session
        if session is None:
            # The channel has no stream interceptor (hot path): the token goes here.
            session = _Session(
                self.stub.Multiplex(None, metadata=token_metadata()),  # type: ignore[arg-type]
                lambda calls: spb.MultiplexRequest(calls=calls),
                _BATCH_BYTES,
            )
            session.reader = asyncio.create_task(self._read(session))
            self._session = session
        return session

    async def _read(self, session: _Session) -> None:
        error: BaseException = _NotStarted()  # ended with OK: the scheduler is draining
        try:
            async for response in session.call:
                for reply in response.replies:
                    self._dispatch(session, reply)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                log.info("the scheduler has no Multiplex; using unary calls")
                self.supported = False
                error = _Unsupported()
            else:
                error = from_rpc_error(exc)
        except asyncio.CancelledError:
            error = ServiceUnavailableError("the edge is shutting down")
            raise
        except Exception as exc:  # a bug here: fail what is pending, never retry it
            log.exception("Multiplex reader failed")
            # The caller gets no internals (the log line has them).
            error = InternalError(f"the edge lost its call to the scheduler ({type(exc).__name__})")
        finally:
            session.error = error
            session.writer.cancel()
            if self._session is session:
                self._session = None
            pending, session.pending = session.pending, {}
            for entry in pending.values():
                entry.fail(error)

    def _dispatch(self, session: _Session, reply: spb.MultiplexReply) -> None:
        entry = session.pending.get(reply.id)
        if entry is None:
            return  # its caller gave up (and sent a cancel)
        kind = reply.WhichOneof("result")
        if kind in _REPLIES:
            del session.pending[reply.id]
            entry.deliver(getattr(reply, kind))
        elif kind == "error":
            del session.pending[reply.id]
            err = reply.error
            entry.fail(
                error_from_status(
                    _STATUS.get(err.code, grpc.StatusCode.UNKNOWN), err.message, dict(err.trailers)
                )
            )
        elif kind == "end":
            del session.pending[reply.id]
            entry.finish()
        elif kind is not None and not entry.deliver(getattr(reply, kind)):
            # a streamed request whose HTTP client is not reading: stop it upstream
            del session.pending[reply.id]
            self._cancel(session, reply.id)
            entry.fail(
                OverloadedError(
                    f"the client read too slowly: over {STREAM_BACKLOG_BYTES >> 20} MiB of the "
                    "stream was waiting; stopped"
                )
            )

    def _request(self, kind: str, message: Any, timeout_s: float) -> spb.MultiplexCall:
        request = spb.MultiplexCall(
            id=next(self._ids), timeout_s=timeout_s, metadata=request_metadata()
        )
        getattr(request, kind).CopyFrom(message)
        return request

    @staticmethod
    def _cancel(session: _Session, request_id: int) -> None:
        """Tell the scheduler to stop `request_id` (its client went away or timed out); a
        request still queued here is just taken back."""
        if session.error is None and not session.unsend(request_id):
            session.send(spb.MultiplexCall(id=request_id, cancel=spb.MultiplexCancel()))

    @staticmethod
    def _checked(request: spb.MultiplexCall) -> spb.MultiplexCall:
        """`request`, unless it is too large for one gRPC message (it would fail the call)."""
        size = request.ByteSize()
        if size > _MAX_CALL_BYTES:
            raise InvalidRequestError(
                f"the request ({size >> 20} MiB) is over the {_MAX_CALL_BYTES >> 20} MiB "
                "message limit of the scheduler hop"
            )
        return request

    async def unary(self, kind: str, message: Any, timeout_s: float) -> Any:
        """Run one non-streamed request ("chat", "complete" or "embed"); its reply message,
        or the SageError the scheduler raised."""
        for _ in range(2):  # a second time only when the first was never started
            if not self.supported:
                return await self._unary_call(kind, message, timeout_s)
            session = self._open()
            request = self._checked(self._request(kind, message, timeout_s))
            waiter = _Waiter()
            session.pending[request.id] = waiter
            try:
                session.send(request)
                async with asyncio.timeout(timeout_s):
                    return await waiter.future
            except TimeoutError:
                raise DeadlineExceededError(
                    f"the scheduler did not answer within {timeout_s:g} s"
                ) from None
            except (_Unsupported, _NotStarted):
                continue
            finally:
                if session.pending.pop(request.id, None) is not None:
                    self._cancel(session, request.id)
        raise ServiceUnavailableError("the scheduler is shutting down")

    async def _unary_call(self, kind: str, message: Any, timeout_s: float) -> Any:
        try:
            return await getattr(self.stub, _RPC_WITHOUT_MULTIPLEX[kind])(
                message, timeout=timeout_s
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    async def stream(self, kind: str, message: Any, timeout_s: float) -> AsyncIterator[list[Any]]:
        """Run one streamed request ("chat_stream" or "complete_stream"): its messages, in
        lists of those that arrived together, then the end; a failure raises the SageError
        the scheduler raised (after the messages before it)."""
        for _ in range(2):  # a second time only when the first was never started
            if not self.supported:
                async for item in self._stream_call(kind, message, timeout_s):
                    yield [item]
                return
            try:
                async with contextlib.aclosing(self._stream_once(kind, message, timeout_s)) as once:
                    async for ready in once:
                        yield ready
                return
            except (_Unsupported, _NotStarted):
                continue
        raise ServiceUnavailableError("the scheduler is shutting down")

    async def _stream_once(
        self, kind: str, message: Any, timeout_s: float
    ) -> AsyncGenerator[list[Any], None]:
        """One try on the open call; it raises _Unsupported or _NotStarted only while no
        message of the request has arrived (so it may be sent again)."""
        session = self._open()
        request = self._checked(self._request(kind, message, timeout_s))
        chunks = _Chunks(STREAM_BACKLOG_BYTES)
        session.pending[request.id] = chunks
        deadline = asyncio.get_running_loop().call_later(
            timeout_s,
            chunks.fail,
            DeadlineExceededError(f"the stream did not finish within {timeout_s:g} s"),
        )
        try:
            session.send(request)
            while True:
                ready: list[Any] = []
                for item in await chunks.take():
                    if item is _END:
                        if ready:
                            yield ready
                        return
                    if isinstance(item, BaseException):
                        if ready:
                            yield ready
                        if isinstance(item, _Unsupported | _NotStarted) and chunks.started:
                            raise ServiceUnavailableError("the scheduler is shutting down")
                        raise item
                    ready.append(item)
                yield ready
        finally:
            deadline.cancel()
            if session.pending.pop(request.id, None) is not None:
                self._cancel(session, request.id)

    async def _stream_call(self, kind: str, message: Any, timeout_s: float) -> AsyncIterator[Any]:
        call = getattr(self.stub, _RPC_WITHOUT_MULTIPLEX[kind])(
            message, timeout=timeout_s, metadata=call_metadata()
        )
        try:
            async for item in call:
                yield item
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    async def aclose(self) -> None:
        """End the open call; requests still waiting fail as the edge shuts down."""
        session = self._session
        if session is not None and session.reader is not None:
            session.call.cancel()
            session.writer.cancel()
            session.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await session.reader
