from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from sage.services.scheduler.load import EngineLoadTracker, parse_queue_depth
from sage.services.scheduler.registry import EngineKind, EngineRecord

METRICS = """# HELP vllm:num_requests_running Requests in the running batch.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 3.0
vllm:num_requests_waiting{model_name="m"} 2.0
vllm:num_requests_waiting_by_reason{model_name="m",reason="x"} 9.0
vllm:gpu_cache_usage_perc{model_name="m"} 0.5
"""


def test_parse_queue_depth_sums_running_and_waiting_only() -> None:
    assert parse_queue_depth(METRICS) == 5.0  # not the longer name sharing the prefix
    assert parse_queue_depth("garbage\nvllm:num_requests_running oops\n") == 0.0


def test_parse_queue_depth_sums_vllm_engine_cores() -> None:
    # vLLM 0.32+: every series carries `engine` (one per engine core with data parallel)
    text = (
        'vllm:num_requests_running{engine="0",model_name="m"} 2.0\n'
        'vllm:num_requests_running{engine="1",model_name="m"} 1.0\n'
        'vllm:num_requests_waiting{engine="0",model_name="m"} 4.0\n'
        'vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="capacity"} 3.0\n'
        'vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="deferred"} 1.0\n'
    )
    assert parse_queue_depth(text) == 7.0


def test_track_counts_and_forgets_at_zero() -> None:
    tracker = EngineLoadTracker()
    with tracker.track("a"), tracker.track("a"):
        assert tracker.in_flight("a") == 2
        assert tracker.load("a") == 2.0
    assert tracker.in_flight("a") == 0
    assert tracker._in_flight == {}
    with pytest.raises(RuntimeError), tracker.track("b"):
        raise RuntimeError("engine call failed")
    assert tracker.in_flight("b") == 0


def test_reported_queue_counts_only_beyond_our_own_requests() -> None:
    tracker = EngineLoadTracker()
    with tracker.track("a"):
        tracker.report("a", 5.0)  # 1 of those 5 is ours
        assert tracker.load("a") == 5.0
    assert tracker.load("a") == 4.0  # ours finished; the 4 from elsewhere remain
    tracker.retain(["b"])
    assert tracker.load("a") == 0.0


@pytest.fixture
async def metrics_url() -> AsyncIterator[str]:
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=METRICS)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


def _engine(engine_id: str, url: str) -> EngineRecord:
    return EngineRecord(engine_id, "m", EngineKind.LLM, url)


async def test_scrape_reads_engines_and_forgets_vanished_or_dead_ones(metrics_url: str) -> None:
    tracker = EngineLoadTracker(scrape_timeout_s=2.0)
    try:
        await tracker.scrape_once([_engine("up", metrics_url), _engine("old", metrics_url)])
        assert tracker.load("up") == 5.0 and tracker.load("old") == 5.0
        await tracker.scrape_once(
            [_engine("up", metrics_url), _engine("dead", "http://127.0.0.1:1")]
        )
        assert tracker.load("up") == 5.0
        assert tracker.load("old") == 0.0  # deregistered: forgotten
        assert tracker.load("dead") == 0.0  # unreachable: no stale report kept
    finally:
        await tracker.aclose()


async def test_background_scraper_polls_until_closed(metrics_url: str) -> None:
    tracker = EngineLoadTracker(scrape_interval_s=0.05)
    tracker.start(lambda: [_engine("up", metrics_url)])
    for _ in range(100):
        if tracker.load("up"):
            break
        await asyncio.sleep(0.02)
    assert tracker.load("up") == 5.0
    await tracker.aclose()
    assert tracker._task is None and tracker._http.idle_count() == 0


def test_capacity_is_what_a_full_engine_runs_and_is_probed_upward() -> None:
    from sage.engines.vllm_metrics import VllmLoad
    from sage.services.scheduler.load import PROBE_AFTER_SCRAPES, CapacityEstimate

    tracker = EngineLoadTracker()
    assert tracker.capacity("e") == 0  # unknown until the engine is seen full
    tracker.observe("e", VllmLoad(running=3, waiting=0), ceiling=256)
    assert tracker.capacity("e") == 0  # busy is not full
    tracker.observe("e", VllmLoad(running=4, waiting=5), ceiling=256)
    assert tracker.capacity("e") == 4
    # Running at the estimate with nothing waiting, scrape after scrape: probe one higher,
    # then two (the step doubles while probes succeed), never past the ceiling.
    estimate = CapacityEstimate(value=4)
    for _ in range(PROBE_AFTER_SCRAPES):
        estimate.observe(4, 0, ceiling=256)
    assert estimate.value == 5
    for _ in range(PROBE_AFTER_SCRAPES):
        estimate.observe(5, 0, ceiling=256)
    assert estimate.value == 7
    estimate.observe(6, 1, ceiling=256)  # a request waits: 6 is all it runs
    assert (estimate.value, estimate.step) == (6, 1)
    estimate.observe(200, 3, ceiling=8)
    assert estimate.value == 8
    tracker.retain([])  # deregistered: measured afresh if it comes back
    assert tracker.capacity("e") == 0
