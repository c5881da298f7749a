"""The edge's Prometheus collector: text exposition, buckets, bounded model labels."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from sage.services.edge.metrics import MAX_MODELS, OTHER_MODEL, EdgeMetrics


def _samples(metrics: EdgeMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _labels(**kw: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(kw.items()))


def test_latency_histogram_and_request_counts() -> None:
    metrics = EdgeMetrics()
    metrics.in_flight_gauge(lambda: 3)
    for seconds in (0.002, 0.02, 3.0):
        metrics.observe_request("POST", "/v1/chat/completions", "sim", 200, seconds)
    metrics.observe_request("POST", "/v1/chat/completions", "sim", 400, 0.001)
    samples = _samples(metrics)
    ok = {"method": "POST", "route": "/v1/chat/completions", "model": "sim", "status": "200"}
    assert samples[("sage:requests_total", _labels(**ok))] == 3
    assert samples[("sage:e2e_request_latency_seconds_count", _labels(**ok))] == 3
    assert abs(samples[("sage:e2e_request_latency_seconds_sum", _labels(**ok))] - 3.022) < 1e-9
    assert samples[("sage:e2e_request_latency_seconds_bucket", _labels(**ok, le="0.0025"))] == 1
    assert samples[("sage:e2e_request_latency_seconds_bucket", _labels(**ok, le="0.025"))] == 2
    assert samples[("sage:e2e_request_latency_seconds_bucket", _labels(**ok, le="+Inf"))] == 3
    bad = {**ok, "status": "400"}
    assert samples[("sage:requests_total", _labels(**bad))] == 1
    assert samples[("sage:num_requests_running", ())] == 3
    assert any(name.startswith("process_") for name, _ in samples)


def test_ttft_histogram() -> None:
    metrics = EdgeMetrics()
    metrics.observe_ttft("sim", 0.05)
    samples = _samples(metrics)
    assert samples[("sage:time_to_first_token_seconds_count", _labels(model="sim"))] == 1
    assert (
        samples[("sage:time_to_first_token_seconds_bucket", _labels(model="sim", le="0.04"))] == 0
    )
    assert (
        samples[("sage:time_to_first_token_seconds_bucket", _labels(model="sim", le="0.06"))] == 1
    )


def test_model_names_from_failures_cannot_grow_the_series() -> None:
    metrics = EdgeMetrics()
    for i in range(50):
        metrics.observe_request("POST", "/v1/chat/completions", f"typo-{i}", 404, 0.001)
    metrics.observe_request("POST", "/v1/chat/completions", "real", 200, 0.001)
    metrics.observe_request("POST", "/v1/chat/completions", "real", 404, 0.001)
    models = {
        dict(labels)["model"] for name, labels in _samples(metrics) if name == "sage:requests_total"
    }
    assert models == {OTHER_MODEL, "real"}


def test_successful_models_are_capped() -> None:
    metrics = EdgeMetrics()
    for i in range(MAX_MODELS + 10):
        metrics.observe_request("POST", "/v1/completions", f"m{i}", 200, 0.001)
    models = {
        dict(labels)["model"] for name, labels in _samples(metrics) if name == "sage:requests_total"
    }
    assert len(models) == MAX_MODELS + 1 and OTHER_MODEL in models
