"""The caller's side of a long-lived call that carries many tagged requests (the edge's
Multiplex to the scheduler, the scheduler's EmbedStream to the embedding service).

A unary call in grpc-python costs ~0.25 ms of client CPU and more on the server; a message
on an open call a fraction of that, and calls queued while one message is being written go
out together in the next (bench/RESULTS.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import grpc


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
