"""The edge's HTTP routes: OpenAI JSON in, gRPC to the scheduler, OpenAI JSON/SSE out.

It parses each body once (to validate and find the model) and forwards the raw bytes;
engine replies come back as raw bytes and are written out unchanged.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import orjson

from sage.common.config.settings import SageSettings
from sage.common.exceptions import SageError, ServiceUnavailableError
from sage.common.grpc import create_channel, from_rpc_error, rpc_errors_as_sage
from sage.common.grpc.engine_enums import kind_name
from sage.common.http import (
    App,
    Handler,
    JSONResponse,
    Request,
    Response,
    StreamingResponse,
    sse_event,
)
from sage.rpc.gpu_manager.v1 import gpu_manager_pb2_grpc
from sage.rpc.lifecycle.v1 import lifecycle_pb2_grpc
from sage.rpc.scheduler.v1 import scheduler_pb2 as spb
from sage.rpc.scheduler.v1 import scheduler_pb2_grpc as spb_grpc

if TYPE_CHECKING:
    from sage.rpc.gpu_manager.v1.gpu_manager_pb2_grpc import GpuManagerServiceAsyncStub
    from sage.rpc.lifecycle.v1.lifecycle_pb2_grpc import LifecycleServiceAsyncStub
    from sage.rpc.scheduler.v1.scheduler_pb2_grpc import SchedulerServiceAsyncStub

from .management import add_management_routes
from .validation import (
    ParsedRequest,
    parse_json_object,
    validate_chat,
    validate_completion,
    validate_embeddings,
)

DONE = b"data: [DONE]\n\n"


@dataclass
class Upstreams:
    """gRPC stubs the edge calls; channels are opened on the server's own event loop."""

    scheduler: SchedulerServiceAsyncStub
    lifecycle: LifecycleServiceAsyncStub
    gpu: GpuManagerServiceAsyncStub
    channels: tuple[grpc.aio.Channel, ...]

    async def close(self) -> None:
        """Close every channel."""
        for channel in self.channels:
            await channel.close(None)


def open_upstreams(settings: SageSettings) -> Upstreams:
    """Channels to the scheduler, lifecycle and gpu_manager from settings."""
    sched = create_channel(settings.address("scheduler"), default_timeout=settings.rpc_timeout_s)
    life = create_channel(settings.address("lifecycle"), default_timeout=settings.rpc_timeout_s)
    gpu = create_channel(settings.address("gpu_manager"), default_timeout=settings.rpc_timeout_s)
    return Upstreams(
        spb_grpc.SchedulerServiceStub(sched),
        lifecycle_pb2_grpc.LifecycleServiceStub(life),
        gpu_manager_pb2_grpc.GpuManagerServiceStub(gpu),
        (sched, life, gpu),
    )


async def _stream_sse(call: Any) -> StreamingResponse:
    """SSE from a server-streaming call; errors before the first chunk become HTTP errors."""
    iterator = call.__aiter__()
    try:
        first = await iterator.__anext__()
    except StopAsyncIteration:
        first = None
    except grpc.RpcError as err:
        raise from_rpc_error(err) from None

    async def chunks() -> AsyncIterator[bytes]:
        try:
            if first is not None:
                yield sse_event(first.data)
            async for message in iterator:
                yield sse_event(message.data)
            yield DONE
        except grpc.RpcError as err:
            # Headers are gone; vLLM's convention is an error event, then [DONE].
            yield sse_event(orjson.dumps(from_rpc_error(err).to_openai()))
            yield DONE
        finally:
            call.cancel()

    return StreamingResponse(chunks())


def _pack(vector: Any, encoding: str) -> Any:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return list(vector)


def create_app(settings: SageSettings) -> App:
    """The edge ASGI app; gRPC channels open at startup and close at shutdown."""
    holder: dict[str, Upstreams] = {}
    timeout = settings.request_timeout_s

    async def startup() -> None:
        holder["up"] = open_upstreams(settings)

    async def shutdown() -> None:
        up = holder.pop("up", None)
        if up is not None:
            await up.close()

    app = App(max_body_bytes=settings.max_body_bytes, on_startup=startup, on_shutdown=shutdown)

    def up() -> Upstreams:
        try:
            return holder["up"]
        except KeyError:
            raise ServiceUnavailableError("the edge is starting") from None

    def generation(
        validate: Callable[[dict[str, Any]], ParsedRequest],
        unary: str,
        unary_msg: Any,
        stream: str,
        stream_msg: Any,
    ) -> Handler:
        """A chat/completion route: validate once, forward the raw body, relay raw bytes."""

        async def handle(request: Request) -> Response | StreamingResponse:
            body = await request.body()
            parsed = validate(parse_json_object(body))
            scheduler = up().scheduler
            if parsed.stream:
                call = getattr(scheduler, stream)(
                    stream_msg(model=parsed.model, body=body), timeout=timeout
                )
                return await _stream_sse(call)
            with rpc_errors_as_sage():
                reply = await getattr(scheduler, unary)(
                    unary_msg(model=parsed.model, body=body), timeout=timeout
                )
            return Response(reply.body)

        return handle

    app.add(
        "POST",
        "/v1/chat/completions",
        generation(validate_chat, "Chat", spb.ChatRequest, "ChatStream", spb.ChatStreamRequest),
    )
    app.add(
        "POST",
        "/v1/completions",
        generation(
            validate_completion,
            "Complete",
            spb.CompleteRequest,
            "CompleteStream",
            spb.CompleteStreamRequest,
        ),
    )

    @app.route("POST", "/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        model, inputs, dimensions, encoding = validate_embeddings(
            parse_json_object(await request.body())
        )
        with rpc_errors_as_sage():
            reply = await up().scheduler.Embed(
                spb.EmbedRequest(model=model, inputs=inputs, dimensions=dimensions),
                timeout=timeout,
            )
        return JSONResponse(
            {
                "object": "list",
                "model": model,
                "data": [
                    {
                        "object": "embedding",
                        "index": item.index,
                        "embedding": _pack(item.values, encoding),
                    }
                    for item in reply.data
                ],
                "usage": {
                    "prompt_tokens": reply.usage.prompt_tokens,
                    "total_tokens": reply.usage.total_tokens,
                },
            }
        )

    @app.route("GET", "/v1/models")
    async def models(request: Request) -> Response:
        with rpc_errors_as_sage():
            reply = await up().scheduler.ListModels(spb.ListModelsRequest())
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": m.id,
                        "object": "model",
                        "created": m.created,
                        "owned_by": "sage",
                        "kind": kind_name(m.kind, "llm"),
                        "ready_engines": m.ready_engines,
                        **({"root": m.alias_of} if m.alias_of else {}),
                    }
                    for m in reply.models
                ],
            }
        )

    @app.route("GET", "/health")
    async def health(request: Request) -> Response:
        try:
            status = await up().scheduler.GetStatus(spb.GetStatusRequest(), timeout=2.0)
        except (grpc.RpcError, SageError) as exc:
            detail = exc.details() if isinstance(exc, grpc.RpcError) else exc.message
            return JSONResponse({"status": "unavailable", "scheduler": str(detail)}, 503)
        return JSONResponse({"status": "ok", "engines_ready": status.engines_ready})

    add_management_routes(app, up, settings.admin_api_key, settings.rpc_timeout_s)

    return app
