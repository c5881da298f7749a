"""Prometheus gauges for facts the node agents own: engine states and restarts (lifecycle)
and GPU memory left to reserve (gpu_manager, as each node's heartbeat reports it).

The edge already gathers these for `/v1/management` (every node's lifecycle through the
scheduler's node table), so it exports them beside its own metrics: one scrape target
covers the fleet, and no agent needs an HTTP port. Built at scrape time, best effort: a
node that does not answer is left out, never an error on `/metrics`.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable, Iterator

import grpc
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sage.common.exceptions import SageError
from sage.common.grpc.engine_enums import state_name
from sage.rpc.common.v1 import common_pb2
from sage.rpc.scheduler.v1 import scheduler_pb2 as spb

from .management import NodeLifecycles

# States in which lifecycle still means the engine to serve: a model whose engines are all
# in these but none is ready cannot be served (a deliberately stopped model is not counted).
WANTED_STATES = ("starting", "ready", "draining", "failed")


def fleet_families(
    engines: Iterable[common_pb2.Engine], nodes: Iterable[spb.Node]
) -> Iterator[Metric]:
    """The gauges for lifecycle's `engines` and the scheduler's `nodes` table."""
    engines = list(engines)
    by_state = GaugeMetricFamily(
        "sage:engines",
        "Engines lifecycle manages, by model, backend and state.",
        labels=["model", "backend", "state"],
    )
    counts = Counter((e.model, e.backend, state_name(e.state)) for e in engines)
    for key, count in sorted(counts.items()):
        by_state.add_metric(key, float(count))
    yield by_state

    ready = GaugeMetricFamily(
        "sage:model_ready_engines",
        "Ready engines per model, for every model lifecycle keeps engines for (starting, "
        "ready, draining or failed); 0 means requests for the model cannot be served.",
        labels=["model"],
    )
    wanted: Counter[str] = Counter()
    for engine in engines:
        state = state_name(engine.state)
        if state in WANTED_STATES:
            wanted[engine.model] += state == "ready"
    for model, count in sorted(wanted.items()):
        ready.add_metric((model,), float(count))
    yield ready

    restarts = CounterMetricFamily(
        "sage:engine_restarts",
        "Times lifecycle restarted the engine after it crashed.",
        labels=["engine", "model", "node"],
    )
    for engine in sorted(engines, key=lambda e: e.engine_id):
        restarts.add_metric(
            (engine.engine_id, engine.model, engine.node_id), float(engine.restart_count)
        )
    yield restarts

    total = GaugeMetricFamily(
        "sage:gpu_memory_total_bytes",
        "GPU memory, per node and GPU (the node's last heartbeat).",
        labels=["node", "gpu"],
    )
    available = GaugeMetricFamily(
        "sage:gpu_memory_available_bytes",
        "GPU memory a new engine could still reserve: free minus reservations and the "
        "safety margin (gpu_manager's ledger, the node's last heartbeat).",
        labels=["node", "gpu"],
    )
    for node in nodes:
        if node.state == spb.NODE_STATE_DOWN:
            continue  # its last report is stale; `sage:engines` shows what it ran
        for gpu in node.report.gpus:
            labels = (node.report.node_id, str(gpu.index))
            total.add_metric(labels, float(gpu.memory_total_bytes))
            available.add_metric(labels, float(gpu.memory_free_bytes))
    yield total
    yield available


class _Snapshot(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def render_fleet(engines: Iterable[common_pb2.Engine], nodes: Iterable[spb.Node]) -> bytes:
    """The Prometheus text of `fleet_families`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(list(fleet_families(engines, nodes))))
    return generate_latest(registry)


async def fleet_metrics(lifecycles: NodeLifecycles) -> bytes:
    """Ask the scheduler's node table and every node's lifecycle; b"" when neither answers."""

    async def engines() -> list[common_pb2.Engine]:
        try:
            return await lifecycles.list_engines()
        except (grpc.RpcError, SageError):
            return []

    async def nodes() -> list[spb.Node]:
        try:  # SageError: the edge has no upstreams (not started, or stopping)
            return await lifecycles.nodes()
        except SageError:
            return []

    listed, table = await asyncio.gather(engines(), nodes())
    if not listed and not table:
        return b""
    return render_fleet(listed, table)
