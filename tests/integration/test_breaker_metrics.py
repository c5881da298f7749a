"""Circuit breaker and scheduler metrics through the real edge and scheduler: a dead engine
is skipped once its breaker opens and probed after the cool-down; the edge's /metrics and
management status carry the scheduler's figures."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from sage.common.config.settings import SageSettings
from sage.common.http.testing import quiet_server, serve_in_task
from sage.services.edge.app import create_app

FAILURES = 3
COOLDOWN_S = 1.0
BODY = {"model": "sim", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def settings(settings: SageSettings) -> SageSettings:
    """A breaker that opens after 3 failures and cools down for one second."""
    return settings.model_copy(
        update={
            "scheduler_breaker_failures": FAILURES,
            "scheduler_breaker_cooldown_s": COOLDOWN_S,
        }
    )


async def _scrape(control_plane: Any) -> str:
    resp = await control_plane.client.get("/metrics")
    assert resp.status_code == 200
    return str(resp.text)


def _sample(text: str, name: str, engine: str) -> float:
    match = re.search(rf'^{re.escape(name)}{{engine="{engine}"}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


async def _chat(control_plane: Any, **extra: Any) -> None:
    resp = await control_plane.client.post("/v1/chat/completions", json={**BODY, **extra})
    assert resp.status_code == 200, resp.text


async def test_dead_engine_is_skipped_then_probed(
    control_plane: Any, sim_engine: Callable[..., str]
) -> None:
    await control_plane.register("live", "sim", sim_engine())
    await control_plane.register("dead", "sim", "http://127.0.0.1:1")

    # Every request succeeds (failover) until the dead engine's breaker opens.
    for _ in range(40):
        await _chat(control_plane)
        text = await _scrape(control_plane)
        if _sample(text, "sage:engine_circuit_open", "dead"):
            break
    assert _sample(text, "sage:engine_circuit_open", "dead") == 1.0
    assert _sample(text, "sage:engine_failures_total", "dead") == FAILURES
    attempts = _sample(text, "sage:engine_attempts_total", "dead")
    assert _sample(text, "sage:engine_circuit_open", "live") == 0.0

    # While it is open, nothing is sent to it (streams included).
    for i in range(6):
        await _chat(control_plane, stream=i % 2 == 0)
    text = await _scrape(control_plane)
    assert _sample(text, "sage:engine_attempts_total", "dead") == attempts
    assert _sample(text, "sage:engine_failures_total", "dead") == FAILURES

    # After the cool-down one probe goes through, fails, and the breaker re-opens.
    await asyncio.sleep(COOLDOWN_S + 0.1)
    for _ in range(10):
        await _chat(control_plane)
        text = await _scrape(control_plane)
        if _sample(text, "sage:engine_circuit_probes_total", "dead"):
            break
    assert _sample(text, "sage:engine_circuit_probes_total", "dead") == 1.0
    assert _sample(text, "sage:engine_failures_total", "dead") == FAILURES + 1
    assert _sample(text, "sage:engine_circuit_open", "dead") == 1.0
    for _ in range(4):
        await _chat(control_plane)
    text = await _scrape(control_plane)
    assert _sample(text, "sage:engine_attempts_total", "dead") == attempts + 1


async def test_edge_metrics_and_status_carry_scheduler_stats(
    control_plane: Any, sim_engine: Callable[..., str]
) -> None:
    await control_plane.register("live", "sim", sim_engine())
    for i in range(8):
        await _chat(control_plane, stream=i % 2 == 1)

    text = await _scrape(control_plane)
    assert "sage:e2e_request_latency_seconds" in text  # the edge's own metrics are still there
    assert re.search(r'sage:scheduler_request_latency_seconds_count\{[^}]*model="sim"', text)
    assert re.search(r'sage:scheduler_time_to_first_token_seconds_count\{[^}]*model="sim"', text)
    assert 'sage:scheduler_requests_total{status="ok"} 8.0' in text
    assert "sage:scheduler_queue_depth 0.0" in text

    resp = await control_plane.client.get("/v1/management/status")
    assert resp.status_code == 200, resp.text
    (stats,) = resp.json()["control_plane"]["metrics"]["models"]
    assert stats["model"] == "sim"
    assert 0 < stats["p50_ms"] <= stats["p95_ms"] <= stats["p99_ms"]
    assert stats["ttft_p50_ms"] > 0
    assert stats["rps"] > 0
    assert stats["slo_attainment"] == 1.0


async def test_edge_metrics_without_a_scheduler(
    settings: SageSettings, port_factory: Callable[[], int]
) -> None:
    """The edge's own metrics still come back when the scheduler cannot be reached."""
    app = create_app(settings.model_copy(update={"scheduler_addr": "127.0.0.1:1"}))
    port = port_factory()
    server = quiet_server(app, port)
    task = await serve_in_task(server)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            resp = await client.get("/metrics")
        assert resp.status_code == 200
        assert "sage:num_requests_running" in resp.text
        assert "sage:scheduler_" not in resp.text
    finally:
        server.should_exit = True
        await task
