"""gRPC transport of the scheduler: decode, call the domain, encode. No logic lives here."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from sage.common.apikeys import ApiKeyTable, load_key_table
from sage.common.config.settings import SageSettings
from sage.common.engine_keys import is_managed
from sage.common.exceptions import InvalidRequestError, NotFoundError, ServiceUnavailableError
from sage.common.float32 import packed_or_pack, unpack
from sage.common.grpc import (
    Registration,
    SageServer,
    create_channel,
    create_server,
    rpc_errors_as_sage,
)
from sage.common.grpc.engine_enums import (
    kind_name,
    kind_value,
    role_name,
    role_value,
    state_name,
    state_value,
)
from sage.rpc.common.v1 import common_pb2
from sage.rpc.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from sage.rpc.lifecycle.v1 import lifecycle_pb2, lifecycle_pb2_grpc
from sage.rpc.scheduler.v1 import scheduler_pb2 as pb
from sage.rpc.scheduler.v1 import scheduler_pb2_grpc as pb_grpc

from .admission import AdmissionController, parse_priority
from .autoscaler import Autoscaler, AutoscalerConfig, parse_autoscale
from .breaker import CircuitBreakers
from .coalesce import ready_runs
from .core import EmbedResult, Scheduler, TokenUsage
from .executor import HttpExecutionCoordinator
from .load import EngineLoadTracker
from .metrics import SchedulerMetrics
from .mux import MultiplexSessions, scheduler_routes
from .nodes import Node, NodeGpu, NodeReport, NodeState, NodeTable, parse_nodes
from .policies import QueuedRequest, RequestClass
from .ratelimit import TenantLimits, limits_for
from .rebuild import rebuild_from_lifecycle
from .registry import EngineKind, EngineRecord, EngineRegistry, EngineState
from .routing import create_router


def record_from_pb(engine: common_pb2.Engine) -> EngineRecord:
    """Engine message → domain record; unspecified kind is an error naming the field."""
    kind = EngineKind(kind_name(engine.kind, param="engine.kind"))
    return EngineRecord(
        engine_id=engine.engine_id,
        model=engine.model,
        kind=kind,
        base_url=engine.base_url,
        state=EngineState(state_name(engine.state, default="ready")),
        role=role_name(engine.role),
        backend=engine.backend,
        aliases=tuple(engine.aliases),
        port=engine.port,
        pid=engine.pid,
        node_id=engine.node_id,
        gpu_indexes=tuple(engine.gpu_indexes),
        labels=dict(engine.labels),
    )


def record_to_pb(record: EngineRecord) -> common_pb2.Engine:
    """Domain record → Engine message."""
    return common_pb2.Engine(
        engine_id=record.engine_id,
        model=record.model,
        kind=kind_value(record.kind),
        base_url=record.base_url,
        role=role_value(record.role),
        state=state_value(record.state),
        backend=record.backend,
        aliases=list(record.aliases),
        gpu_indexes=list(record.gpu_indexes),
        pid=record.pid,
        port=record.port,
        node_id=record.node_id,
        labels=record.labels,
    )


log = logging.getLogger("sage.scheduler")

_NODE_STATE_PB = {
    NodeState.READY: pb.NODE_STATE_READY,
    NodeState.UNHEALTHY: pb.NODE_STATE_UNHEALTHY,
    NodeState.DOWN: pb.NODE_STATE_DOWN,
}


def node_report_from_pb(report: common_pb2.NodeReport) -> NodeReport:
    """NodeReport message → domain report."""
    return NodeReport(
        node_id=report.node_id,
        lifecycle_addr=report.lifecycle_addr,
        advertise_host=report.advertise_host,
        gpu_count=report.gpu_count,
        gpus=tuple(
            NodeGpu(g.index, g.memory_total_bytes, g.memory_free_bytes, g.name) for g in report.gpus
        ),
        engine_ids=tuple(report.engine_ids),
        agent_instance=report.agent_instance,
    )


def node_to_pb(node: Node, table: NodeTable) -> pb.Node:
    """Domain node → Node message (with its age and engine count)."""
    report = node.report
    since = table.seconds_since_seen(node)
    return pb.Node(
        report=common_pb2.NodeReport(
            node_id=report.node_id,
            lifecycle_addr=report.lifecycle_addr,
            advertise_host=report.advertise_host,
            gpu_count=report.gpu_count,
            gpus=[
                common_pb2.NodeGpu(
                    index=g.index,
                    name=g.name,
                    memory_total_bytes=g.memory_total_bytes,
                    memory_free_bytes=g.memory_free_bytes,
                )
                for g in report.gpus
            ],
            engine_ids=list(report.engine_ids),
            agent_instance=report.agent_instance,
        ),
        state=_NODE_STATE_PB[node.state],
        reason=node.reason,
        last_seen_s_ago=since if since != float("inf") else -1.0,
        static=node.static,
        engines=table.engine_count(node.node_id),
    )


def _require_report(request: Any) -> NodeReport:
    if not request.HasField("report"):
        raise InvalidRequestError("report is required", param="report")
    return node_report_from_pb(request.report)


def _usage_pb(usage: TokenUsage) -> common_pb2.Usage:
    return common_pb2.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


def ticket_from_pb(
    request: Any, request_class: RequestClass, tenant: str = "default"
) -> QueuedRequest:
    """What the queueing policy orders by: tenant (resolved from the caller's key, see
    limits_from_pb), priority class, SLO deadline, cost."""
    now = time.monotonic()
    if not request.HasField("options"):
        return QueuedRequest(
            model=request.model,
            request_class=request_class,
            tenant=tenant,
            arrival=now,
            cost=len(request.body) / 4,
        )
    options: pb.RequestOptions = request.options
    if options.slo_e2e_ms < 0 or options.slo_ttft_ms < 0:
        raise InvalidRequestError("SLO targets must not be negative", param="slo_e2e_ms")
    slo_ms = options.slo_e2e_ms or options.slo_ttft_ms
    return QueuedRequest(
        model=request.model,
        request_class=request_class,
        tenant=tenant,
        priority=parse_priority(options.priority),
        arrival=now,
        deadline=now + slo_ms / 1000 if slo_ms else None,
        cost=float(options.estimated_tokens or len(request.body) / 4),
    )


def limits_from_pb(request: Any, keys: ApiKeyTable) -> TenantLimits:
    """The tenant and its limits for the key in the request's `options.api_key`, from the
    scheduler's own key table; the request's tenant and rate_limit_* fields are ignored."""
    options: pb.RequestOptions = request.options
    return limits_for(keys, options.api_key, options.estimated_tokens)


def _require_model(model: str) -> str:
    if not model:
        raise InvalidRequestError("model is required", param="model")
    return model


class GrpcEmbeddingBackend:
    """EmbeddingBackend that calls the embedding service's EmbedBatch."""

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float) -> None:
        self._stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        self._timeout_s = timeout_s

    async def embed_batch(
        self, model: str, inputs: Sequence[str], engines: Sequence[EngineRecord], dimensions: int
    ) -> EmbedResult:
        """One EmbedBatch call; errors come back as the SageError the service raised."""
        request = embedding_pb2.EmbedBatchRequest(
            model=model,
            inputs=list(inputs),
            engines=[
                embedding_pb2.EngineEndpoint(
                    engine_id=e.engine_id, base_url=e.base_url, managed=is_managed(e.backend)
                )
                for e in engines
            ],
            dimensions=dimensions,
            packed_vectors=True,
        )
        with rpc_errors_as_sage():
            reply = await self._stub.EmbedBatch(request, timeout=self._timeout_s)
        usage = reply.usage
        return EmbedResult(
            # An embedding service from before packed vectors fills only `values`.
            vectors=[packed_or_pack(v.packed_values, v.values) for v in reply.vectors],
            usage=TokenUsage(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens),
            engine_ids=list(reply.engine_ids),
        )


