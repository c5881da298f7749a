"""The caller's side of a long-lived call that carries many tagged requests (the edge's
Multiplex to the scheduler, the scheduler's EmbedStream to the embedding service); the
serving side is tagged_server.py.

A unary call in grpc-python costs ~0.25 ms of client CPU and more on the server; a message
on an open call a fraction of that, and calls queued while one message is being written go
out together in the next (bench/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Final, Generic, Protocol, TypeVar

import grpc

from sage.common.exceptions import (
    DeadlineExceededError,
    InternalError,
    InvalidRequestError,
    ServiceUnavailableError,
)

from .client import error_from_status, from_rpc_error
from .server import MAX_MESSAGE_BYTES

log = logging.getLogger("sage.grpc.tagged")


class TaggedRequest(Protocol):
    """A request message on such a call: its id, and its size on the wire."""

    @property
    def id(self) -> int:
        """The caller's id for the request, unique among its open requests on the call."""
        ...

    def ByteSize(self) -> int:
        """Serialized size in bytes."""
        ...


R = TypeVar("R", bound=TaggedRequest)
P = TypeVar("P")


class TaggedCall(Generic[R, P]):
    """One open call, what waits on it (`pending`, by request id), and its writer task.

    Callers only queue requests; one task per call writes them (grpc-aio cancels the whole
    call when a task is cancelled inside `write`, so a caller that goes away must never be
    the one writing). Requests queued while a write is under way go out together, in
    messages of up to `batch_bytes` made by `message`: at one request at a time each message
    carries one, under load gRPC's per-message cost is shared. The caller's reader sets
    `error` once the call is over.
    """

    def __init__(self, call: Any, message: Callable[[list[R]], Any], batch_bytes: int) -> None:
        self.call = call
        self.pending: dict[int, P] = {}
        self.error: BaseException | None = None  # set once the call is over
        self.reader: asyncio.Task[None] | None = None
        self.outbox: list[R] = []
        self.messages_written = 0  # fewer than requests sent: batching under load
        self._message = message
        self._batch_bytes = batch_bytes
        self._wakeup: asyncio.Future[None] | None = None
        self.writer = asyncio.get_running_loop().create_task(self._write())

    def send(self, request: R) -> None:
        """Queue `request` for the writer; a failed write is reported by the reader, which
        sees the call end."""
        self.outbox.append(request)
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def unsend(self, request_id: int) -> bool:
        """Take request `request_id` back if it is still queued; True if it was."""
        for i, request in enumerate(self.outbox):
            if request.id == request_id:
                del self.outbox[i]
                return True
        return False

    async def _write(self) -> None:
        try:
            while self.error is None:
                if not self.outbox:
                    self._wakeup = asyncio.get_running_loop().create_future()
                    await self._wakeup
                    continue
                requests = self._batch()
                self.messages_written += 1
                await self.call.write(self._message(requests))
        except (grpc.RpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
            pass  # the call is over: the reader fails what is pending

    def _batch(self) -> list[R]:
        size = 0
        for n, request in enumerate(self.outbox):
            size += request.ByteSize()
            if size > self._batch_bytes and n:
                requests, self.outbox = self.outbox[:n], self.outbox[n:]
                return requests
        requests, self.outbox = self.outbox, []
        return requests


# Calls queued together share a message up to this size (one over the gRPC limit would fail
# the whole call, every request on it).
BATCH_BYTES: Final = 4 << 20
MAX_REQUEST_BYTES: Final = MAX_MESSAGE_BYTES - (64 << 10)
_STATUS: Final = {code.value[0]: code for code in grpc.StatusCode}


class Unsupported(Exception):
    """The peer has no such call: the caller uses its unary calls instead."""


class Pending(Protocol):
    """What waits on one request of the call."""

    def deliver(self, message: Any) -> bool:
        """Take one reply message; False when the waiter failed itself (its reader is too
        slow) and the request is to be stopped upstream."""
        ...

    def finish(self) -> None:
        """The request ended without an error."""
        ...

    def fail(self, exc: BaseException) -> None:
        """The request failed, or the call it was on did."""
        ...


class Waiter:
    """A pending request with one reply: the reply or an error."""

    __slots__ = ("future", "peer")

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def deliver(self, message: Any) -> bool:
        if not self.future.done():
            self.future.set_result(message)
        return True

    def finish(self) -> None:
        self.fail(InternalError(f"{self.peer} ended a non-streamed request without a reply"))

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class TaggedClient(ABC, Generic[R]):
    """The caller's end of such a call: opens it on first use and again after it ended,
    routes each reply to what waits on its request id (`Pending`), fails what is pending
    with the SageError the call ended with, takes back or cancels requests whose callers
    gave up. Subclasses name the call and say how it is opened and how messages are built.
    """

    rpc: ClassVar[str]  # the call, for logs: "Multiplex"
    caller: ClassVar[str]  # this side, for errors: "the edge"
    peer: ClassVar[str]  # the other side, for errors: "the scheduler"
    fallback: ClassVar[str]  # what serves requests when the peer lacks the call
    replies: ClassVar[frozenset[str]]  # reply kinds that end a request with its answer
    request_param: ClassVar[str | None] = None  # the field an oversized request blames

    def __init__(self) -> None:
        self.supported = True
        self._session: TaggedCall[R, Pending] | None = None
        self._ids = itertools.count(1)

    @abstractmethod
    def _call(self) -> Any:
        """Open the gRPC call (no deadline: each request on it has its own)."""

    @abstractmethod
    def _message(self, requests: list[R]) -> Any:
        """The request message carrying `requests`."""

    @abstractmethod
    def _cancel_request(self, request_id: int) -> R:
        """The request that cancels `request_id`."""

    def _ended(self) -> BaseException:
        """What pending requests fail with when the peer ends the call with OK."""
        return ServiceUnavailableError(f"{self.peer} ended the call")

    def _open(self) -> TaggedCall[R, Pending]:
        session = self._session
        if session is None:
            session = TaggedCall(self._call(), self._message, BATCH_BYTES)
            session.reader = asyncio.create_task(self._read(session))
            self._session = session
        return session

    async def _read(self, session: TaggedCall[R, Pending]) -> None:
        error = self._ended()
        try:
            async for response in session.call:
                for reply in response.replies:
                    self._dispatch(session, reply)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                log.info("%s has no %s; using %s", self.peer, self.rpc, self.fallback)
                self.supported = False
                error = Unsupported()
            else:
                error = from_rpc_error(exc)
        except asyncio.CancelledError:
            error = ServiceUnavailableError(f"{self.caller} is shutting down")
            raise
        except Exception as exc:  # a bug here: fail what is pending, never retry it
            log.exception("%s reader failed", self.rpc)
            # The caller gets no internals (the log line has them).
            error = InternalError(
                f"{self.caller} lost its call to {self.peer} ({type(exc).__name__})"
            )
        finally:
            session.error = error
            session.writer.cancel()
            if self._session is session:
                self._session = None
            pending, session.pending = session.pending, {}
            for entry in pending.values():
                entry.fail(error)

    def _dispatch(self, session: TaggedCall[R, Pending], reply: Any) -> None:
        entry = session.pending.get(reply.id)
        if entry is None:
            return  # its caller gave up (and sent a cancel)
        kind = reply.WhichOneof("result")
        if kind is None or kind in self.replies or kind in ("error", "end"):
            del session.pending[reply.id]
        if kind is None:
            entry.fail(InternalError(f"{self.peer} sent an empty reply"))
        elif kind in self.replies:
            entry.deliver(getattr(reply, kind))
        elif kind == "error":
            err = reply.error
            entry.fail(
                error_from_status(
                    _STATUS.get(err.code, grpc.StatusCode.UNKNOWN), err.message, dict(err.trailers)
                )
            )
        elif kind == "end":
            entry.finish()
        elif not entry.deliver(getattr(reply, kind)):  # its reader is too slow: stop it
            del session.pending[reply.id]
            self._cancel(session, reply.id)

    def _cancel(self, session: TaggedCall[R, Pending], request_id: int) -> None:
        """Stop `request_id` (its caller went away or timed out): taken back if still
        queued here, else a cancel is sent."""
        if session.error is None and not session.unsend(request_id):
            session.send(self._cancel_request(request_id))

    def _checked(self, request: R) -> R:
        """`request`, unless it is too large for one gRPC message (it would fail the call)."""
        size = request.ByteSize()
        if size > MAX_REQUEST_BYTES:
            raise InvalidRequestError(
                f"the request ({size >> 20} MiB) is over the {MAX_REQUEST_BYTES >> 20} MiB "
                f"message limit of {self.peer} hop",
                param=self.request_param,
            )
        return request

    async def _unary(self, request: R, timeout_s: float) -> Any:
        """Send `request` on the open call and wait for its one reply; Unsupported (or what
        `_ended` gives) when the peer never started it."""
        session = self._open()
        self._checked(request)
        waiter = Waiter(self.peer)
        session.pending[request.id] = waiter
        try:
            session.send(request)
            async with asyncio.timeout(timeout_s):
                return await waiter.future
        except TimeoutError:
            raise DeadlineExceededError(
                f"{self.peer} did not answer within {timeout_s:g} s"
            ) from None
        finally:
            if session.pending.pop(request.id, None) is not None:
                self._cancel(session, request.id)

    async def aclose(self) -> None:
        """End the open call; requests still waiting fail as this side shuts down."""
        session = self._session
        if session is not None and session.reader is not None:
            session.call.cancel()
            session.writer.cancel()
            session.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await session.reader
