"""Scheduler metrics: percentile maths, TPOT, throughput, SLO attainment, the predictor
and the tenant label cap."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from sage.services.scheduler.breaker import CircuitBreakers, Outcome
from sage.services.scheduler.metrics import WINDOW, SchedulerMetrics, percentile
from sage.services.scheduler.policies import QueuedRequest, RequestClass


@dataclass
class Clock:
    """A manual monotonic clock."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def metrics(clock: Clock) -> SchedulerMetrics:
    return SchedulerMetrics(clock=clock, max_tenants=2)


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.95) == 95.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile(values, 0.0) == 1.0
    assert percentile([], 0.5) == 0.0
    assert percentile([7.0], 0.99) == 7.0


def test_summaries_percentiles_over_a_bounded_window(metrics: SchedulerMetrics) -> None:
    item = QueuedRequest(model="m")
    for ms in range(1, 101):
        metrics.observe(item, "e1", ms / 1000)
    (summary,) = metrics.summaries()
    assert summary.p50_s == pytest.approx(0.050)
    assert summary.p95_s == pytest.approx(0.095)
    assert summary.p99_s == pytest.approx(0.099)
    for _ in range(WINDOW):
        metrics.observe(item, "e1", 2.0)
    assert metrics.summaries()[0].p50_s == 2.0  # old samples fell out of the window


def test_ttft_tpot_and_throughput(metrics: SchedulerMetrics, clock: Clock) -> None:
    item = QueuedRequest(model="m", request_class=RequestClass.LLM_GENERATE)
    metrics.observe(item, "e1", 1.1, ttft_s=0.1, completion_tokens=11)
    metrics.observe(item, "e1", 0.5, ttft_s=0.2, completion_tokens=1)  # no TPOT from 1 token
    (summary,) = metrics.summaries()
    assert summary.ttft_p50_s == pytest.approx(0.1)
    assert summary.tpot_p50_s == pytest.approx(0.1)
    assert summary.rps == pytest.approx(2 / 60)
    assert summary.tokens_per_s == pytest.approx(12 / 60)
    clock.now += 61
    assert metrics.summaries()[0].rps == 0.0  # slid out of the window


def test_slo_attainment(metrics: SchedulerMetrics, clock: Clock) -> None:
    assert metrics.slo_attainment("m") == 1.0
    metrics.observe(QueuedRequest(model="m"), "e1", 0.1)  # no deadline: not counted
    metrics.observe(QueuedRequest(model="m", deadline=clock.now + 1), "e1", 0.1)
    metrics.observe(QueuedRequest(model="m", deadline=clock.now - 1), "e1", 0.1)
    metrics.observe(
        QueuedRequest(model="m", deadline=clock.now + 1), "e1", 0.1, finished_at=clock.now + 2
    )
    assert metrics.slo_attainment("m") == pytest.approx(1 / 3)
    assert metrics.summaries()[0].slo_attainment == pytest.approx(1 / 3)
    text = metrics.render().decode()
    # Counters too, so alerts can take the attainment over a window rather than a lifetime.
    assert 'sage:scheduler_slo_requests_total{model="m",outcome="met"} 1.0' in text
    assert 'sage:scheduler_slo_requests_total{model="m",outcome="missed"} 2.0' in text


def test_predict_is_the_recent_median_and_zero_when_unknown(metrics: SchedulerMetrics) -> None:
    assert metrics.predict(QueuedRequest(model="m")) == 0.0
    for seconds in (0.1, 0.2, 0.3):
        metrics.observe(QueuedRequest(model="m"), "e1", seconds)
    assert metrics.predict(QueuedRequest(model="m")) == pytest.approx(0.2)
    assert metrics.predict(QueuedRequest(model="other")) == 0.0


def test_tenant_cardinality_is_capped(metrics: SchedulerMetrics) -> None:
    for tenant in ("t1", "t2", "t3", "t4"):
        metrics.observe(QueuedRequest(model="m", tenant=tenant), "e1", 0.1)
    text = metrics.render().decode()
    assert 'tenant="t1"' in text
    assert 'tenant="t2"' in text
    assert 'tenant="t3"' not in text
    assert 'tenant="other"' in text
    assert metrics.tenant_label("t1") == "t1"


