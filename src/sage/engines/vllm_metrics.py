"""vLLM's request metrics under vLLM's names and buckets, for the engines this project ships,
on a registry private to one app so several apps can share a process (tests)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

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


class VllmRequestMetrics:
    """Running/waiting gauges, token counters, TTFT/TPOT/e2e/queue-time histograms and
    finished-request counters, all labelled with the served model name."""

    def __init__(
        self,
        name: str,
        running: Callable[[], float],
        waiting: Callable[[], float],
        *,
        running_help: str,
        waiting_help: str,
        queue_help: str,
        finish_reasons: Iterable[str],
    ) -> None:
        self.registry = reg = CollectorRegistry()
        self.name = name
        self.label = label = ("model_name",)
        self.gauge("vllm:num_requests_running", running_help, running)
        self.gauge("vllm:num_requests_waiting", waiting_help, waiting)
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prefilled prompt tokens.", label, registry=reg
        ).labels(model_name=name)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Generated tokens.", label, registry=reg
        ).labels(model_name=name)

        def histogram(metric: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(metric, doc, label, buckets=buckets, registry=reg).labels(
                model_name=name
            )

        self.ttft = histogram(
            "vllm:time_to_first_token_seconds",
            "Arrival to first token, queueing included.",
            TTFT_BUCKETS,
        )
        self.tpot = histogram(
            "vllm:time_per_output_token_seconds",
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
            ("model_name", "finished_reason"),
            registry=reg,
        )
        self._success = {
            reason: success.labels(model_name=name, finished_reason=reason)
            for reason in finish_reasons
        }

    def gauge(self, metric: str, doc: str, read: Callable[[], float]) -> None:
        """A gauge read at scrape time."""
        Gauge(metric, doc, self.label, registry=self.registry).labels(
            model_name=self.name
        ).set_function(read)

    def finished(self, reason: str) -> None:
        """Count a finished request by its finish reason."""
        self._success[reason].inc()
