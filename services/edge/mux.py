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
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Final

import grpc

from sage.common.exceptions import DeadlineExceededError, InternalError, ServiceUnavailableError
from sage.common.grpc import call_metadata, from_rpc_error
from sage.common.grpc.client import error_from_status, request_metadata
from sage.rpc.scheduler.v1 import scheduler_pb2 as spb

if TYPE_CHECKING:
    from sage.rpc.scheduler.v1.scheduler_pb2_grpc import SchedulerServiceAsyncStub

log = logging.getLogger("sage.edge.mux")

_STATUS: Final = {code.value[0]: code for code in grpc.StatusCode}
# Multiplex request kind → the unary/streaming method used without Multiplex.
_METHODS: Final = {
    "chat": "Chat",
    "complete": "Complete",
    "embed": "Embed",
    "chat_stream": "ChatStream",
    "complete_stream": "CompleteStream",
}
_REPLIES: Final = frozenset({"chat", "complete", "embed"})
_END: Final = object()


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

    def deliver(self, message: Any) -> None:
        if not self.future.done():
            self.future.set_result(message)

    def finish(self) -> None:
        self.fail(InternalError("the scheduler ended a non-streamed request without a reply"))

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class _Chunks:
    """A pending streamed request: messages, then the end or an error, in order; the
    consumer takes everything that arrived since it last looked (one HTTP write)."""

    __slots__ = ("items", "started", "waiter")

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.started = False
        self.waiter: asyncio.Future[None] | None = None

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def deliver(self, message: Any) -> None:
        self.started = True
        self.items.append(message)
        self._wake()

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
        return items


class _Session:
    """One open Multiplex call and the requests waiting on it."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.pending: dict[int, _Waiter | _Chunks] = {}
        self.error: BaseException | None = None  # set once the call is over
        self.reader: asyncio.Task[None] | None = None
        self.outbox: list[spb.MultiplexCall] = []
        self.writing = False  # one write at a time on the call
        self.messages_written = 0  # fewer than calls sent: batching under load
        self._flushers: set[asyncio.Task[None]] = set()

    async def send(self, call: spb.MultiplexCall) -> None:
        """Queue `call` and, unless a write is under way (which will take it), write every
        queued call as one message, then what gathered meanwhile. At one request at a time
        each message carries one call; under load the per-message cost of gRPC is shared.
        A failed write is reported by the reader, which sees the call end."""
        self.outbox.append(call)
        if not self.writing:
            await self._drain()

    async def _drain(self) -> None:
        self.writing = True
        try:
            while self.outbox and self.error is None:
                calls, self.outbox = self.outbox, []
                self.messages_written += 1
                await self.call.write(spb.MultiplexRequest(calls=calls))
        except (grpc.RpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
            pass
        finally:
            self.writing = False
            if self.outbox and self.error is None:  # the writer's task was cancelled
                flusher = asyncio.get_running_loop().create_task(self._drain())
                self._flushers.add(flusher)
                flusher.add_done_callback(self._flushers.discard)


class SchedulerMux:
    """Sends the edge's chat and completion requests over Multiplex (see module doc)."""

    def __init__(self, stub: SchedulerServiceAsyncStub) -> None:
        self.stub = stub
        self.supported = True
        self._session: _Session | None = None
        self._ids = itertools.count(1)
        self._background: set[asyncio.Task[None]] = set()

    def _open(self) -> _Session:
        session = self._session
        if session is None:
            session = _Session(self.stub.Multiplex(None))  # type: ignore[arg-type]
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
        finally:
            session.error = error
            if self._session is session:
                self._session = None
            pending, session.pending = session.pending, {}
            for entry in pending.values():
                entry.fail(error)

    @staticmethod
    def _dispatch(session: _Session, reply: spb.MultiplexReply) -> None:
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
        elif kind is not None:
            entry.deliver(getattr(reply, kind))

    def _request(self, kind: str, message: Any, timeout_s: float) -> spb.MultiplexCall:
        request = spb.MultiplexCall(
            id=next(self._ids), timeout_s=timeout_s, metadata=request_metadata()
        )
        getattr(request, kind).CopyFrom(message)
        return request

    def _cancel(self, session: _Session, request_id: int) -> None:
        """Tell the scheduler to stop `request_id` (its client went away or timed out)."""
        if session.error is not None:
            return
        task = asyncio.create_task(
            session.send(spb.MultiplexCall(id=request_id, cancel=spb.MultiplexCancel()))
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def unary(self, kind: str, message: Any, timeout_s: float) -> Any:
        """Run one non-streamed request ("chat", "complete" or "embed"); its reply message, or the
        SageError the scheduler raised."""
        for _ in range(2):  # a second time only when the first was never started
            if not self.supported:
                return await self._unary_call(kind, message, timeout_s)
            session = self._open()
            request = self._request(kind, message, timeout_s)
            waiter = _Waiter()
            session.pending[request.id] = waiter
            try:
                await session.send(request)
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
            return await getattr(self.stub, _METHODS[kind])(message, timeout=timeout_s)
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
            session = self._open()
            request = self._request(kind, message, timeout_s)
            chunks = _Chunks()
            session.pending[request.id] = chunks
            deadline = asyncio.get_running_loop().call_later(
                timeout_s,
                chunks.fail,
                DeadlineExceededError(f"the stream did not finish within {timeout_s:g} s"),
            )
            try:
                await session.send(request)
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
                            if isinstance(item, _Unsupported | _NotStarted) and not chunks.started:
                                break
                            if isinstance(item, _NotStarted):
                                raise ServiceUnavailableError("the scheduler is shutting down")
                            raise item
                        ready.append(item)
                    else:
                        yield ready
                        continue
                    break  # never started: send it again (or by unary calls)
            finally:
                deadline.cancel()
                if session.pending.pop(request.id, None) is not None:
                    self._cancel(session, request.id)
        raise ServiceUnavailableError("the scheduler is shutting down")

    async def _stream_call(self, kind: str, message: Any, timeout_s: float) -> AsyncIterator[Any]:
        call = getattr(self.stub, _METHODS[kind])(
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
            session.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await session.reader