async def _messages(
    chunks: AsyncIterator[tuple[bytes, EngineRecord]], coalesce: bool
) -> AsyncIterator[tuple[str, bytes, list[bytes]]]:
    """(engine_id, data, more) per response message: one chunk each, or with `coalesce` the
    chunks that were ready together (split where failover changed the engine)."""
    if not coalesce:
        async for data, engine in chunks:
            yield engine.engine_id, data, []
        return
    async for run in ready_runs(chunks):
        start = 0
        for i in range(1, len(run) + 1):
            if i == len(run) or run[i][1].engine_id != run[start][1].engine_id:
                yield run[start][1].engine_id, run[start][0], [d for d, _ in run[start + 1 : i]]
                start = i


class SchedulerServicer(pb_grpc.SchedulerServiceServicer):
    """SchedulerService over the domain Scheduler."""

    def __init__(
        self,
        scheduler: Scheduler,
        policy_name: str,
        nodes: NodeTable | None = None,
        request_timeout_s: float = 600.0,
        api_keys: ApiKeyTable | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.policy_name = policy_name
        # Tenants and limits come from this table, not from requests (ratelimit.limits_for).
        self.api_keys = api_keys if api_keys is not None else ApiKeyTable()
        self.nodes = nodes or NodeTable(scheduler.registry, timeout_s=6.0)
        # Multiplex requests without their own timeout_s get the edge's request timeout.
        self.mux = MultiplexSessions(scheduler_routes(self), request_timeout_s)

    async def Chat(self, request: pb.ChatRequest, context: Any) -> pb.ChatResponse:
        limits = limits_from_pb(request, self.api_keys)
        result = await self.scheduler.unary(
            _require_model(request.model),
            request.body,
            "/v1/chat/completions",
            limits,
            ticket_from_pb(request, RequestClass.LLM_CHAT, limits.tenant),
            session_key=request.options.session_key,
        )
        return pb.ChatResponse(
            body=result.body, engine_id=result.engine.engine_id, usage=_usage_pb(result.usage)
        )

    async def ChatStream(
        self, request: pb.ChatStreamRequest, context: Any
    ) -> AsyncIterator[pb.ChatStreamResponse]:
        limits = limits_from_pb(request, self.api_keys)
        chunks = self.scheduler.stream(
            _require_model(request.model),
            request.body,
            "/v1/chat/completions",
            limits,
            ticket_from_pb(request, RequestClass.LLM_CHAT, limits.tenant),
            session_key=request.options.session_key,
        )
        async for engine_id, data, more in _messages(chunks, request.coalesce):
            yield pb.ChatStreamResponse(data=data, engine_id=engine_id, more=more)

    async def Complete(self, request: pb.CompleteRequest, context: Any) -> pb.CompleteResponse:
        limits = limits_from_pb(request, self.api_keys)
        result = await self.scheduler.unary(
            _require_model(request.model),
            request.body,
            "/v1/completions",
            limits,
            ticket_from_pb(request, RequestClass.LLM_GENERATE, limits.tenant),
            session_key=request.options.session_key,
        )
        return pb.CompleteResponse(
            body=result.body, engine_id=result.engine.engine_id, usage=_usage_pb(result.usage)
        )

    async def CompleteStream(
        self, request: pb.CompleteStreamRequest, context: Any
    ) -> AsyncIterator[pb.CompleteStreamResponse]:
        limits = limits_from_pb(request, self.api_keys)
        chunks = self.scheduler.stream(
            _require_model(request.model),
            request.body,
            "/v1/completions",
            limits,
            ticket_from_pb(request, RequestClass.LLM_GENERATE, limits.tenant),
            session_key=request.options.session_key,
        )
        async for engine_id, data, more in _messages(chunks, request.coalesce):
            yield pb.CompleteStreamResponse(data=data, engine_id=engine_id, more=more)

    async def Multiplex(
        self, request_iterator: AsyncIterator[pb.MultiplexRequest], context: Any
    ) -> AsyncIterator[pb.MultiplexResponse]:
        if self.mux.draining:
            raise ServiceUnavailableError("the scheduler is shutting down")
        async for message in self.mux.serve(request_iterator):
            yield message

    async def Embed(self, request: pb.EmbedRequest, context: Any) -> pb.EmbedResponse:
        limits = limits_from_pb(request, self.api_keys)
        if not request.inputs:
            raise InvalidRequestError("input must not be empty", param="input")
        if request.dimensions < 0:
            raise InvalidRequestError("dimensions must be positive", param="dimensions")
        result = await self.scheduler.embed(
            _require_model(request.model),
            list(request.inputs),
            request.dimensions,
            limits,
        )
        if request.packed_vectors:
            data = [pb.Embedding(index=i, packed_values=v) for i, v in enumerate(result.vectors)]
        else:  # a caller from before packed vectors (or any gRPC client) reads `values`
            data = [pb.Embedding(index=i, values=unpack(v)) for i, v in enumerate(result.vectors)]
        return pb.EmbedResponse(
            model=request.model,
            data=data,
            usage=_usage_pb(result.usage),
        )

    async def RegisterEngine(
        self, request: pb.RegisterEngineRequest, context: Any
    ) -> pb.RegisterEngineResponse:
        if not request.HasField("engine"):
            raise InvalidRequestError("engine is required", param="engine")
        record = self.nodes.admit_engine(record_from_pb(request.engine))
        replaced = self.scheduler.registry.register(record)
        return pb.RegisterEngineResponse(engine=record_to_pb(record), replaced=replaced)

    async def DeregisterEngine(
        self, request: pb.DeregisterEngineRequest, context: Any
    ) -> pb.DeregisterEngineResponse:
        record = self.scheduler.registry.deregister(request.engine_id)
        self.scheduler.breakers.forget(request.engine_id)
        left = await self.scheduler.wait_idle(request.engine_id, request.drain_timeout_s)
        return pb.DeregisterEngineResponse(engine=record_to_pb(record), in_flight=left)

    async def ListEngines(
        self, request: pb.ListEnginesRequest, context: Any
    ) -> pb.ListEnginesResponse:
        return pb.ListEnginesResponse(
            engines=[record_to_pb(r) for r in self.scheduler.registry.engines(request.model)]
        )

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Any
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[
                pb.Model(
                    id=m.id,
                    kind=kind_value(m.kind),
                    created=m.created,
                    ready_engines=m.ready_engines,
                    alias_of=m.alias_of,
                )
                for m in self.scheduler.registry.models()
            ]
        )

    async def GetStatus(self, request: pb.GetStatusRequest, context: Any) -> pb.GetStatusResponse:
        engines = self.scheduler.registry.engines()
        counters = self.scheduler.counters
        return pb.GetStatusResponse(
            engines_total=len(engines),
            engines_ready=sum(1 for e in engines if e.state is EngineState.READY),
            in_flight=counters.in_flight,
            queued=self.scheduler.admission.stats.queued,
            policy=self.policy_name,
            requests_total=counters.requests_total,
            requests_failed=counters.requests_failed,
        )

    async def GetMetrics(
        self, request: pb.GetMetricsRequest, context: Any
    ) -> pb.GetMetricsResponse:
        metrics = self.scheduler.metrics
        admission = self.scheduler.admission
        return pb.GetMetricsResponse(
            prometheus_text=metrics.render(),
            models=[
                pb.ModelStats(
                    model=m.model,
                    p50_ms=m.p50_s * 1000,
                    p95_ms=m.p95_s * 1000,
                    p99_ms=m.p99_s * 1000,
                    ttft_p50_ms=m.ttft_p50_s * 1000,
                    tpot_p50_ms=m.tpot_p50_s * 1000,
                    rps=m.rps,
                    slo_attainment=m.slo_attainment,
                    queued=admission.queued_for(m.model),
                )
                for m in metrics.summaries()
            ],
        )

    async def RegisterNode(
        self, request: pb.RegisterNodeRequest, context: Any
    ) -> pb.RegisterNodeResponse:
        node = self.nodes.report(_require_report(request), register=True)
        if node.state is NodeState.UNHEALTHY:
            log.warning(
                "node registered unhealthy", extra={"node_id": node.node_id, "reason": node.reason}
            )
        return pb.RegisterNodeResponse(node=node_to_pb(node, self.nodes))

    async def NodeHeartbeat(
        self, request: pb.NodeHeartbeatRequest, context: Any
    ) -> pb.NodeHeartbeatResponse:
        node = self.nodes.report(_require_report(request), register=False)
        return pb.NodeHeartbeatResponse(node=node_to_pb(node, self.nodes))

    async def ListNodes(self, request: pb.ListNodesRequest, context: Any) -> pb.ListNodesResponse:
        return pb.ListNodesResponse(nodes=[node_to_pb(n, self.nodes) for n in self.nodes.nodes()])

    async def PlaceEngine(
        self, request: pb.PlaceEngineRequest, context: Any
    ) -> pb.PlaceEngineResponse:
        if request.gpus_needed < 0:
            raise InvalidRequestError("gpus_needed must not be negative", param="gpus_needed")
        node = self.nodes.place(
            gpus_needed=request.gpus_needed, use_gpu=request.use_gpu, node_id=request.node_id
        )
        return pb.PlaceEngineResponse(node=node_to_pb(node, self.nodes))


