"""The dashboard's sampled history: gauges read from the scheduler's Prometheus text, the
ring's bound, and the errors it reports between samples."""

from __future__ import annotations

from sage.protocol.management import ModelPoint, Sample
from sage.services.edge.timeseries import TimeSeries, parse_gauges

SCHEDULER_TEXT = """\
# HELP sage:engine_in_flight Requests the scheduler has in flight to the engine now.
# TYPE sage:engine_in_flight gauge
sage:engine_in_flight{engine="sim-1"} 3.0
sage:engine_in_flight{engine="odd\\"id\\\\x"} 1.0
# TYPE sage:scheduler_generation_tokens_per_second gauge
sage:scheduler_generation_tokens_per_second{model="Qwen/Qwen2.5-0.5B"} 41.5
sage:scheduler_requests_per_second{model="Qwen/Qwen2.5-0.5B"} 2.0
sage:engine_in_flight{engine="broken"} not-a-number
"""


def sample(t: float, failed: int = 0, model: str = "m") -> Sample:
    point = ModelPoint(
        rps=1.0,
        tokens_per_s=10.0,
        ttft_p50_ms=20.0,
        tpot_p50_ms=5.0,
        p95_ms=80.0,
        slo_attainment=1.0,
        queued=2,
    )
    return Sample(
        t=t,
        queued=2,
        in_flight=1,
        requests_total=10,
        requests_failed=failed,
        models={model: point},
        engine_in_flight={},
    )


def test_gauges_are_read_per_label_with_escapes_undone() -> None:
    in_flight, tokens = parse_gauges(SCHEDULER_TEXT)
    assert in_flight == {"sim-1": 3.0, 'odd"id\\x': 1.0}
    assert tokens == {"Qwen/Qwen2.5-0.5B": 41.5}


def test_the_ring_keeps_only_the_window() -> None:
    series = TimeSeries(interval_s=2.0, window_s=10.0)
    for i in range(12):
        series.add(sample(float(i)), "fifo")
    kept = [s.t for s in series.samples]
    assert kept == [7.0, 8.0, 9.0, 10.0, 11.0]
    doc = series.snapshot()
    assert doc.policy == "fifo" and len(doc.samples) == 5
    assert doc.samples[-1].models["m"].queued == 2


def test_failed_requests_and_outages_become_error_events() -> None:
    series = TimeSeries()
    series.add(sample(100.0, failed=1), "fifo")  # failures before the first sample: no event
    series.add(sample(102.0, failed=4), "fifo")
    series.unreachable(104.0, "connection refused")
    series.unreachable(106.0, "connection refused")  # one event per outage
    series.add(sample(108.0, failed=0), "fifo")  # a restarted scheduler's counters start over
    messages = [e.message for e in series.snapshot().errors]
    assert messages == [
        "3 requests failed in the last 2 s (4 since start)",
        "scheduler unreachable: connection refused",
        "scheduler reachable again",
    ]
