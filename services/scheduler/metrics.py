"""The scheduler's request metrics: latency, TTFT, TPOT, throughput, queue depth and SLO
attainment per model, engine, request class and tenant; Prometheus text in a private
registry, named like vLLM's where they overlap.

Recording a request costs a few dict operations, deque appends and bisects on the event
loop's thread; percentiles are computed from bounded windows of recent samples at read
time (or at most once per few samples for `predict`).
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .breaker import BreakerState, CircuitBreakers
from .policies import QueuedRequest

LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0,
    320.0, 640.0,
)  # fmt: skip
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
)  # fmt: skip
TPOT_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
OTHER = "other"
MAX_TENANTS = 256
WINDOW = 1024  # recent samples kept per model for percentiles
RATE_WINDOW_S = 60  # sliding window for requests/s and tokens/s
_PREDICT_REFRESH = 16  # recompute a model's predicted service time every this many samples

Key = tuple[str, str, str, str]  # model, engine, request class, tenant
_IN_FLIGHT = "sage:engine_in_flight"
_ROUTING_LOAD = "sage:engine_routing_load"
_CAPACITY = "sage:engine_capacity"
_BREAKER = frozenset(
    (
        "sage:engine_circuit_open",
        "sage:engine_attempts",
        "sage:engine_failures",
        "sage:engine_circuit_probes",
    )
)


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1]) of an ascending sequence; 0 when empty."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


class _Histogram:
    """Per-bucket (non-cumulative) counts plus the sum, for one label set."""

    __slots__ = ("counts", "total")

    def __init__(self, size: int) -> None:
        self.counts = [0] * (size + 1)  # the last slot is +Inf
        self.total = 0.0

    def observe(self, bounds: Sequence[float], value: float) -> None:
        self.counts[bisect_left(bounds, value)] += 1
        self.total += value

    def cumulative(self, bounds: Sequence[float]) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*bounds, math.inf), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == math.inf else repr(bound), float(running)))
        return out


@dataclass(frozen=True)
class ModelSummary:
    """Recent figures for one model (GetMetrics, the management status page)."""

    model: str
    p50_s: float
    p95_s: float
    p99_s: float
    ttft_p50_s: float
    tpot_p50_s: float
    rps: float
    tokens_per_s: float
    slo_attainment: float


@dataclass
class _ModelWindow:
    """Bounded recent samples and sliding-window counts for one model."""

    e2e: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    ttft: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    tpot: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    # One slot per second of the rate window: [second, requests, tokens].
    seconds: list[list[int]] = field(
        default_factory=lambda: [[-1, 0, 0] for _ in range(RATE_WINDOW_S)]
    )
    slo_total: int = 0
    slo_met: int = 0
    samples: int = 0
    predicted: float = 0.0
    predicted_at: int = -_PREDICT_REFRESH


class SchedulerMetrics(Collector):
    """Records finished requests and exports them (Prometheus collector + summaries)."""

    def __init__(
        self,
        *,
        max_tenants: int = MAX_TENANTS,
        clock: Callable[[], float] = time.monotonic,
        queue_depth: Callable[[], int] | None = None,
        breakers: CircuitBreakers | None = None,
        in_flight: Callable[[], Mapping[str, int]] | None = None,
        loads: Callable[[], Mapping[str, float]] | None = None,
        capacities: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        self.max_tenants = max_tenants
        self.clock = clock
        self.queue_depth = queue_depth
        self.breakers = breakers
        self.in_flight = in_flight  # engine id -> requests this scheduler has on it now
        self.loads = loads  # engine id -> the load routing sees (in flight + engine-reported)
        self.capacities = capacities  # engine id -> requests admission lets it have at once
        self._tenants: set[str] = set()
        self._latency: dict[Key, _Histogram] = {}
        self._ttft: dict[Key, _Histogram] = {}
        self._tpot: dict[Key, _Histogram] = {}
        self._models: dict[str, _ModelWindow] = {}
        self._status: dict[str, int] = {"ok": 0, "error": 0}
        self._failovers: dict[str, int] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def tenant_label(self, tenant: str) -> str:
        """The tenant itself for the first `max_tenants` seen, `other` after that."""
        if tenant in self._tenants:
            return tenant
        if len(self._tenants) < self.max_tenants:
            self._tenants.add(tenant)
            return tenant
        return OTHER

    def failed(self) -> None:
        """Count one request that failed (no latency recorded)."""
        self._status["error"] += 1

    def failover(self, kind: str) -> None:
        """Count one request moved to another engine after its engine failed (`unary`,
        `stream_start` before any chunk, `stream` continued mid-way)."""
        self._failovers[kind] = self._failovers.get(kind, 0) + 1

    def observe(
        self,
        item: QueuedRequest,
        engine_id: str,
        e2e_s: float,
        *,
        ttft_s: float | None = None,
        completion_tokens: int = 0,
        finished_at: float | None = None,
    ) -> None:
        """Record one successful request: `item` names model, class, tenant and deadline;
        `finished_at` is on the clock the deadline uses (defaults to now)."""
        self._status["ok"] += 1
        key = (item.model, engine_id, item.request_class.value, self.tenant_label(item.tenant))
        histogram = self._latency.get(key)
        if histogram is None:
            histogram = self._latency[key] = _Histogram(len(LATENCY_BUCKETS))
        histogram.observe(LATENCY_BUCKETS, e2e_s)
        window = self._models.get(item.model)
        if window is None:
            window = self._models[item.model] = _ModelWindow()
        window.e2e.append(e2e_s)
        window.samples += 1
        if ttft_s is not None:
            self._histogram(self._ttft, key, TTFT_BUCKETS).observe(TTFT_BUCKETS, ttft_s)
            window.ttft.append(ttft_s)
            if completion_tokens > 1:
                tpot = (e2e_s - ttft_s) / (completion_tokens - 1)
                self._histogram(self._tpot, key, TPOT_BUCKETS).observe(TPOT_BUCKETS, tpot)
                window.tpot.append(tpot)
        now = self.clock()
        second = int(now)
        slot = window.seconds[second % RATE_WINDOW_S]
        if slot[0] != second:
            slot = window.seconds[second % RATE_WINDOW_S] = [second, 0, 0]
        slot[1] += 1
        slot[2] += completion_tokens
        if item.deadline is not None:
            window.slo_total += 1
            if (now if finished_at is None else finished_at) <= item.deadline:
                window.slo_met += 1

    @staticmethod
    def _histogram(table: dict[Key, _Histogram], key: Key, bounds: Sequence[float]) -> _Histogram:
        histogram = table.get(key)
        if histogram is None:
            histogram = table[key] = _Histogram(len(bounds))
        return histogram

    def predict(self, item: QueuedRequest) -> float:
        """Predicted service time in seconds for the item's model: the recent median
        end-to-end latency, 0 when nothing is known (the SLO-aware policy's predictor)."""
        window = self._models.get(item.model)
        if window is None or not window.e2e:
            return 0.0
        if window.samples - window.predicted_at >= _PREDICT_REFRESH:
            window.predicted = percentile(sorted(window.e2e), 0.5)
            window.predicted_at = window.samples
        return window.predicted

    def slo_attainment(self, model: str) -> float:
        """Fraction of the model's requests with a deadline that met it (1 when none had)."""
        window = self._models.get(model)
        if window is None or not window.slo_total:
            return 1.0
        return window.slo_met / window.slo_total

    def summaries(self) -> list[ModelSummary]:
        """Percentiles, throughput and SLO attainment of every model seen."""
        now_second = int(self.clock())
        out: list[ModelSummary] = []
        for model, window in sorted(self._models.items()):
            e2e = sorted(window.e2e)
            requests = tokens = 0
            for second, count, toks in window.seconds:
                if now_second - RATE_WINDOW_S < second <= now_second:
                    requests += count
                    tokens += toks
            out.append(
                ModelSummary(
                    model=model,
                    p50_s=percentile(e2e, 0.5),
                    p95_s=percentile(e2e, 0.95),
                    p99_s=percentile(e2e, 0.99),
                    ttft_p50_s=percentile(sorted(window.ttft), 0.5),
                    tpot_p50_s=percentile(sorted(window.tpot), 0.5),
                    rps=requests / RATE_WINDOW_S,
                    tokens_per_s=tokens / RATE_WINDOW_S,
                    slo_attainment=self.slo_attainment(model),
                )
            )
        return out

    def collect(self) -> Iterator[Metric]:
        """The metric families, built from the counts at scrape time."""
        return self._families(None)

    def _families(self, wanted: frozenset[str] | None) -> Iterator[Metric]:
        """The families named in `wanted` (None: all); the per-engine histograms and breaker
        counters, thousands of lines at a thousand engines, are built only when asked for."""
        for family in self._all_families(wanted):
            if wanted is None or family.name in wanted:
                yield family

    def _all_families(self, wanted: frozenset[str] | None) -> Iterator[Metric]:
        labels = ("model", "engine", "class", "tenant")
        for name, doc, table, bounds in (
            (
                "sage:scheduler_request_latency_seconds",
                "Scheduler request latency, arrival to last byte from the engine.",
                self._latency,
                LATENCY_BUCKETS,
            ),
            (
                "sage:scheduler_time_to_first_token_seconds",
                "Streamed requests: scheduler arrival to the first payload from the engine.",
                self._ttft,
                TTFT_BUCKETS,
            ),
            (
                "sage:scheduler_time_per_output_token_seconds",
                "Streamed requests with usage: (e2e - ttft) / (completion tokens - 1).",
                self._tpot,
                TPOT_BUCKETS,
            ),
        ):
            if wanted is not None and name not in wanted:
                continue
            family = HistogramMetricFamily(name, doc, labels=labels)
            for key, histogram in list(table.items()):
                family.add_metric(key, histogram.cumulative(bounds), histogram.total)
            yield family
        requests = CounterMetricFamily(
            "sage:scheduler_requests",
            "Requests the scheduler finished, by status.",
            labels=["status"],
        )
        for status, count in self._status.items():
            requests.add_metric((status,), float(count))
        yield requests
        failovers = CounterMetricFamily(
            "sage:scheduler_failovers",
            "Requests moved to another engine after theirs failed, by kind.",
            labels=["kind"],
        )
        for kind, count in self._failovers.items():
            failovers.add_metric((kind,), float(count))
        yield failovers
        if self.queue_depth is not None:
            yield GaugeMetricFamily(
                "sage:scheduler_queue_depth",
                "Requests waiting for an engine slot.",
                value=self.queue_depth(),
            )
        summaries = self.summaries()
        slo = GaugeMetricFamily(
            "sage:scheduler_slo_attainment_ratio",
            "Fraction of requests with a deadline that finished by it.",
            labels=["model"],
        )
        rps = GaugeMetricFamily(
            "sage:scheduler_requests_per_second",
            f"Successful requests per second over the last {RATE_WINDOW_S} s.",
            labels=["model"],
        )
        tps = GaugeMetricFamily(
            "sage:scheduler_generation_tokens_per_second",
            f"Completion tokens per second over the last {RATE_WINDOW_S} s.",
            labels=["model"],
        )
        for summary in summaries:
            slo.add_metric((summary.model,), summary.slo_attainment)
            rps.add_metric((summary.model,), summary.rps)
            tps.add_metric((summary.model,), summary.tokens_per_s)
        # The ratio above covers the scheduler's whole life; these counters let alerts and
        # dashboards take it over a window: rate(met) / rate(met + missed).
        outcomes = CounterMetricFamily(
            "sage:scheduler_slo_requests",
            "Finished requests with a deadline, by model and whether they met it.",
            labels=["model", "outcome"],
        )
        for model, window in sorted(self._models.items()):
            if window.slo_total:
                outcomes.add_metric((model, "met"), float(window.slo_met))
                outcomes.add_metric((model, "missed"), float(window.slo_total - window.slo_met))
        yield slo
        yield outcomes
        yield rps
        yield tps
        if self.breakers is not None and (wanted is None or not wanted.isdisjoint(_BREAKER)):
            yield from self._breaker_families(self.breakers)
        # The per-engine gauges below are a line per engine: built only when asked for (the
        # edge's dashboard sampler asks for in-flight every 2 s; capacities alone cost ~20 ms
        # of this loop at 10,000 engines, bench/RESULTS.md, issue 21).
        if self.in_flight is not None and (wanted is None or _IN_FLIGHT in wanted):
            # What the engine's own gauges say can lag by seconds on a busy host (its API
            # server answers /metrics between tokens); this is exact, from this side.
            busy = GaugeMetricFamily(
                _IN_FLIGHT,
                "Requests the scheduler has in flight to the engine now.",
                labels=["engine"],
            )
            for engine_id, count in sorted(self.in_flight().items()):
                busy.add_metric((engine_id,), float(count))
            yield busy
        if self.loads is not None and (wanted is None or _ROUTING_LOAD in wanted):
            seen = GaugeMetricFamily(
                _ROUTING_LOAD,
                "The engine's load as load-aware routing sees it: requests in flight from "
                "here plus what the engine's last /metrics scrape reported beyond those.",
                labels=["engine"],
            )
            for engine_id, value in sorted(self.loads().items()):
                seen.add_metric((engine_id,), value)
            yield seen
        if self.capacities is not None and (wanted is None or _CAPACITY in wanted):
            cap = GaugeMetricFamily(
                _CAPACITY,
                "Requests admission lets the engine have in flight (declared, measured from "
                "its /metrics, or the backend's default; 0: no cap); the rest wait here.",
                labels=["engine"],
            )
            for engine_id, value in sorted(self.capacities().items()):
                cap.add_metric((engine_id,), float(value))
            yield cap

    @staticmethod
    def _breaker_families(breakers: CircuitBreakers) -> Iterator[Metric]:
        opened = GaugeMetricFamily(
            "sage:engine_circuit_open",
            "1 while the engine's circuit breaker is open or half-open, else 0.",
            labels=["engine"],
        )
        attempts = CounterMetricFamily(
            "sage:engine_attempts", "Calls the scheduler made to the engine.", labels=["engine"]
        )
        failures = CounterMetricFamily(
            "sage:engine_failures",
            "Engine calls that failed (unreachable, timeout, 5xx).",
            labels=["engine"],
        )
        probes = CounterMetricFamily(
            "sage:engine_circuit_probes",
            "Half-open probe requests sent to the engine.",
            labels=["engine"],
        )
        for engine_id, breaker in list(breakers.engines.items()):
            state = breakers.state(engine_id)
            opened.add_metric((engine_id,), float(state is not BreakerState.CLOSED))
            attempts.add_metric((engine_id,), float(breaker.attempts))
            failures.add_metric((engine_id,), float(breaker.failures))
            probes.add_metric((engine_id,), float(breaker.probes))
        yield opened
        yield attempts
        yield failures
        yield probes

    def render(self, families: Collection[str] = ()) -> bytes:
        """The Prometheus text exposition of the registry, or of only the named `families`
        (a periodic reader that needs two gauges: the whole text is ~2.6 MB and ~200 ms of
        this loop at 1024 engines with traffic on each; bench/RESULTS.md, item 7)."""
        if not families:
            return generate_latest(self.registry)
        return generate_latest(_Fixed(list(self._families(frozenset(families)))))


class _Fixed(Collector):
    """Families already built, as a collector generate_latest can render."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        """The families given."""
        return iter(self.families)
