"""gRPC transport of the scheduler: decode, call the domain, encode. No logic lives here."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from sage.common.apikeys import ApiKeyTable
from sage.common.exceptions import (
    ConfigurationError,
    InvalidRequestError,
    NotFoundError,
    ServiceUnavailableError,
)
from sage.common.float32 import unpack
from sage.common.grpc.engine_enums import kind_value
from sage.rpc.scheduler.v1 import scheduler_pb2 as pb
from sage.rpc.scheduler.v1 import scheduler_pb2_grpc as pb_grpc

from .cluster import EtcdReplica
from .coalesce import ready_runs
from .convert import (
    limits_from_pb,
    node_to_pb,
    record_from_pb,
    record_to_pb,
    require_model,
    require_report,
    ticket_from_pb,
    usage_pb,
)
from .core import GenerateResult, Scheduler
from .mux import MultiplexSessions, scheduler_routes
from .nodes import NodeState, NodeTable
from .policies import RequestClass
from .registry import EngineKind, EngineRecord

log = logging.getLogger("sage.scheduler")


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


# The engine route of each chat API (ChatRequest.api): one scheduling path, several APIs.
_CHAT_PATHS: dict[int, str] = {
    pb.CHAT_API_UNSPECIFIED: "/v1/chat/completions",
    pb.CHAT_API_RESPONSES: "/v1/responses",
    pb.CHAT_API_MESSAGES: "/v1/messages",
}


def _chat_path(api: int) -> str:
    """The engine path for `api`; a value this scheduler does not know is the caller's error
    (a newer client), not an internal one."""
    path = _CHAT_PATHS.get(api)
    if path is None:
        raise InvalidRequestError(f"unknown chat api {api}", param="api")
    return path


_Reply = TypeVar("_Reply")


class SchedulerServicer(pb_grpc.SchedulerServiceServicer):
    """SchedulerService over the domain Scheduler."""

    def __init__(
        self,
        scheduler: Scheduler,
        policy_name: str,
        nodes: NodeTable | None = None,
        request_timeout_s: float = 600.0,
        api_keys: ApiKeyTable | None = None,
        replica: EtcdReplica | None = None,
        address: str = "",
    ) -> None:
        self.scheduler = scheduler
        # etcd mode: nodes and engines come from etcd, and placement from the leader.
        self.replica = replica
        self.address = address  # this scheduler's own gRPC address, for GetStatus
        self.policy_name = policy_name
        # Tenants and limits come from this table, not from requests (ratelimit.limits_for).
        self.api_keys = api_keys if api_keys is not None else ApiKeyTable()
        self.nodes = nodes or NodeTable(scheduler.registry, timeout_s=6.0)
        # Multiplex requests without their own timeout_s get the edge's request timeout.
        self.mux = MultiplexSessions(scheduler_routes(self), request_timeout_s)

    async def _generate(
        self, request: pb.ChatRequest | pb.CompleteRequest, path: str, cls: RequestClass
    ) -> GenerateResult:
        """A chat or completion request to the end: both differ only in route and class."""
        limits = limits_from_pb(request, self.api_keys)
        return await self.scheduler.generate(
            require_model(request.model),
            request.body,
            path,
            limits,
            ticket_from_pb(request, cls, limits.tenant),
            session_key=request.options.session_key,
        )

    def _generate_stream(
        self,
        request: pb.ChatStreamRequest | pb.CompleteStreamRequest,
        path: str,
        cls: RequestClass,
    ) -> AsyncIterator[tuple[str, bytes, list[bytes]]]:
        """A streamed chat or completion as (engine id, data, more) messages."""
        limits = limits_from_pb(request, self.api_keys)
        chunks = self.scheduler.generate_stream(
            require_model(request.model),
            request.body,
            path,
            limits,
            ticket_from_pb(request, cls, limits.tenant),
            session_key=request.options.session_key,
        )
        return _messages(chunks, request.coalesce)

    async def Chat(self, request: pb.ChatRequest, context: Any) -> pb.ChatResponse:
        result = await self._generate(request, _chat_path(request.api), RequestClass.LLM_CHAT)
        return pb.ChatResponse(
            body=result.body, engine_id=result.engine.engine_id, usage=usage_pb(result.usage)
        )

    async def ChatStream(
        self, request: pb.ChatStreamRequest, context: Any
    ) -> AsyncIterator[pb.ChatStreamResponse]:
        messages = self._generate_stream(request, _chat_path(request.api), RequestClass.LLM_CHAT)
        async for engine_id, data, more in messages:
            yield pb.ChatStreamResponse(data=data, engine_id=engine_id, more=more)

    async def Complete(self, request: pb.CompleteRequest, context: Any) -> pb.CompleteResponse:
        result = await self._generate(request, "/v1/completions", RequestClass.LLM_GENERATE)
        return pb.CompleteResponse(
            body=result.body, engine_id=result.engine.engine_id, usage=usage_pb(result.usage)
        )

    async def CompleteStream(
        self, request: pb.CompleteStreamRequest, context: Any
    ) -> AsyncIterator[pb.CompleteStreamResponse]:
        messages = self._generate_stream(request, "/v1/completions", RequestClass.LLM_GENERATE)
        async for engine_id, data, more in messages:
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
            require_model(request.model),
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
            usage=usage_pb(result.usage),
        )

    async def _engine_call(
        self,
        request: Any,
        path: str,
        reply: Callable[..., _Reply],
        kind: EngineKind = EngineKind.LLM,
    ) -> _Reply:
        """A relayed engine route (tokenize, detokenize, rerank, score): `request`'s body on
        `path` of a ready `kind` engine of its model, answered as `reply`."""
        limits = limits_from_pb(request, self.api_keys)
        result = await self.scheduler.engine_call(
            require_model(request.model), path, request.body, limits, kind
        )
        return reply(body=result.body, engine_id=result.engine.engine_id)

    async def Tokenize(self, request: pb.TokenizeRequest, context: Any) -> pb.TokenizeResponse:
        return await self._engine_call(request, "/tokenize", pb.TokenizeResponse)

    async def Detokenize(
        self, request: pb.DetokenizeRequest, context: Any
    ) -> pb.DetokenizeResponse:
        return await self._engine_call(request, "/detokenize", pb.DetokenizeResponse)

    async def Rerank(self, request: pb.RerankRequest, context: Any) -> pb.RerankResponse:
        return await self._engine_call(request, "/rerank", pb.RerankResponse, EngineKind.EMBEDDING)

    async def Score(self, request: pb.ScoreRequest, context: Any) -> pb.ScoreResponse:
        return await self._engine_call(request, "/score", pb.ScoreResponse, EngineKind.EMBEDDING)

    def _published_in_etcd(self, what: str, rpc: str) -> None:
        """In etcd mode agents publish nodes and engines in etcd: a registration over gRPC
        would live in this replica only (the others never route it) and never expire with
        its agent, so it is refused, naming the fix."""
        if self.replica is not None:
            raise ConfigurationError(
                f"this scheduler runs in etcd mode ({', '.join(self.replica.client.endpoints)}): "
                f"{what} come from what node agents publish there, not from {rpc} calls; give "
                "the caller the same SAGE_ETCD_ENDPOINTS (engines registered by hand go "
                "through lifecycle: POST /v1/management/engines/register)",
                param="etcd_endpoints",
            )

    async def RegisterEngine(
        self, request: pb.RegisterEngineRequest, context: Any
    ) -> pb.RegisterEngineResponse:
        self._published_in_etcd("engines", "RegisterEngine")
        if not request.HasField("engine"):
            raise InvalidRequestError("engine is required", param="engine")
        record = self.nodes.admit_engine(record_from_pb(request.engine))
        replaced = self.scheduler.registry.register(record)
        return pb.RegisterEngineResponse(engine=record_to_pb(record), replaced=replaced)

    async def DeregisterEngine(
        self, request: pb.DeregisterEngineRequest, context: Any
    ) -> pb.DeregisterEngineResponse:
        try:
            record: EngineRecord | None = self.scheduler.registry.deregister(request.engine_id)
        except NotFoundError:
            # etcd mode: the agent deleted engines/<id> first and the mirror already took
            # it out; what is left to do is waiting for this replica's requests on it.
            if self.replica is None:
                raise
            record = None
        self.scheduler.breakers.forget(request.engine_id)
        left = await self.scheduler.wait_idle(request.engine_id, request.drain_timeout_s)
        return pb.DeregisterEngineResponse(
            engine=record_to_pb(record) if record is not None else None, in_flight=left
        )

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
                    parent=m.parent,
                )
                for m in self.scheduler.registry.models()
            ]
        )

    async def GetStatus(self, request: pb.GetStatusRequest, context: Any) -> pb.GetStatusResponse:
        total, ready = self.scheduler.registry.counts()
        counters = self.scheduler.counters
        replica = self.replica
        return pb.GetStatusResponse(
            is_leader=replica.is_leader if replica is not None else True,
            leader_address=replica.leader_address if replica is not None else self.address,
            replicas=replica.replicas if replica is not None else 1,
            synced=replica.synced.is_set() if replica is not None else True,
            engines_total=total,
            engines_ready=ready,
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
            prometheus_text=metrics.render(request.families),
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
        self._published_in_etcd("nodes", "RegisterNode")
        node = self.nodes.report(require_report(request), register=True)
        if node.state is NodeState.UNHEALTHY:
            log.warning(
                "node registered unhealthy", extra={"node_id": node.node_id, "reason": node.reason}
            )
        return pb.RegisterNodeResponse(node=node_to_pb(node, self.nodes))

    async def NodeHeartbeat(
        self, request: pb.NodeHeartbeatRequest, context: Any
    ) -> pb.NodeHeartbeatResponse:
        self._published_in_etcd("nodes", "NodeHeartbeat")
        node = self.nodes.report(require_report(request), register=False)
        return pb.NodeHeartbeatResponse(node=node_to_pb(node, self.nodes))

    async def ListNodes(self, request: pb.ListNodesRequest, context: Any) -> pb.ListNodesResponse:
        return pb.ListNodesResponse(nodes=[node_to_pb(n, self.nodes) for n in self.nodes.nodes()])

    async def PlaceEngine(
        self, request: pb.PlaceEngineRequest, context: Any
    ) -> pb.PlaceEngineResponse:
        if request.gpus_needed < 0:
            raise InvalidRequestError("gpus_needed must not be negative", param="gpus_needed")
        if self.replica is not None and not self.replica.is_leader:
            # One replica places, so two concurrent starts are judged against one view.
            return await self.replica.place_on_leader(request, context)
        node = self.nodes.place(
            gpus_needed=request.gpus_needed,
            use_gpu=None if request.gpu_auto else request.use_gpu,
            node_id=request.node_id,
            backend=request.backend,
        )
        return pb.PlaceEngineResponse(node=node_to_pb(node, self.nodes))
