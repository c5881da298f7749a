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
import weakref
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any, ClassVar, Final

import grpc

from sage.common.exceptions import (
    DeadlineExceededError,
    OverloadedError,
    ServiceUnavailableError,
)
from sage.common.grpc import call_metadata, from_rpc_error, token_metadata
from sage.common.grpc.client import request_metadata
from sage.common.grpc.tagged import Pending, TaggedCall, TaggedClient, Unsupported
from sage.rpc.scheduler.v1 import scheduler_pb2 as spb

if TYPE_CHECKING:
    from sage.rpc.scheduler.v1.scheduler_pb2_grpc import SchedulerServiceAsyncStub

# Multiplex request kind → the scheduler RPC that serves it on a call of its own, used when
# the scheduler has no Multiplex.
_RPC_WITHOUT_MULTIPLEX: Final = {
    "chat": "Chat",
    "complete": "Complete",
    "embed": "Embed",
    "chat_stream": "ChatStream",
    "complete_stream": "CompleteStream",
}
_END: Final = object()
# Unread bytes a streamed request may have waiting at the edge (its HTTP client is slow or
# gone) before it is stopped; a whole long generation is a few MiB of chunks.
STREAM_BACKLOG_BYTES: Final = 16 << 20


class _NotStarted(Exception):
    """The call ended (scheduler draining) before the scheduler read this request; it was
    never started, so it may be sent again."""


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
        """Queue `message`; past the unread limit the request fails instead (False: stop
        it upstream)."""
        self.started = True
        self.items.append(message)
        self.unread += message.ByteSize()
        if self.unread > self.limit:
            self.fail(
                OverloadedError(
                    f"the client read too slowly: over {self.limit >> 20} MiB of the "
                    "stream was waiting; stopped"
                )
            )
            return False
        self._wake()
        return True

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


class SchedulerMux(TaggedClient[spb.MultiplexCall]):
    """Sends the edge's chat, completion and embedding requests over Multiplex (see the
    module doc); the call itself is sage.common.grpc.tagged's."""

    rpc: ClassVar[str] = "Multiplex"
    caller: ClassVar[str] = "the edge"
    peer: ClassVar[str] = "the scheduler"
    fallback: ClassVar[str] = "unary calls"
    replies: ClassVar[frozenset[str]] = frozenset({"chat", "complete", "embed"})

    def __init__(self, stub: SchedulerServiceAsyncStub) -> None:
        super().__init__()
        self.stub = stub
        # The errors calls ended with (the scheduler died, drained or was unreachable), as
        # opposed to errors the scheduler answered a request with: see `lost`.
        self._call_errors: weakref.WeakSet[BaseException] = weakref.WeakSet()

    def lost(self, exc: BaseException) -> bool:
        """Whether `exc` (raised by `unary` or `stream`) is the end of the call the request
        was on rather than the scheduler's answer to it: another scheduler may take the
        request instead. The call is opened again on the next request."""
        return exc in self._call_errors

    def _shutting_down(self) -> ServiceUnavailableError:
        exc = ServiceUnavailableError("the scheduler is shutting down")
        self._call_errors.add(exc)
        return exc

    async def _read(self, session: TaggedCall[spb.MultiplexCall, Pending]) -> None:
        try:
            await super()._read(session)
        finally:
            # Before any waiter runs: the reader fails them in this same step.
            if session.error is not None and not isinstance(session.error, Unsupported):
                self._call_errors.add(session.error)

    def _call(self) -> Any:
        # The channel has no stream interceptor (hot path): the token goes here.
        return self.stub.Multiplex(None, metadata=token_metadata())  # type: ignore[arg-type]

    def _message(self, requests: list[spb.MultiplexCall]) -> spb.MultiplexRequest:
        return spb.MultiplexRequest(calls=requests)

    def _cancel_request(self, request_id: int) -> spb.MultiplexCall:
        return spb.MultiplexCall(id=request_id, cancel=spb.MultiplexCancel())

    def _ended(self) -> BaseException:
        return _NotStarted()  # ended with OK: the scheduler is draining

    def _request(self, kind: str, message: Any, timeout_s: float) -> spb.MultiplexCall:
        request = spb.MultiplexCall(
            id=next(self._ids), timeout_s=timeout_s, metadata=request_metadata()
        )
        getattr(request, kind).CopyFrom(message)
        return request

    async def unary(self, kind: str, message: Any, timeout_s: float) -> Any:
        """Run one non-streamed request ("chat", "complete" or "embed"); its reply message,
        or the SageError the scheduler raised."""
        for _ in range(2):  # a second time only when the first was never started
            if not self.supported:
                return await self._unary_call(kind, message, timeout_s)
            try:
                return await self._unary(self._request(kind, message, timeout_s), timeout_s)
            except (Unsupported, _NotStarted):
                continue
        raise self._shutting_down()

    async def _unary_call(self, kind: str, message: Any, timeout_s: float) -> Any:
        try:
            return await getattr(self.stub, _RPC_WITHOUT_MULTIPLEX[kind])(
                message, timeout=timeout_s
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    async def stream(
        self, kind: str, message: Any, timeout_s: float
    ) -> AsyncGenerator[list[Any], None]:
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
            except (Unsupported, _NotStarted):
                continue
        raise self._shutting_down()

    async def _stream_once(
        self, kind: str, message: Any, timeout_s: float
    ) -> AsyncGenerator[list[Any], None]:
        """One try on the open call; it raises Unsupported or _NotStarted only while no
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
                        if isinstance(item, Unsupported | _NotStarted) and chunks.started:
                            raise self._shutting_down()
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
