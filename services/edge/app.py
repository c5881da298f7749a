"""The edge's HTTP routes: OpenAI JSON in, gRPC to the scheduler, OpenAI JSON/SSE out.

It parses each body once (to validate and find the model) and forwards the raw bytes;
engine replies come back as raw bytes and are written out unchanged. API keys are checked
here (one dict lookup); their tenant and limits travel to the scheduler, which enforces them.

Closed by default: /v1/management needs the admin key (none configured: 403), /metrics a
key whenever API keys exist, and requests a web page could send (foreign Host, another
site's Origin, a non-JSON POST) are refused before routing (sage.common.http.guard).
The operators' page at /dashboard is static and keyless (dashboard_routes.py); its data
comes from the admin-keyed management routes.
A non-streamed request whose client disconnects is cancelled up to the engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import orjson

from sage.common.config.settings import SageSettings
from sage.common.exceptions import InvalidRequestError, SageError, ServiceUnavailableError
from sage.common.float32 import openai_embedding
from sage.common.grpc import create_channel, rpc_errors_as_sage
from sage.common.grpc.engine_enums import kind_name
from sage.common.http import (
    App,
    BrowserGuard,
    CorsPolicy,
    Handler,
    JSONResponse,
    Request,
    Response,
    StreamingResponse,
    sse_event,
)
from sage.common.security import resolve_admin_key
from sage.protocol.anthropic import AnthropicMessagesRequest, anthropic_error
from sage.protocol.management import Health
from sage.protocol.openai import (
    INT32_MAX,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    RerankRequest,
    ResponsesRequest,
    ScoreRequest,
    TokenizeRequest,
)
from sage.rpc.gpu_manager.v1 import gpu_manager_pb2_grpc
from sage.rpc.lifecycle.v1 import lifecycle_pb2_grpc
from sage.rpc.scheduler.v1 import scheduler_pb2 as spb

if TYPE_CHECKING:
    from sage.rpc.gpu_manager.v1.gpu_manager_pb2_grpc import GpuManagerServiceAsyncStub
    from sage.rpc.lifecycle.v1.lifecycle_pb2_grpc import LifecycleServiceAsyncStub
    from sage.rpc.scheduler.v1.scheduler_pb2_grpc import SchedulerServiceAsyncStub

from .auth import ApiKey, ApiKeyTable, InvalidApiKeyError, load_key_table
from .dashboard_routes import Sampler, add_dashboard_routes
from .fleet_metrics import fleet_metrics
from .management import AdminGate, NodeLifecycles, add_management_routes, reply
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import EdgeMetrics
from .openapi import openapi_document
from .replicas import SchedulerReplicas, any_replica, open_replicas, start_replicas
from .timeseries import TimeSeries
from .validation import read_request

DONE = b"data: [DONE]\n\n"
log = logging.getLogger("sage.edge")


@dataclass
class Upstreams:
    """gRPC stubs the edge calls; channels are opened on the server's own event loop."""

    # Calls any scheduler replica may answer: management and status (one replica while it
    # lives), and tokenize/rerank/score (`requests`: spread over the replicas).
    scheduler: SchedulerServiceAsyncStub
    lifecycle: LifecycleServiceAsyncStub
    gpu: GpuManagerServiceAsyncStub
    channels: tuple[grpc.aio.Channel, ...]
    # Chat, completions and embeddings go over one Multiplex call per scheduler replica
    # (mux.py), not a call each, and move off a replica that dies (replicas.py).
    generation: SchedulerReplicas
    requests: SchedulerServiceAsyncStub

    async def close(self) -> None:
        """Close every channel."""
        await self.generation.close()
        for channel in self.channels:
            await channel.close(None)


