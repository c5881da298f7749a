"""Protobuf ↔ domain values for the scheduler's gRPC surface; no I/O and no behaviour."""

from __future__ import annotations

import time
from typing import Any

from sage.common.apikeys import ApiKeyTable
from sage.common.exceptions import InvalidRequestError
from sage.common.grpc.engine_enums import (
    kind_name,
    kind_value,
    role_name,
    role_value,
    state_name,
    state_value,
)
from sage.rpc.common.v1 import common_pb2
from sage.rpc.scheduler.v1 import scheduler_pb2 as pb

from .admission import parse_priority
from .core import TokenUsage
from .nodes import Node, NodeGpu, NodeReport, NodeState, NodeTable
from .policies import QueuedRequest, RequestClass
from .ratelimit import TenantLimits, limits_for
from .registry import EngineKind, EngineRecord, EngineState


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
        adapters={a.name: a.path for a in engine.adapters},
        lora_enabled=engine.lora_enabled,
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
        adapters=[common_pb2.LoraAdapter(name=n, path=p) for n, p in record.adapters.items()],
        lora_enabled=record.lora_enabled,
    )


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
        cpu_backends=tuple(report.cpu_backends),
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
            cpu_backends=list(report.cpu_backends),
        ),
        state=_NODE_STATE_PB[node.state],
        reason=node.reason,
        last_seen_s_ago=since if since != float("inf") else -1.0,
        static=node.static,
        engines=table.engine_count(node.node_id),
    )


def require_report(request: Any) -> NodeReport:
    if not request.HasField("report"):
        raise InvalidRequestError("report is required", param="report")
    return node_report_from_pb(request.report)


def usage_pb(usage: TokenUsage) -> common_pb2.Usage:
    return common_pb2.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


def ticket_from_pb(
    request: Any, request_class: RequestClass, tenant: str = "default"
) -> QueuedRequest:
    """What the queueing policy orders by: tenant (resolved from the caller's key, see
    limits_from_pb), priority class, SLO deadline. The cost is the scheduler's own estimate
    (core.estimate_tokens); `options.estimated_tokens` is ignored."""
    now = time.monotonic()
    if not request.HasField("options"):
        return QueuedRequest(
            model=request.model,
            request_class=request_class,
            tenant=tenant,
            arrival=now,
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
    )


def limits_from_pb(request: Any, keys: ApiKeyTable) -> TenantLimits:
    """The tenant and its limits for the key in the request's `options.api_key`, from the
    scheduler's own key table; the request's tenant and rate_limit_* fields are ignored."""
    options: pb.RequestOptions = request.options
    return limits_for(keys, options.api_key)


def require_model(model: str) -> str:
    if not model:
        raise InvalidRequestError("model is required", param="model")
    return model
