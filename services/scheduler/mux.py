"""Serving Multiplex calls: many requests over one long-lived stream, one task each.

A unary call in grpc-python costs the server ~0.35 ms of CPU and the round trip ~0.5 ms on
a small host; a message on an open stream costs about half that (bench/RESULTS.md). The edge
therefore sends its chat and completion requests as tagged messages on one Multiplex call.
Each request still gets what a unary call gets: its own task, request id and span, a
deadline, a cancel, and its SageError mapped to a status (the same trailers).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from sage.common.exceptions import (
    DeadlineExceededError,
    InternalError,
    InvalidRequestError,
    SageError,
)
from sage.common.grpc.server import (
    MAX_MESSAGE_BYTES,
    enter_request,
    error_trailers,
    exit_request,
    status_message,
)
from sage.common.grpc.status import DETAILS_KEY, status_details
from sage.rpc.scheduler.v1 import scheduler_pb2 as pb

log = logging.getLogger("sage.scheduler.mux")

# Replies ready at once share a message up to this size; one over MAX_MESSAGE_BYTES would
# fail the whole call (every request on it), so such a reply fails only its own request.
_BATCH_BYTES = 4 << 20
_MAX_REPLY_BYTES = MAX_MESSAGE_BYTES - (64 << 10)

_SERVICE = "/sage.rpc.scheduler.v1.SchedulerService/"


@dataclass(frozen=True)
class Route:
    """How one kind of request (a `call` field of MultiplexCall) runs: the servicer
    method, and the response field its reply (unary) or each message (streamed) goes into."""

    method: str
    reply_field: str
    streamed: bool
    handler: Callable[[Any, Any], Any]


def error_reply(request_id: int, exc: SageError) -> pb.MultiplexReply:
    """The reply that fails request `request_id` with `exc`: the trailers a unary call
    would end with, the google.rpc.Status base64-encoded as on the HTTP/2 wire (a map of
    strings holds no bytes) beside the legacy sage-error* ones."""
    message = status_message(exc)
    trailers = dict(error_trailers(exc))
    details = status_details(exc.grpc_code, message, exc)
    trailers[DETAILS_KEY] = base64.b64encode(details).decode("ascii")
    return pb.MultiplexReply(
        id=request_id,
        error=pb.MultiplexError(code=exc.grpc_code.value[0], message=message, trailers=trailers),
    )


class MultiplexSessions:
    """The server's open Multiplex calls; `drain` ends them all at shutdown, each after the
    requests it started have answered."""

    def __init__(self, routes: dict[str, Route], default_timeout_s: float) -> None:
        self.routes = routes
        self.default_timeout_s = default_timeout_s
        self._readers: set[asyncio.Task[None]] = set()
        self._sessions: set[asyncio.Event] = set()
        self.draining = False

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

    async def serve(
        self, requests: AsyncIterator[pb.MultiplexRequest]
    ) -> AsyncIterator[pb.MultiplexResponse]:
        """The response stream of one Multiplex call: every reply ready at once goes out as
        one message (while a message is being written, the next ones gather)."""
        out: asyncio.Queue[pb.MultiplexReply | None] = asyncio.Queue()
        tasks: dict[int, asyncio.Task[None]] = {}
        ended = asyncio.Event()
        malformed: list[Exception] = []
        reader = asyncio.create_task(self._read(requests, tasks, out, malformed))
        # A reader cancelled (drain) before its first step never runs its finally: end the
        # stream for it. It started nothing, so nothing is left unanswered.
        reader.add_done_callback(lambda task: out.put_nowait(None) if not tasks else None)
        self._readers.add(reader)
        self._sessions.add(ended)
        try:
            while (reply := await out.get()) is not None:
                replies = [reply]
                size = reply.ByteSize()
                while size < _BATCH_BYTES and not out.empty():
                    more = out.get_nowait()
                    if more is None:
                        yield pb.MultiplexResponse(replies=replies)
                        return
                    replies.append(more)
                    size += more.ByteSize()
                yield pb.MultiplexResponse(replies=replies)
            if malformed:  # after answering what came before it
                raise InvalidRequestError(
                    f"malformed MultiplexRequest message: {str(malformed[0])[:200]}"
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
        requests: AsyncIterator[pb.MultiplexRequest],
        tasks: dict[int, asyncio.Task[None]],
        out: asyncio.Queue[pb.MultiplexReply | None],
        malformed: list[Exception],
    ) -> None:
        try:
            async for request in requests:
                for call in request.calls:
                    self._start(call, tasks, out)
        except asyncio.CancelledError:
            pass  # drain (or the call ended): answer what was started, then end
        except Exception as exc:  # bytes that are not a MultiplexRequest: the call ends
            malformed.append(exc)
        finally:
            if tasks:
                await asyncio.wait(list(tasks.values()))
            out.put_nowait(None)

    def _start(
        self,
        request: pb.MultiplexCall,
        tasks: dict[int, asyncio.Task[None]],
        out: asyncio.Queue[pb.MultiplexReply | None],
    ) -> None:
        kind = request.WhichOneof("call")
        if kind == "cancel":
            # popped here: a task cancelled before it ever ran never reaches its finally
            task = tasks.pop(request.id, None)
            if task is not None:
                task.cancel()
            return
        route = self.routes.get(kind or "")
        if route is None:
            out.put_nowait(
                error_reply(
                    request.id, InvalidRequestError("a Multiplex request must name its call")
                )
            )
            return
        if request.id in tasks:
            out.put_nowait(
                error_reply(
                    request.id,
                    InvalidRequestError(
                        f"request id {request.id} is already open on this call", param="id"
                    ),
                )
            )
            return
        tasks[request.id] = asyncio.create_task(
            self._run(request, getattr(request, kind or ""), route, tasks, out)
        )

    async def _run(
        self,
        request: pb.MultiplexCall,
        call: Any,
        route: Route,
        tasks: dict[int, asyncio.Task[None]],
        out: asyncio.Queue[pb.MultiplexReply | None],
    ) -> None:
        method = _SERVICE + route.method
        context = enter_request(method, request.metadata)
        timeout = request.timeout_s if request.timeout_s > 0 else self.default_timeout_s
        try:
            try:
                async with asyncio.timeout(timeout):
                    if route.streamed:
                        async for message in route.handler(call, None):
                            out.put_nowait(
                                pb.MultiplexReply(id=request.id, **{route.reply_field: message})
                            )
                        out.put_nowait(pb.MultiplexReply(id=request.id, end=pb.MultiplexEnd()))
                    else:
                        reply = pb.MultiplexReply(
                            id=request.id, **{route.reply_field: await route.handler(call, None)}
                        )
                        size = reply.ByteSize()
                        if size > _MAX_REPLY_BYTES:
                            raise InvalidRequestError(
                                f"the reply ({size >> 20} MiB) is over the "
                                f"{_MAX_REPLY_BYTES >> 20} MiB message limit; ask for less "
                                "(e.g. fewer inputs per embedding request)"
                            )
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
            out.put_nowait(error_reply(request.id, exc))
        except Exception as exc:  # mapped to INTERNAL, never a crash of the call
            log.exception("unexpected error in rpc", extra={"method": method})
            error = InternalError(f"internal error in {method}: {type(exc).__name__}")
            out.put_nowait(error_reply(request.id, error))
        finally:
            if tasks.get(request.id) is asyncio.current_task():
                del tasks[request.id]
            exit_request(context)


def scheduler_routes(servicer: Any) -> dict[str, Route]:
    """Multiplex's request kinds → the SchedulerService methods that run them."""
    return {
        "chat": Route("Chat", "chat", False, servicer.Chat),
        "complete": Route("Complete", "complete", False, servicer.Complete),
        "embed": Route("Embed", "embed", False, servicer.Embed),
        "chat_stream": Route("ChatStream", "chat_chunk", True, servicer.ChatStream),
        "complete_stream": Route("CompleteStream", "complete_chunk", True, servicer.CompleteStream),
    }
