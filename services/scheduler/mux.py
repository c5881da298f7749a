"""Serving Multiplex calls: many requests over one long-lived stream, one task each.

A unary call in grpc-python costs the server ~0.35 ms of CPU and the round trip ~0.5 ms on
a small host; a message on an open stream costs about half that (bench/RESULTS.md). The edge
therefore sends its chat and completion requests as tagged messages on one Multiplex call.
Each request still gets what a unary call gets: its own task, request id and span, a
deadline, a cancel, and its SageError mapped to a status (the same trailers).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from sage.common.exceptions import SageError
from sage.common.grpc.tagged_server import TaggedServer, error_fields, fitting
from sage.rpc.scheduler.v1 import scheduler_pb2 as pb

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
    """The reply that fails request `request_id` with `exc` (tagged_server.error_fields)."""
    return pb.MultiplexReply(id=request_id, error=pb.MultiplexError(**error_fields(exc)))


class MultiplexSessions(TaggedServer[pb.MultiplexCall, pb.MultiplexReply]):
    """The server's open Multiplex calls (sage.common.grpc.tagged_server): each kind of
    request runs its SchedulerService method (`routes`)."""

    name: ClassVar[str] = "Multiplex"

    def __init__(self, routes: dict[str, Route], default_timeout_s: float) -> None:
        super().__init__(default_timeout_s)
        self.routes = routes

    def route(
        self, request: pb.MultiplexCall, kind: str
    ) -> tuple[str, AsyncIterator[pb.MultiplexReply]] | None:
        route = self.routes.get(kind)
        if route is None:
            return None
        return _SERVICE + route.method, self._replies(request.id, getattr(request, kind), route)

    @staticmethod
    async def _replies(
        request_id: int, call: Any, route: Route
    ) -> AsyncIterator[pb.MultiplexReply]:
        if route.streamed:
            async for message in route.handler(call, None):
                yield pb.MultiplexReply(id=request_id, **{route.reply_field: message})
            yield pb.MultiplexReply(id=request_id, end=pb.MultiplexEnd())
        else:
            reply = pb.MultiplexReply(
                id=request_id, **{route.reply_field: await route.handler(call, None)}
            )
            yield fitting(reply, "ask for less (e.g. fewer inputs per embedding request)")

    def response(self, replies: list[pb.MultiplexReply]) -> pb.MultiplexResponse:
        return pb.MultiplexResponse(replies=replies)

    def error_reply(self, request_id: int, exc: SageError) -> pb.MultiplexReply:
        return error_reply(request_id, exc)


def scheduler_routes(servicer: Any) -> dict[str, Route]:
    """Multiplex's request kinds → the SchedulerService methods that run them."""
    return {
        "chat": Route("Chat", "chat", False, servicer.Chat),
        "complete": Route("Complete", "complete", False, servicer.Complete),
        "embed": Route("Embed", "embed", False, servicer.Embed),
        "chat_stream": Route("ChatStream", "chat_chunk", True, servicer.ChatStream),
        "complete_stream": Route("CompleteStream", "complete_chunk", True, servicer.CompleteStream),
    }
