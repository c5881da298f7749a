"""The edge's Prometheus metrics, in a private registry, named like vLLM's where they overlap.

Recording a request is one dict lookup, one bisect and two additions on the event loop's
thread (no locks, no label-object churn); everything else happens at scrape time.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

# Scheduler replicas by state and requests moved off a dead one by kind (None: not started).
ReplicaCounts = Callable[[], tuple[Mapping[str, int], Mapping[str, int]] | None]

# Seconds; the low end resolves the gateway's own overhead, the top reaches the request
# deadline. TTFT uses vLLM's buckets.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    320.0,
    640.0,
)
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
)
# A model label is only trusted once a request for it succeeded; names seen only in
# failures (typos, probes) are folded into one label so clients cannot grow the series.
OTHER_MODEL = "other"
MAX_MODELS = 512
CONTENT_TYPE = CONTENT_TYPE_LATEST.encode()
_STATUS = {code: str(code) for code in range(100, 600)}


class _Histogram:
    """Per-bucket (non-cumulative) counts plus the sum, for one label set."""

    __slots__ = ("counts", "total")

    def __init__(self, size: int) -> None:
        self.counts = [0] * (size + 1)  # the last slot is +Inf
        self.total = 0.0

    def cumulative(self, bounds: Sequence[float]) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return out


class EdgeMetrics(Collector):
    """Request latency/counts per method, route, model and status; TTFT; in-flight."""

    LABELS = ("method", "route", "model", "status")

    def __init__(self) -> None:
        self._requests: dict[tuple[str, str, str, str], _Histogram] = {}
        self._ttft: dict[str, _Histogram] = {}
        self._models: set[str] = set()
        self._in_flight: Callable[[], int] | None = None
        self._replicas: ReplicaCounts | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        ProcessCollector(registry=self.registry)

    def in_flight_gauge(self, read: Callable[[], int]) -> None:
        """Export `read()` (the app's in-flight count) as sage:num_requests_running."""
        self._in_flight = read

    def replicas_gauges(self, read: ReplicaCounts) -> None:
        """Export `read()` (scheduler replicas by state, requests moved off a dead one by
        kind; None before the edge started) as sage:edge_scheduler_replicas and
        sage:edge_scheduler_failovers_total."""
        self._replicas = read

    def _model_label(self, model: str, ok: bool) -> str:
        if not model or model in self._models:
            return model
        if ok and len(self._models) < MAX_MODELS:
            self._models.add(model)
            return model
        return OTHER_MODEL

    def observe_request(
        self, method: str, route: str, model: str, status: int, seconds: float
    ) -> None:
        """Record one finished request (the App's observer hook)."""
        if model and model not in self._models:
            model = self._model_label(model, status < 400)
        key = (method, route, model, _STATUS.get(status) or str(status))
        histogram = self._requests.get(key)
        if histogram is None:
            histogram = self._requests[key] = _Histogram(len(LATENCY_BUCKETS))
        histogram.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        histogram.total += seconds

    def observe_ttft(self, model: str, seconds: float) -> None:
        """Record the time from forwarding a streamed request to its first chunk."""
        label = self._model_label(model, True)
        histogram = self._ttft.get(label)
        if histogram is None:
            histogram = self._ttft[label] = _Histogram(len(TTFT_BUCKETS))
        histogram.counts[bisect_left(TTFT_BUCKETS, seconds)] += 1
        histogram.total += seconds

    def collect(self) -> Iterator[Metric]:
        """The metric families, built from the counts at scrape time."""
        latency = HistogramMetricFamily(
            "sage:e2e_request_latency_seconds",
            "Edge request latency, arrival to last byte sent (streams: to [DONE]).",
            labels=self.LABELS,
        )
        total = CounterMetricFamily(
            "sage:requests",
            "Requests the edge answered, by method, route, model and HTTP status.",
            labels=self.LABELS,
        )
        for key, histogram in list(self._requests.items()):
            latency.add_metric(key, histogram.cumulative(LATENCY_BUCKETS), histogram.total)
            total.add_metric(key, float(sum(histogram.counts)))
        ttft = HistogramMetricFamily(
            "sage:time_to_first_token_seconds",
            "Streamed requests: forwarded to the scheduler until the first chunk is back.",
            labels=("model",),
        )
        for model, histogram in list(self._ttft.items()):
            ttft.add_metric((model,), histogram.cumulative(TTFT_BUCKETS), histogram.total)
        yield latency
        yield total
        yield ttft
        if self._in_flight is not None:
            yield GaugeMetricFamily(
                "sage:num_requests_running",
                "Requests the edge is handling now (including streams being relayed).",
                value=self._in_flight(),
            )

        replicas = self._replicas() if self._replicas is not None else None
        if replicas is not None:
            states, failovers = replicas
            gauge = GaugeMetricFamily(
                "sage:edge_scheduler_replicas",
                "Scheduler replicas the edge knows, by state (down: probed until it answers).",
                labels=("state",),
            )
            for state, count in states.items():
                gauge.add_metric((state,), count)
            moved = CounterMetricFamily(
                "sage:edge_scheduler_failovers",
                "Requests moved to another scheduler replica after theirs died: unary, "
                "stream_start (nothing sent yet), stream (continued mid-way).",
                labels=("kind",),
            )
            for kind, count in failovers.items():
                moved.add_metric((kind,), count)
            yield gauge
            yield moved

    def render(self) -> bytes:
        """The Prometheus text exposition of the registry."""
        return generate_latest(self.registry)