def test_prometheus_exposition(clock: Clock) -> None:
    breakers = CircuitBreakers(1, 5.0, clock=clock)
    metrics = SchedulerMetrics(clock=clock, queue_depth=lambda: 7, breakers=breakers)
    metrics.observe(
        QueuedRequest(model="m", tenant="acme", deadline=clock.now + 1),
        "e1",
        0.3,
        ttft_s=0.1,
        completion_tokens=5,
    )
    metrics.failed()
    breakers.begin("dead")
    breakers.record("dead", Outcome.FAILURE)
    text = metrics.render().decode()
    assert (
        'sage:scheduler_request_latency_seconds_bucket{class="llm_chat",engine="e1",'
        'le="0.5",model="m",tenant="acme"} 1.0' in text
    )
    assert "sage:scheduler_time_to_first_token_seconds_count{" in text
    assert "sage:scheduler_time_per_output_token_seconds_sum{" in text
    assert "sage:scheduler_queue_depth 7.0" in text
    assert 'sage:scheduler_slo_attainment_ratio{model="m"} 1.0' in text
    assert 'sage:scheduler_requests_total{status="ok"} 1.0' in text
    assert 'sage:scheduler_requests_total{status="error"} 1.0' in text
    assert 'sage:engine_circuit_open{engine="dead"} 1.0' in text
    assert 'sage:engine_failures_total{engine="dead"} 1.0' in text


def test_in_flight_per_engine_is_exported_while_requests_run() -> None:
    from sage.services.scheduler.load import EngineLoadTracker

    load = EngineLoadTracker()
    metrics = SchedulerMetrics(in_flight=load.in_flight_by_engine, loads=load.loads)
    load.report("e2", 5.0)  # the engine said 5 running + waiting, none of them ours
    with load.track("e1"), load.track("e1"), load.track("e2"):
        text = metrics.render().decode()
        assert 'sage:engine_in_flight{engine="e1"} 2.0' in text
        assert 'sage:engine_in_flight{engine="e2"} 1.0' in text
        assert 'sage:engine_routing_load{engine="e1"} 2.0' in text
        assert 'sage:engine_routing_load{engine="e2"} 6.0' in text
    # An engine with nothing in flight has no series left (no stale ids pile up).
    assert 'sage:engine_in_flight{engine="e1"}' not in metrics.render().decode()


def test_render_of_named_families_is_those_lines_of_the_whole_text(clock: Clock) -> None:
    from sage.services.scheduler.load import EngineLoadTracker

    load = EngineLoadTracker()
    breakers = CircuitBreakers(1, 5.0, clock=clock)
    metrics = SchedulerMetrics(
        clock=clock, breakers=breakers, in_flight=load.in_flight_by_engine, loads=load.loads
    )
    for engine in ("e1", "e2", "e3"):
        metrics.observe(QueuedRequest(model="m"), engine, 0.3, ttft_s=0.1, completion_tokens=5)
    breakers.begin("e1")
    wanted = ("sage:engine_in_flight", "sage:scheduler_generation_tokens_per_second")
    with load.track("e2"):
        whole, part = metrics.render().decode(), metrics.render(wanted).decode()

    def lines_of(text: str) -> list[str]:
        """The samples and # HELP / # TYPE lines of the wanted families."""
        return [
            line
            for line in text.splitlines()
            if line.removeprefix("# HELP ").removeprefix("# TYPE ").startswith(wanted)
        ]

    assert lines_of(part) == part.splitlines()  # nothing else: no histograms, no breakers
    assert part.splitlines() == lines_of(whole)
    assert 'sage:engine_in_flight{engine="e2"} 1.0' in part
    assert len(part) * 20 < len(whole)


def test_named_families_do_not_read_the_other_per_engine_gauges(clock: Clock) -> None:
    # A line per engine each: the dashboard sampler's two gauges every 2 s must not build
    # the routing-load and capacity families of 10,000 engines only to drop them.
    reads: list[str] = []

    def reader(name: str) -> Callable[[], dict[str, int]]:
        def read() -> dict[str, int]:
            reads.append(name)
            return {"e1": 1}

        return read

    metrics = SchedulerMetrics(
        clock=clock,
        in_flight=reader("in_flight"),
        loads=reader("loads"),
        capacities=reader("capacities"),
    )
    part = metrics.render(("sage:engine_in_flight",)).decode()
    assert reads == ["in_flight"]
    assert 'sage:engine_in_flight{engine="e1"} 1.0' in part
    whole = metrics.render().decode()
    assert reads[1:] == ["in_flight", "loads", "capacities"]
    assert 'sage:engine_capacity{engine="e1"} 1.0' in whole