def open_upstreams(settings: SageSettings) -> Upstreams:
    """Channels to the scheduler replicas, lifecycle and gpu_manager from settings (the
    replicas are learned by start_replicas)."""
    life = create_channel(settings.address("lifecycle"), default_timeout=settings.rpc_timeout_s)
    gpu = create_channel(settings.address("gpu_manager"), default_timeout=settings.rpc_timeout_s)
    replicas = open_replicas(settings)
    return Upstreams(
        any_replica(replicas),
        lifecycle_pb2_grpc.LifecycleServiceStub(life),
        gpu_manager_pb2_grpc.GpuManagerServiceStub(gpu),
        (life, gpu),
        replicas,
        any_replica(replicas, spread=True),
    )


def _events(messages: list[Any]) -> bytes:
    """The SSE events of stream messages that arrived together: each one's `data`, then
    any chunks the scheduler coalesced into it (`more`)."""
    return b"".join(
        sse_event(m.data) + b"".join(sse_event(chunk) for chunk in m.more)
        if m.more
        else sse_event(m.data)
        for m in messages
    )


def _named_events(messages: list[Any]) -> bytes:
    """The Responses API's SSE: each event named by its payload's `type` (the scheduler
    relays only `data`), as OpenAI and vLLM send them."""
    out = bytearray()
    for m in messages:
        for data in (m.data, *m.more):
            try:
                kind = orjson.loads(data).get("type")
            except (orjson.JSONDecodeError, AttributeError):
                kind = None
            if isinstance(kind, str) and kind.isprintable():
                out += b"event: " + kind.encode() + b"\n"
            out += sse_event(data)
    return bytes(out)


def _responses_error(exc: SageError) -> dict[str, Any]:
    """A mid-stream failure as the payload of the Responses API's `error` event."""
    detail = exc.to_openai()["error"]
    return {"type": "error", **{key: detail.get(key) for key in ("code", "message", "param")}}


def _messages_error(exc: SageError) -> dict[str, Any]:
    """A mid-stream failure as the payload of Anthropic's `error` event."""
    return anthropic_error(exc)[1]


async def _stream_sse(
    messages: AsyncIterator[list[Any]],
    on_first: Callable[[], None] | None = None,
    error_payload: Callable[[SageError], dict[str, Any]] | None = None,
) -> StreamingResponse:
    """SSE from a stream of scheduler messages (in lists that arrived together: one HTTP
    write each); errors before the first chunk become HTTP errors, later ones an error
    event. Without `error_payload` (chat, completions): OpenAI's unnamed error event and
    [DONE], as vLLM sends them. With it (the Responses and Messages APIs): named events,
    and a failure is an `event: error` carrying that API's payload, with no [DONE]."""
    events = _named_events if error_payload else _events
    try:
        first = await messages.__anext__()
    except StopAsyncIteration:
        first = None
    if on_first is not None and first is not None:
        on_first()

    async def chunks() -> AsyncIterator[bytes]:
        try:
            if first is not None:
                yield events(first)
            async for message in messages:
                yield events(message)  # one HTTP write per batch, however many chunks
            if error_payload is None:
                yield DONE
        except SageError as exc:
            # Headers are gone, so the failure travels as the stream's last event.
            if error_payload is None:
                yield sse_event(orjson.dumps(exc.to_openai())) + DONE
            else:
                yield b"event: error\n" + sse_event(orjson.dumps(error_payload(exc)))
        finally:
            await messages.aclose()  # type: ignore[attr-defined]

    return StreamingResponse(chunks())


def request_options(key: ApiKey) -> spb.RequestOptions:
    """The caller's key: the scheduler resolves the tenant and its limits from it in its own
    key table and estimates the request's tokens from its body, so a direct gRPC caller
    gets the same tenant, limits and cost as one through the edge."""
    return spb.RequestOptions(api_key=key.key)


