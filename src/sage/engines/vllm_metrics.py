"""vLLM's request metrics under vLLM's names, labels and buckets: written by the engines this
project ships (on a registry private to one app, so several apps can share a process), and
read back from any vLLM's `/metrics` by the scheduler's load view and lifecycle's drain.

Names and labels follow vLLM 0.32/0.33 (`vllm/v1/metrics/loggers.py`): every series carries
`model_name` and `engine` (the engine-core index, "0" without data parallelism).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlencode

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# vLLM's own bucket boundaries, so dashboards and SLO maths read the same.
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
    2560.0,
)
TPOT_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
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
)
E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)


# vLLM's FinishReason values; vLLM exports a request_success series for each one.
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
# vLLM's num_requests_waiting_by_reason reasons (their sum is num_requests_waiting).
WAITING_REASONS = ("capacity", "deferred")

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_CACHE_USAGE = "vllm:kv_cache_usage_perc"
# vLLM before 0.10 called it this; still read so older engines keep their readings.
KV_CACHE_USAGE_OLD = "vllm:gpu_cache_usage_perc"
# SGLang's scheduler gauges (sglang/srt/observability/metrics_collector.py, 0.5): the same
# three readings under its names; token_usage is, like vLLM's, a 0..1 fraction of the pool.
SGLANG_RUNNING = "sglang:num_running_reqs"
SGLANG_WAITING = "sglang:num_queue_reqs"
SGLANG_TOKEN_USAGE = "sglang:token_usage"
_READ = frozenset(
    (
        RUNNING,
        WAITING,
        KV_CACHE_USAGE,
        KV_CACHE_USAGE_OLD,
        SGLANG_RUNNING,
        SGLANG_WAITING,
        SGLANG_TOKEN_USAGE,
    )
)
# Where read_load's series are scraped. vLLM 0.32 serves its registry twice: at /metrics
# (prometheus-fastapi-instrumentator's route: the whole page, ~66 KB, whatever the query)
# and at /metrics/ (prometheus_client's ASGI app, which keeps only the series named by
# `name[]`: ~0.7 KB). The sim answers both the same way. A server without the second answers
# 404 (or redirects) there, and the scheduler falls back to WHOLE_METRICS_PATH; SGLang mounts
# prometheus_client's app on both /metrics and /metrics/, so `name[]` is honoured; one that
# ignores `name[]` sends its whole page, which read_load reads the same. No Accept-Encoding
# goes out: gzip would cost both sides CPU to save loopback bytes.
LOAD_METRICS_PATH = "/metrics/?" + urlencode([("name[]", name) for name in sorted(_READ)])
WHOLE_METRICS_PATH = "/metrics"


class VllmRequestMetrics:
    """Running/waiting gauges, token counters, TTFT/inter-token/per-request TPOT/e2e/queue
    histograms and finished-request counters, labelled as vLLM labels them."""

    def __init__(
        self,
        name: str,
        running: Callable[[], float],
        waiting: Callable[[], float],
        *,
        running_help: str,
        waiting_help: str,
        queue_help: str,
        finish_reasons: Iterable[str] = FINISH_REASONS,
        engine: str = "0",
    ) -> None:
        self.registry = reg = CollectorRegistry()
        self.name = name
        self.engine = engine
        # vLLM's exposition lists labels sorted (engine before model_name); so does ours,
        # so a text match written against one reads the other.
        self.label = label = ("engine", "model_name")
        self.values = values = {"engine": engine, "model_name": name}
        self.gauge(RUNNING, running_help, running)
        self.gauge(WAITING, waiting_help, waiting)
        # Every waiting request here waits for a batch slot: vLLM's "capacity" reason.
        by_reason = Gauge(
            "vllm:num_requests_waiting_by_reason",
            "Number of waiting requests by reason (capacity: waiting for a batch slot; "
            "deferred: held back by a transient constraint). Their sum is "
            "vllm:num_requests_waiting.",
            (*label, "reason"),
            registry=reg,
        )
        by_reason.labels(reason="capacity", **values).set_function(waiting)
        by_reason.labels(reason="deferred", **values).set(0)
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prefilled prompt tokens.", label, registry=reg
        ).labels(**values)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Generated tokens.", label, registry=reg
        ).labels(**values)

        def histogram(metric: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(metric, doc, label, buckets=buckets, registry=reg).labels(**values)

        self.ttft = histogram(
            "vllm:time_to_first_token_seconds",
            "Arrival to first token, queueing included.",
            TTFT_BUCKETS,
        )
        # vLLM 0.32 split the old time_per_output_token_seconds in two: one observation
        # per token gap, and one per request (its mean gap).
        self.inter_token = histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            TPOT_BUCKETS,
        )
        self.tpot = histogram(
            "vllm:request_time_per_output_token_seconds",
            "Mean time per output token after the first (one observation per request).",
            TPOT_BUCKETS,
        )
        self.e2e = histogram(
            "vllm:e2e_request_latency_seconds", "Arrival to last token.", E2E_BUCKETS
        )
        self.queue_time = histogram("vllm:request_queue_time_seconds", queue_help, E2E_BUCKETS)
        success = Counter(
            "vllm:request_success",
            "Requests that finished.",
            ("engine", "finished_reason", "model_name"),
            registry=reg,
        )
        reasons = dict.fromkeys((*FINISH_REASONS, *finish_reasons))
        self._success = {
            reason: success.labels(finished_reason=reason, **values) for reason in reasons
        }

    def gauge(self, metric: str, doc: str, read: Callable[[], float]) -> None:
        """A gauge read at scrape time."""
        Gauge(metric, doc, self.label, registry=self.registry).labels(**self.values).set_function(
            read
        )

    def finished(self, reason: str) -> None:
        """Count a finished request by its finish reason."""
        self._success[reason].inc()


# -- reading a vLLM /metrics page -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VllmLoad:
    """What a vLLM /metrics page says about load, summed over its engine-core series."""

    running: float = 0.0
    waiting: float = 0.0
    kv_cache_usage: float | None = None  # the fullest engine core's; None if not exported

    @property
    def queued(self) -> float:
        """Requests running or waiting."""
        return self.running + self.waiting


# One of _READ at the start of a line, its labels if any, then its value: the name must end
# at `{` or a space, so `..._waiting_by_reason` is not read as `..._waiting`. A regex over
# the page, not a split into lines: a vLLM page is hundreds of histogram lines, and the
# scheduler reads one per engine every few seconds.
_READ_LINE = re.compile(
    r"^(vllm:(?:num_requests_running|num_requests_waiting|kv_cache_usage_perc"
    r"|gpu_cache_usage_perc)|sglang:(?:num_running_reqs|num_queue_reqs|token_usage))"
    r"(\{[^\n]*\})?[ \t]+([^ \t\n]+)",
    re.MULTILINE,
)
# SGLang with pipeline parallelism: every stage's scheduler reports the same requests; only
# stage 0's series are counted (data-parallel ranks, each its own requests, are summed).
_LATER_PP_STAGE = re.compile(r'pp_rank="(?!0")')


_SGLANG_AS_VLLM = {
    SGLANG_RUNNING: RUNNING,
    SGLANG_WAITING: WAITING,
    SGLANG_TOKEN_USAGE: KV_CACHE_USAGE,
}


def read_load(text: str) -> VllmLoad:
    """Parse vLLM's (or SGLang's) running/waiting gauges and KV-cache usage from a
    Prometheus exposition.

    Names match exactly, so `vllm:num_requests_waiting_by_reason` (whose sum already is
    `vllm:num_requests_waiting`) is never added twice; series of several engine cores or
    models are summed. Unparsable lines are skipped: a scrape never fails on them.
    """
    running = waiting = 0.0
    usage: float | None = None
    old_usage: float | None = None
    for match in _READ_LINE.finditer(text):
        name, labels, raw = match.groups()
        try:
            value = float(raw)
        except ValueError:
            continue
        if name.startswith("sglang:"):
            if labels and _LATER_PP_STAGE.search(labels):
                continue
            name = _SGLANG_AS_VLLM[name]
        if name == RUNNING:
            running += value
        elif name == WAITING:
            waiting += value
        elif name == KV_CACHE_USAGE:
            usage = value if usage is None else max(usage, value)
        else:
            old_usage = value if old_usage is None else max(old_usage, value)
    return VllmLoad(running, waiting, usage if usage is not None else old_usage)
