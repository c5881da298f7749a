"""The fleet gauges the edge exports for lifecycle's engines and the scheduler's nodes:
what the shipped alert rules (deploy/observability) read."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from sage.rpc.common.v1 import common_pb2 as cpb
from sage.rpc.scheduler.v1 import scheduler_pb2 as spb
from sage.services.edge.fleet_metrics import render_fleet

GiB = 1 << 30


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _engine(
    engine_id: str, model: str, state: cpb.EngineState.ValueType, restarts: int = 0
) -> cpb.Engine:
    return cpb.Engine(
        engine_id=engine_id,
        model=model,
        backend="sim",
        state=state,
        restart_count=restarts,
        node_id="n1",
    )


def _node(node_id: str, state: spb.NodeState.ValueType, *gpus: tuple[int, int]) -> spb.Node:
    report = cpb.NodeReport(
        node_id=node_id,
        lifecycle_addr="10.0.0.1:50053",
        gpu_count=len(gpus),
        gpus=[
            cpb.NodeGpu(index=i, memory_total_bytes=total, memory_free_bytes=free)
            for i, (total, free) in enumerate(gpus)
        ],
    )
    return spb.Node(report=report, state=state)


def test_models_without_a_ready_engine_read_zero_and_stopped_models_are_left_out() -> None:
    engines = [
        _engine("a1", "a", cpb.ENGINE_STATE_READY),
        _engine("a2", "a", cpb.ENGINE_STATE_STARTING, restarts=1),
        _engine("b1", "b", cpb.ENGINE_STATE_FAILED, restarts=2),
        _engine("c1", "c", cpb.ENGINE_STATE_STOPPED),
    ]
    samples = _samples(render_fleet(engines, []))
    ready = {
        dict(labels)["model"]: value
        for (name, labels), value in samples.items()
        if name == "sage:model_ready_engines"
    }
    assert ready == {"a": 1.0, "b": 0.0}  # c was stopped on purpose: nothing to alert on
    sim = ("backend", "sim")
    assert samples[("sage:engines", (sim, ("model", "b"), ("state", "failed")))] == 1
    assert samples[("sage:engines", (sim, ("model", "c"), ("state", "stopped")))] == 1
    restarts = (("engine", "b1"), ("model", "b"), ("node", "n1"))
    assert samples[("sage:engine_restarts_total", restarts)] == 2.0


def test_gpu_headroom_per_node_skips_nodes_that_are_down() -> None:
    nodes = [
        _node("gpu1", spb.NODE_STATE_READY, (80 * GiB, 4 * GiB), (80 * GiB, 70 * GiB)),
        _node("gpu2", spb.NODE_STATE_DOWN, (80 * GiB, 80 * GiB)),
    ]
    samples = _samples(render_fleet([], nodes))
    assert samples[("sage:gpu_memory_total_bytes", (("gpu", "0"), ("node", "gpu1")))] == 80 * GiB
    assert samples[("sage:gpu_memory_available_bytes", (("gpu", "0"), ("node", "gpu1")))] == (
        4 * GiB
    )
    assert samples[("sage:gpu_memory_available_bytes", (("gpu", "1"), ("node", "gpu1")))] == (
        70 * GiB
    )
    assert not any(dict(labels).get("node") == "gpu2" for _, labels in samples)