def with_scheduling_hints(
    options: spb.RequestOptions | None, headers: dict[str, str]
) -> spb.RequestOptions | None:
    """Priority class and SLO targets from `x-sage-priority`, `x-sage-slo-ttft-ms` and
    `x-sage-slo-e2e-ms`, the session-affinity key from `x-session-id`; the scheduler
    validates the priority value."""
    priority = headers.get("x-sage-priority")
    ttft = headers.get("x-sage-slo-ttft-ms")
    e2e = headers.get("x-sage-slo-e2e-ms")
    session = headers.get("x-session-id")
    if priority is None and ttft is None and e2e is None and session is None:
        return options
    options = options or spb.RequestOptions()
    if priority is not None:
        options.priority = priority
    if session is not None:
        if len(session) > 256:
            raise InvalidRequestError(
                "x-session-id must be at most 256 characters", param="x-session-id"
            )
        options.session_key = session
    for name, value, field in (
        ("x-sage-slo-ttft-ms", ttft, "slo_ttft_ms"),
        ("x-sage-slo-e2e-ms", e2e, "slo_e2e_ms"),
    ):
        if value is None:
            continue
        # isascii: str.isdigit() also accepts "²", which int() rejects.
        if not (value.isascii() and value.isdigit()) or int(value) > INT32_MAX:
            raise InvalidRequestError(
                f"{name} must be a whole number of milliseconds, got {value!r}", param=name
            )
        setattr(options, field, int(value))
    return options