class NodeWatcher:
    """Background work of the node table: sweep silent nodes, poll static ones."""

    def __init__(self, table: NodeTable, interval_s: float, rpc_timeout_s: float) -> None:
        self.table = table
        self.interval_s = interval_s
        self.rpc_timeout_s = rpc_timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Run until `aclose`."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            for node_id in self.table.sweep():
                log.warning("node down; its engines are drained", extra={"node_id": node_id})
            statics = self.table.static_nodes()
            if statics:
                await asyncio.gather(*(self.poll(s.node_id, s.lifecycle_addr) for s in statics))
            await asyncio.sleep(self.interval_s)

    async def poll(self, node_id: str, addr: str) -> None:
        """Ask a static node's lifecycle to describe itself; silence marks it down."""
        channel = self._channels.get(addr)
        if channel is None:
            channel = self._channels[addr] = create_channel(
                addr, default_timeout=self.rpc_timeout_s
            )
        stub = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        try:
            reply = await stub.DescribeNode(
                lifecycle_pb2.DescribeNodeRequest(),
                timeout=min(self.rpc_timeout_s, max(self.interval_s * 2, 1.0)),
            )
        except grpc.RpcError as err:
            self.table.mark_unreachable(
                node_id, f"lifecycle at {addr} unreachable: {err.code().name} {err.details()}"
            )
            return
        report = node_report_from_pb(reply.report)
        if report.node_id != node_id:
            self.table.mark_unreachable(
                node_id, f"the agent at {addr} says it is node {report.node_id!r}"
            )
            return
        with contextlib.suppress(InvalidRequestError):
            # The address we polled is the one to use, whatever the agent thinks it is.
            self.table.report(
                dataclasses.replace(report, lifecycle_addr=addr), register=True, static=True
            )

    async def aclose(self) -> None:
        """Stop the loop and close the poll channels."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for channel in self._channels.values():
            await channel.close(None)


class LifecycleScalerActions:
    """ScalerActions over lifecycle gRPC: StartEngine like an existing replica, drained stop."""

    def __init__(self, channel: grpc.aio.Channel, rpc_timeout_s: float, start_timeout_s: float):
        self._stub = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        self._rpc_timeout_s = rpc_timeout_s
        self._start_timeout_s = start_timeout_s

    async def start_replica(self, model: str) -> None:
        """Start an engine with the model/kind/backend/role of a ready one of `model`."""
        with rpc_errors_as_sage():
            listed = await self._stub.ListEngines(
                lifecycle_pb2.ListEnginesRequest(), timeout=self._rpc_timeout_s
            )
        template = next(
            (
                e
                for e in listed.engines
                if e.model == model and e.state == common_pb2.ENGINE_STATE_READY
            ),
            None,
        )
        if template is None:
            raise NotFoundError(
                f"lifecycle runs no ready engine of {model!r} to copy", param="model"
            )
        # Lifecycle copies the template's whole spec (extra args, parallelism, GPU memory).
        request = lifecycle_pb2.StartEngineRequest(like_engine_id=template.engine_id)
        with rpc_errors_as_sage():
            await self._stub.StartEngine(request, timeout=self._start_timeout_s)

    async def stop_replica(self, engine_id: str) -> None:
        """Drain then stop `engine_id` (lifecycle deregisters it from us first)."""
        with rpc_errors_as_sage():
            await self._stub.StopEngine(
                lifecycle_pb2.StopEngineRequest(engine_id=engine_id, drain=True),
                timeout=self._start_timeout_s,
            )


def build_server(settings: SageSettings, addr: str | None = None) -> tuple[SageServer, int]:
    """The scheduler server with its dependencies wired from settings."""
    executor = HttpExecutionCoordinator(request_timeout_s=settings.request_timeout_s)
    embedding_channel = create_channel(
        settings.address("embedding_service"), default_timeout=settings.request_timeout_s
    )
    breakers = CircuitBreakers(
        settings.scheduler_breaker_failures,
        settings.scheduler_breaker_cooldown_s,
        max_cooldown_s=settings.scheduler_breaker_max_cooldown_s,
    )
    metrics = SchedulerMetrics(breakers=breakers)
    load = EngineLoadTracker(scrape_interval_s=max(0.1, settings.scheduler_scrape_interval_s))
    admission = AdmissionController(
        settings.scheduler_policy,
        per_engine=settings.scheduler_max_inflight_per_engine,
        max_queue=settings.scheduler_max_queue,
        predict=metrics.predict,
        measured=load.capacity,
        measured_version=lambda: load.capacity_version,
    )
    metrics.queue_depth = lambda: admission.stats.queued
    routing = settings.scheduler_routing
    registry = EngineRegistry()
    scheduler = Scheduler(
        registry,
        create_router(routing, load),
        executor,
        GrpcEmbeddingBackend(embedding_channel, settings.request_timeout_s),
        admission=admission,
        load=load,
        breakers=breakers,
        metrics=metrics,
        embedding_max_tokens=settings.embedding_max_tokens_per_request,
    )
    try:
        static_nodes = parse_nodes(settings.nodes)
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="SAGE_NODES") from None
    node_table = NodeTable(registry, timeout_s=settings.node_timeout_s, static=static_nodes)
    node_watcher = NodeWatcher(
        node_table,
        min(settings.node_heartbeat_s, settings.node_timeout_s / 4),
        settings.rpc_timeout_s,
    )
    servicer = SchedulerServicer(
        scheduler,
        f"{settings.scheduler_policy}/{routing}",
        node_table,
        request_timeout_s=settings.request_timeout_s,
        # The edge's table (same settings): tenants and limits are resolved here from the
        # caller's key, never taken from a request.
        api_keys=load_key_table(settings.api_keys, settings.api_keys_file),
    )
    server, port = create_server(
        addr or f"{settings.host}:{settings.scheduler_port}",
        [
            Registration(
                pb.DESCRIPTOR.services_by_name["SchedulerService"].full_name,
                pb_grpc.add_SchedulerServiceServicer_to_server,
                servicer,
            )
        ],
    )

    async def _watch_nodes() -> None:
        node_watcher.start()

    server.on_start(_watch_nodes)
    server.on_drain(servicer.mux.drain)

    # A restarted scheduler routes lifecycle's ready engines at once (see rebuild.py).
    rebuilding: list[asyncio.Task[int]] = []

    async def _register_pb(engine: common_pb2.Engine) -> None:
        await servicer.RegisterEngine(pb.RegisterEngineRequest(engine=engine), None)

    async def _rebuild() -> None:
        rebuilding.append(
            asyncio.get_running_loop().create_task(
                rebuild_from_lifecycle(
                    settings.address("lifecycle"), _register_pb, timeout_s=settings.rpc_timeout_s
                )
            )
        )

    async def _stop_rebuild() -> None:
        for task in rebuilding:
            task.cancel()

    server.on_start(_rebuild)
    server.on_stop(_stop_rebuild)

    # Engines' /metrics feed load-aware routers and measure undeclared capacities; with
    # neither in use (round robin under a fixed or no cap) nothing is scraped.
    if routing != "round_robin" or settings.scheduler_max_inflight_per_engine < 0:

        async def _scrape() -> None:
            load.start(
                lambda: [
                    e
                    for e in registry.engines()
                    if e.kind is EngineKind.LLM and e.state is EngineState.READY
                ]
            )

        server.on_start(_scrape)

    autoscaler: Autoscaler | None = None
    lifecycle_channel: grpc.aio.Channel | None = None
    if settings.autoscale.strip():
        lifecycle_channel = create_channel(
            settings.address("lifecycle"), default_timeout=settings.rpc_timeout_s
        )

        def _replicas(model: str) -> list[str]:
            return [
                e.engine_id
                for e in registry.engines(model)
                if e.model == model and e.state is EngineState.READY
            ]

        autoscaler = Autoscaler(
            AutoscalerConfig(
                ranges=parse_autoscale(settings.autoscale),
                dry_run=settings.autoscale_dry_run,
                interval_s=settings.autoscale_interval_s,
                queue_threshold=settings.autoscale_queue_threshold,
                up_after_s=settings.autoscale_up_after_s,
                idle_s=settings.autoscale_idle_s,
                cooldown_s=settings.autoscale_cooldown_s,
                slo_target=settings.autoscale_slo_target,
            ),
            LifecycleScalerActions(
                lifecycle_channel, settings.rpc_timeout_s, settings.request_timeout_s
            ),
            replicas=_replicas,
            queued=admission.queued_for,
            in_flight=load.in_flight,
            slo_attainment=metrics.slo_attainment,
        )

        async def _autoscale() -> None:
            assert autoscaler is not None
            autoscaler.start()

        server.on_start(_autoscale)

    async def _close() -> None:
        await node_watcher.aclose()
        if autoscaler is not None:
            await autoscaler.aclose()
        if lifecycle_channel is not None:
            await lifecycle_channel.close(None)
        await load.aclose()
        await executor.aclose()
        await embedding_channel.close(None)

    server.on_stop(_close)
    return server, port
