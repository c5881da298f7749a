"""The serving side of a long-lived call that carries many tagged requests (the scheduler's
Multiplex, the embedding service's EmbedStream); the caller's side is tagged.py.

A unary call in grpc-python costs the server ~0.35 ms of CPU; a message on an open call
about half that, and replies ready at once leave as one message (bench/RESULTS.md). Each
request still gets what a unary call gets: its own task, request id and span, a deadline,
a cancel, and its SageError as the status (code, message, trailers) a unary call would end
with.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any, ClassVar, Final, Generic, Protocol, TypeVar

from sage.common.exceptions import (
    DeadlineExceededError,
    InternalError,
    InvalidRequestError,
    SageError,
)

from .server import MAX_MESSAGE_BYTES, enter_request, error_trailers, exit_request, status_message
from .status import DETAILS_KEY, status_details

log = logging.getLogger("sage.grpc.tagged")

# Replies ready at once share a message up to this size; one over MAX_MESSAGE_BYTES would
# fail the whole call (every request on it), so such a reply fails only its own request.
_BATCH_BYTES: Final = 4 << 20
MAX_REPLY_BYTES: Final = MAX_MESSAGE_BYTES - (64 << 10)


class TaggedRequest(Protocol):
    """A request on such a call: its id, deadline, metadata, and a `call` oneof (one kind
    of request, or `cancel`)."""

    @property
    def id(self) -> int: ...

    @property
    def timeout_s(self) -> float: ...

    @property
    def metadata(self) -> Any: ...

    def WhichOneof(self, oneof_group: Any) -> Any: ...


class TaggedReply(Protocol):
    """A reply on such a call."""

    def ByteSize(self) -> int: ...


C = TypeVar("C", bound=TaggedRequest)
R = TypeVar("R", bound=TaggedReply)


def error_fields(exc: SageError) -> dict[str, Any]:
    """The fields of the error reply that fails a request with `exc`: the trailers a unary
    call would end with, the google.rpc.Status base64-encoded as on the HTTP/2 wire (a map
    of strings holds no bytes) beside the legacy sage-error* ones."""
    message = status_message(exc)
    trailers = dict(error_trailers(exc))
    details = status_details(exc.grpc_code, message, exc)
    trailers[DETAILS_KEY] = base64.b64encode(details).decode("ascii")
    return {"code": exc.grpc_code.value[0], "message": message, "trailers": trailers}


def fitting(reply: R, advice: str, param: str | None = None) -> R:
    """`reply`, unless it is over one gRPC message (it would fail the whole call)."""
    size = reply.ByteSize()
    if size > MAX_REPLY_BYTES:
        raise InvalidRequestError(
            f"the reply ({size >> 20} MiB) is over the {MAX_REPLY_BYTES >> 20} MiB message "
            f"limit; {advice}",
            param=param,
        )
    return reply


_Out = asyncio.Queue[Any]  # replies, then None: the call's last message was queued


class TaggedServer(ABC, Generic[C, R]):
    """Serves such calls (`serve`, one per call); `drain` ends them all at shutdown, each
    after the requests it started have answered. Subclasses say what each kind of request
    runs (`route`) and how replies are packed (`response`, `error_reply`).
    """

    name: ClassVar[str]  # the call, for errors: "Multiplex"

    def __init__(self, default_timeout_s: float | None) -> None:
        self.default_timeout_s = default_timeout_s  # for requests without their own
        self._readers: set[asyncio.Task[None]] = set()
        self._sessions: set[asyncio.Event] = set()
        self.draining = False

    @abstractmethod
    def route(self, request: C, kind: str) -> tuple[str, AsyncIterator[R]] | None:
        """The method `request` is logged and traced as, and its replies in order (not yet
        started); None for a kind this call does not serve."""

    @abstractmethod
    def response(self, replies: list[R]) -> Any:
        """The response message carrying `replies`."""

    @abstractmethod
    def error_reply(self, request_id: int, exc: SageError) -> R:
        """The reply that fails request `request_id` with `exc` (see error_fields)."""

    async def drain(self, grace: float) -> None:
        """Stop reading new requests on every call and wait (up to `grace`) until each call
        has answered what it started and ended; new calls are refused meanwhile."""
        self.draining = True
        for reader in self._readers:
            reader.cancel()
        ended = [asyncio.ensure_future(done.wait()) for done in self._sessions]
        if ended:
            await asyncio.wait(ended, timeout=grace)
            for waiter in ended:
                waiter.cancel()

    async def serve(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """The response stream of one call: every reply ready at once goes out as one
        message (while a message is being written, the next ones gather). The call ends
        after the caller half-closes (or a drain) and every request has answered."""
        out: _Out = asyncio.Queue()
        tasks: dict[int, asyncio.Task[None]] = {}
        ended = asyncio.Event()
        malformed: list[Exception] = []
        reader = asyncio.create_task(self._read(requests, tasks, out, malformed))
        # A reader cancelled (drain) before its first step never runs its finally: end the
        # stream for it. It started nothing, so nothing is left unanswered.
        reader.add_done_callback(lambda task: out.put_nowait(None) if not tasks else None)
        self._readers.add(reader)
        self._sessions.add(ended)
        last = False
        try:
            while not last and (reply := await out.get()) is not None:
                replies = [reply]
                size = reply.ByteSize()
                while size < _BATCH_BYTES and not out.empty():
                    more = out.get_nowait()
                    if more is None:
                        last = True
                        break
                    replies.append(more)
                    size += more.ByteSize()
                yield self.response(replies)
            if malformed:  # after answering what came before it
                raise InvalidRequestError(
                    f"malformed {self.name}Request message: {str(malformed[0])[:200]}"
                )
        finally:
            reader.cancel()
            for task in list(tasks.values()):
                task.cancel()
            self._readers.discard(reader)
            self._sessions.discard(ended)
            ended.set()

    async def _read(
        self,
        requests: AsyncIterator[Any],
        tasks: dict[int, asyncio.Task[None]],
        out: _Out,
        malformed: list[Exception],
    ) -> None:
        try:
            async for message in requests:
                for request in message.calls:
                    self._start(request, tasks, out)
        except asyncio.CancelledError:
            pass  # drain (or the call ended): answer what was started, then end
        except Exception as exc:  # bytes that are not a request message: the call ends
            malformed.append(exc)
        finally:
            if tasks:
                await asyncio.wait(list(tasks.values()))
            out.put_nowait(None)

    def _start(self, request: C, tasks: dict[int, asyncio.Task[None]], out: _Out) -> None:
        kind = request.WhichOneof("call")
        if kind == "cancel":
            # popped here: a task cancelled before it ever ran never reaches its finally
            task = tasks.pop(request.id, None)
            if task is not None:
                task.cancel()
            return
        routed = self.route(request, kind) if kind else None
        if routed is None:
            error = InvalidRequestError(f"a {self.name} request must name its call")
            out.put_nowait(self.error_reply(request.id, error))
            return
        if request.id in tasks:
            error = InvalidRequestError(
                f"request id {request.id} is already open on this call", param="id"
            )
            out.put_nowait(self.error_reply(request.id, error))
            return
        method, replies = routed
        tasks[request.id] = asyncio.create_task(self._run(request, method, replies, tasks, out))

    async def _run(
        self,
        request: C,
        method: str,
        replies: AsyncIterator[R],
        tasks: dict[int, asyncio.Task[None]],
        out: _Out,
    ) -> None:
        context = enter_request(method, request.metadata)
        timeout = request.timeout_s if request.timeout_s > 0 else self.default_timeout_s
        try:
            try:
                async with asyncio.timeout(timeout):
                    async for reply in replies:
                        out.put_nowait(reply)
            except TimeoutError:
                raise DeadlineExceededError(
                    f"the request did not finish within its {timeout:g} s deadline"
                ) from None
        except SageError as exc:
            log.info(
                "rpc error",
                extra={"method": method, "error": type(exc).__name__, "detail": exc.message},
            )
            out.put_nowait(self.error_reply(request.id, exc))
        except Exception as exc:  # mapped to INTERNAL, never a crash of the call
            log.exception("unexpected error in rpc", extra={"method": method})
            error = InternalError(f"internal error in {method}: {type(exc).__name__}")
            out.put_nowait(self.error_reply(request.id, error))
        finally:
            if tasks.get(request.id) is asyncio.current_task():
                del tasks[request.id]
            exit_request(context)
