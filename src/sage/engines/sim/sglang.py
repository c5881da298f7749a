"""The sim's SGLang flavor (`--flavor sglang`): what SGLang serves differently from vLLM that
the control plane reads, so the scheduler and lifecycle can be exercised against it here,
where a real SGLang server (CUDA kernels) cannot run.

From SGLang 0.5.23's source: its scheduler exports load as `sglang:num_running_reqs`,
`sglang:num_queue_reqs` and `sglang:token_usage` (observability/metrics_collector.py), each
labelled engine_type / model_name / moe_ep_rank / pp_rank / tp_rank, on prometheus_client's
app mounted at /metrics and /metrics/ (utils/common.py add_prometheus_middleware: both honour
`name[]`); no `vllm:` series. Finished requests are counted in `sglang:num_requests_total`
(the sim does not split it by SGLang's is_streaming label). Health is /health and
/health_generate (entrypoints/http_server.py). The OpenAI routes and their error shape are
vLLM's, so they are shared.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from sage.engines.sim.model import AdmissionQueue

FLAVORS = ("vllm", "sglang")
RUNNING = "sglang:num_running_reqs"
WAITING = "sglang:num_queue_reqs"
TOKEN_USAGE = "sglang:token_usage"
# SGLang's label names (sorted, as prometheus_client writes them) with one-GPU values.
LABELS = ("engine_type", "model_name", "moe_ep_rank", "pp_rank", "tp_rank")
HEALTH_PATHS = ("/health", "/health_generate")


class _Finished(Collector):
    """`sglang:num_requests_total`, read at scrape time from the sim's own count."""

    def __init__(self, model: str, finished: Callable[[], float]) -> None:
        self._model = model
        self._finished = finished

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "sglang:num_requests", "Number of requests processed.", labels=["model_name"]
        )
        family.add_metric([self._model], self._finished())
        yield family


def sglang_registry(
    model: str, queue: AdmissionQueue, finished: Callable[[], float]
) -> CollectorRegistry:
    """SGLang's load gauges for one engine, read from its batch slots at scrape time, and
    its finished-request counter (`finished`: requests the sim has finished)."""
    registry = CollectorRegistry()
    registry.register(_Finished(model, finished))
    values = {
        "engine_type": "unified",
        "model_name": model,
        "moe_ep_rank": "0",
        "pp_rank": "0",
        "tp_rank": "0",
    }
    gauges = (
        (RUNNING, "The number of running requests.", lambda: float(queue.running)),
        (WAITING, "The number of requests in the waiting queue.", lambda: float(queue.waiting)),
        # No real KV pool: occupancy of the batch slots stands in for it, as in the vLLM flavor.
        (TOKEN_USAGE, "The token usage.", lambda: queue.running / queue.capacity),
    )
    for name, doc, read in gauges:
        Gauge(name, doc, LABELS, registry=registry).labels(**values).set_function(read)
    return registry
