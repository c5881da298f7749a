"""When an etcd-mode node agent writes its report again: every change but the constant
wobble of free GPU memory (which would be a write per node every heartbeat)."""

from __future__ import annotations

from sage.rpc.common.v1 import common_pb2
from sage.services.lifecycle.agent import report_changed

GiB = 1 << 30


def report(free_gib: float = 30, engines: tuple[str, ...] = ()) -> common_pb2.NodeReport:
    return common_pb2.NodeReport(
        node_id="n1",
        lifecycle_addr="10.0.0.2:50052",
        gpu_count=1,
        gpus=[
            common_pb2.NodeGpu(
                index=0,
                name="H100",
                memory_total_bytes=80 * GiB,
                memory_free_bytes=int(free_gib * GiB),
            )
        ],
        engine_ids=list(engines),
    )


def test_first_report_and_real_changes_are_written() -> None:
    assert report_changed(None, report())
    assert report_changed(report(), report(engines=("e1",)))
    assert report_changed(report(), report(free_gib=10))  # an engine took 20 GiB
    assert report_changed(report(), common_pb2.NodeReport(node_id="n1"))  # GPUs gone


def test_free_memory_wobble_is_not_written() -> None:
    assert not report_changed(report(), report())
    assert not report_changed(report(free_gib=30), report(free_gib=29.5))