def create_app(
    settings: SageSettings, api_keys: ApiKeyTable | None = None, *, bind_host: str | None = None
) -> App:
    """The edge ASGI app; gRPC channels open at startup and close at shutdown.

    `api_keys` defaults to the keys named by settings (SAGE_API_KEYS, SAGE_API_KEYS_FILE).
    The admin key is resolved once, here (SAGE_ADMIN_API_KEY, else the admin key file).
    `bind_host` (default SAGE_HOST) is accepted as a Host header name besides loopback
    names, IP literals and SAGE_ALLOWED_HOSTS.
    """
    holder: dict[str, Upstreams] = {}
    timeout = settings.request_timeout_s
    keys = (
        api_keys
        if api_keys is not None
        else load_key_table(settings.auth.api_keys, settings.auth.api_keys_file)
    )
    docs = orjson.dumps(openapi_document())
    admin_key = resolve_admin_key(settings)
    admin = AdminGate(admin_key)
    metrics_auth = (
        settings.auth.metrics_require_auth
        if settings.auth.metrics_require_auth is not None
        else keys.enabled
    )
    cors = CorsPolicy.parse(settings.edge.cors_origins)
    guard = BrowserGuard.build(settings.edge.allowed_hosts, (settings.host, bind_host or ""), cors)
    # The dashboard's chart history, sampled from the scheduler while the edge runs.
    series = TimeSeries()
    sampler = Sampler(series, lambda: up().scheduler)

    async def startup() -> None:
        upstreams = holder["up"] = open_upstreams(settings)
        await start_replicas(upstreams.generation, settings)
        sampler.start()
        # One line an operator can check the posture by; never the keys themselves.
        log.info(
            "edge auth",
            extra={
                "api_keys": len(keys),
                "admin_key": ("env" if settings.admin_api_key else "file" if admin_key else "none"),
                "management": "admin key" if admin_key else "closed (no admin key)",
                "metrics_auth": "on" if metrics_auth else "off",
                "allowed_hosts": "*" if guard.any_host else ",".join(sorted(guard.allowed_hosts)),
            },
        )

    async def shutdown() -> None:
        await sampler.stop()
        up = holder.pop("up", None)
        if up is not None:
            await up.close()

    metrics = EdgeMetrics()
    app = App(
        max_body_bytes=settings.edge.max_body_bytes,
        on_startup=startup,
        on_shutdown=shutdown,
        observer=metrics.observe_request,
        cors=cors,
        guard=guard,
    )
    metrics.in_flight_gauge(lambda: app.in_flight)

    def replica_counts() -> tuple[dict[str, int], dict[str, int]] | None:
        upstreams = holder.get("up")
        if upstreams is None:
            return None
        return upstreams.generation.states(), upstreams.generation.failovers

    metrics.replicas_gauges(replica_counts)

    def up() -> Upstreams:
        try:
            return holder["up"]
        except KeyError:
            raise ServiceUnavailableError("the edge is starting") from None

    def generation(
        protocol: type[
            ChatCompletionRequest | CompletionRequest | ResponsesRequest | AnthropicMessagesRequest
        ],
        unary: str,
        unary_msg: Any,
        stream: str,
        stream_msg: Any,
        api: int = spb.CHAT_API_UNSPECIFIED,
    ) -> Handler:
        """A chat/completion route: validate once, forward the raw body, relay raw bytes.
        `api`: which chat API (and engine route) a chat-kind request speaks."""
        error_payloads: dict[int, Callable[[SageError], dict[str, Any]]] = {
            spb.CHAT_API_RESPONSES: _responses_error,
            spb.CHAT_API_MESSAGES: _messages_error,
        }
        error_payload = error_payloads.get(api)
        extra = {"api": api} if api else {}

        async def handle(request: Request) -> Response | StreamingResponse:
            key = keys.authenticate(request.headers)
            body = await request.body()
            parsed = read_request(request, body, protocol)
            model = parsed.model
            options = None if key is None else request_options(key)
            options = with_scheduling_hints(options, request.headers)
            scheduler = up().generation
            if parsed.streaming:
                started = time.perf_counter()
                messages = scheduler.stream(
                    stream,
                    stream_msg(model=model, body=body, options=options, coalesce=True, **extra),
                    timeout,
                )
                return await _stream_sse(
                    messages,
                    lambda: metrics.observe_ttft(model, time.perf_counter() - started),
                    error_payload,
                )
            # A client that leaves cancels the request: the scheduler and the engine stop.
            message = unary_msg(model=model, body=body, options=options, **extra)
            reply = await request.unless_disconnected(scheduler.unary(unary, message, timeout))
            return Response(reply.body)

        return handle

    app.add(
        "POST",
        "/v1/chat/completions",
        generation(
            ChatCompletionRequest, "chat", spb.ChatRequest, "chat_stream", spb.ChatStreamRequest
        ),
    )
    app.add(
        "POST",
        "/v1/completions",
        generation(
            CompletionRequest,
            "complete",
            spb.CompleteRequest,
            "complete_stream",
            spb.CompleteStreamRequest,
        ),
    )

    app.add(
        "POST",
        "/v1/responses",
        generation(
            ResponsesRequest,
            "chat",
            spb.ChatRequest,
            "chat_stream",
            spb.ChatStreamRequest,
            spb.CHAT_API_RESPONSES,
        ),
    )

    messages_route = generation(
        AnthropicMessagesRequest,
        "chat",
        spb.ChatRequest,
        "chat_stream",
        spb.ChatStreamRequest,
        spb.CHAT_API_MESSAGES,
    )

    async def anthropic_messages(request: Request) -> Response | StreamingResponse:
        """POST /v1/messages (Anthropic's Messages API), on chat's path: Anthropic's SDKs
        send the key as `x-api-key`, and read errors in Anthropic's shape."""
        headers = request.headers
        if "authorization" not in headers and "x-api-key" in headers:
            headers["authorization"] = "Bearer " + headers["x-api-key"]
        try:
            return await messages_route(request)
        except SageError as exc:
            status, body = anthropic_error(exc)
            return JSONResponse(body, status)

    app.add("POST", "/v1/messages", anthropic_messages)

    @app.route("POST", "/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        key = keys.authenticate(request.headers)
        parsed = read_request(request, await request.body(), EmbeddingRequest)
        model, inputs, encoding = parsed.model, parsed.inputs, parsed.encoding_format or "float"
        dimensions = parsed.dimensions or 0
        options = None if key is None else request_options(key)
        reply = await request.unless_disconnected(
            up().generation.unary(
                "embed",
                spb.EmbedRequest(
                    model=model,
                    inputs=inputs,
                    dimensions=dimensions,
                    options=options,
                    packed_vectors=True,
                ),
                timeout,
            )
        )
        return JSONResponse(
            {
                "object": "list",
                "model": model,
                "data": [
                    {
                        "object": "embedding",
                        "index": item.index,
                        "embedding": openai_embedding(item.packed_values, item.values, encoding),
                    }
                    for item in reply.data
                ],
                "usage": {
                    "prompt_tokens": reply.usage.prompt_tokens,
                    "total_tokens": reply.usage.total_tokens,
                },
            }
        )

    def tokenization(
        protocol: type[TokenizeRequest | DetokenizeRequest | RerankRequest | ScoreRequest],
        rpc: str,
        message: Any,
    ) -> Handler:
        """/tokenize, /detokenize, /rerank, /score (vLLM's paths): validated here, run on an
        engine of the model by the scheduler (a unary call: off the hot path), reply relayed."""

        async def handle(request: Request) -> Response:
            key = keys.authenticate(request.headers)
            body = await request.body()
            model = read_request(request, body, protocol).model
            options = None if key is None else request_options(key)
            with rpc_errors_as_sage():
                reply = await request.unless_disconnected(
                    getattr(up().requests, rpc)(
                        message(model=model, body=body, options=options), timeout=timeout
                    )
                )
            return Response(reply.body)

        return handle

    app.add("POST", "/tokenize", tokenization(TokenizeRequest, "Tokenize", spb.TokenizeRequest))
    app.add(
        "POST", "/detokenize", tokenization(DetokenizeRequest, "Detokenize", spb.DetokenizeRequest)
    )
    # Cross-encoders, served as embedding-kind engines; vLLM answers both paths of each.
    rerank = tokenization(RerankRequest, "Rerank", spb.RerankRequest)
    score = tokenization(ScoreRequest, "Score", spb.ScoreRequest)
    for path, handler in (
        ("/v1/rerank", rerank),
        ("/rerank", rerank),
        ("/score", score),
        ("/v1/score", score),
    ):
        app.add("POST", path, handler)

    @app.route("GET", "/v1/models")
    async def models(request: Request) -> Response:
        keys.authenticate(request.headers)
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
                        # a LoRA adapter names its base model, as vLLM's /v1/models does
                        **({"parent": m.parent} if m.parent else {}),
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
            return reply(Health(status="unavailable", scheduler=str(detail)), 503)
        return reply(Health(status="ok", engines_ready=status.engines_ready))

    # Engine states, restarts and GPU headroom of every node, for the same scrape.
    fleet_lifecycles = NodeLifecycles(up, 1.0)

    @app.route("GET", "/metrics")
    async def prometheus(request: Request) -> Response:
        # Tenants, models and engines show in the metrics: behind a key whenever keys exist.
        headers = request.headers
        if metrics_auth and keys.lookup(headers) is None and not admin.matches(headers):
            raise InvalidApiKeyError(
                "an API key (or the admin key) is required for /metrics: "
                "Authorization: Bearer <key>"
            )
        text = metrics.render()
        fleet = asyncio.ensure_future(fleet_metrics(fleet_lifecycles))
        try:  # best effort: the edge's own metrics come back even if the scheduler is down
            reply = await up().scheduler.GetMetrics(spb.GetMetricsRequest(), timeout=1.0)
            text += reply.prometheus_text
        except (grpc.RpcError, SageError):
            pass
        text += await fleet
        return Response(text, content_type=METRICS_CONTENT_TYPE)

    @app.route("GET", "/openapi.json")
    async def openapi(request: Request) -> Response:
        return Response(docs)

    add_management_routes(app, up, admin, settings.rpc_timeout_s)
    add_dashboard_routes(app, admin, series)

    return app
