from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from sage.engines.vllm_metrics import LOAD_METRICS_PATH, RUNNING, WAITING, VllmLoad, read_load
from sage.services.scheduler.load import EngineLoadTracker, parse_queue_depth
from sage.services.scheduler.registry import EngineKind, EngineRecord
from tests.conftest import SimFactory

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


# --- scrape budget: at most scrape_budget engines per second, oldest first, staggered ---


def _fleet(n: int) -> list[EngineRecord]:
    return [_engine(f"e{i}", "http://127.0.0.1:1") for i in range(n)]


def _run_ticks(
    tracker: EngineLoadTracker, engines: list[EngineRecord], seconds: float
) -> list[tuple[float, str]]:
    """Drive `due` on a fake clock every SCRAPE_TICK_S as the background loop would."""
    from sage.services.scheduler.load import SCRAPE_TICK_S

    picks: list[tuple[float, str]] = []
    for step in range(round(seconds / SCRAPE_TICK_S)):
        now = step * SCRAPE_TICK_S
        picks += [(now, e.engine_id) for e in tracker.due(engines, now)]
    return picks


def test_budget_spreads_many_engines_over_time_oldest_first() -> None:
    tracker = EngineLoadTracker(scrape_interval_s=1.0, scrape_budget=100)
    engines = _fleet(1000)
    assert tracker.period(1000) == 10.0 and tracker.period(50) == 1.0
    picks = _run_ticks(tracker, engines, 20.0)
    # Never more than the budget in any second (plus the one batch the bucket holds),
    # against 1000 a second without it.
    for second in range(20):
        in_second = [p for p in picks if second <= p[0] < second + 1]
        assert len(in_second) <= 100 + 10
    # Staggered: no tick scrapes more than a tenth of the budget.
    per_tick: dict[float, int] = {}
    for now, _ in picks:
        per_tick[now] = per_tick.get(now, 0) + 1
    assert max(per_tick.values()) <= 10
    # Every engine is read, in registration order first, then least recently read first,
    # each once per period (1000 / 100 = 10 s), none twice in a row before the others.
    times: dict[str, list[float]] = {}
    for now, engine_id in picks:
        times.setdefault(engine_id, []).append(now)
    assert [e for _, e in picks[:1000]] == [e.engine_id for e in engines]
    assert [e for _, e in picks[1000:2000]] == [e.engine_id for e in engines]
    assert all(len(t) == 2 for t in times.values())
    gaps = [t[1] - t[0] for t in times.values()]
    assert min(gaps) >= 9.5 and max(gaps) <= 10.5


def test_few_engines_keep_the_interval() -> None:
    tracker = EngineLoadTracker(scrape_interval_s=1.0, scrape_budget=100)
    picks = _run_ticks(tracker, _fleet(50), 10.0)
    counts: dict[str, int] = {}
    for _, engine_id in picks:
        counts[engine_id] = counts.get(engine_id, 0) + 1
    # 50 engines under a budget of 100/s: each still read every interval (10 times in 10 s)
    assert len(counts) == 50 and set(counts.values()) <= {9, 10, 11}


def test_no_budget_reads_every_engine_every_interval() -> None:
    tracker = EngineLoadTracker(scrape_interval_s=1.0, scrape_budget=0)
    engines = _fleet(300)
    assert len(tracker.due(engines, 0.0)) == 300
    assert tracker.due(engines, 0.5) == []
    assert len(tracker.due(engines, 1.0)) == 300


def test_an_engine_filling_up_with_capacity_unknown_is_read_first() -> None:
    tracker = EngineLoadTracker(scrape_interval_s=1.0, scrape_budget=100)
    engines = _fleet(1000)
    tracker.due(engines, 0.0)  # e0..e9: the bucket is empty now
    with tracker.track("e700"), tracker.track("e700"):  # two in flight, capacity unknown
        picked = [e.engine_id for e in tracker.due(engines, 0.1)]
    assert picked[0] == "e700" and len(picked) == 10  # first, within the budget
    assert picked[1:] == [f"e{i}" for i in range(10, 19)]


def test_a_deregistered_engine_leaves_the_rotation_and_its_report() -> None:
    tracker = EngineLoadTracker(scrape_interval_s=1.0, scrape_budget=100)
    engines = _fleet(3)
    tracker.due(engines, 0.0)
    tracker.report("e1", 4.0)
    assert tracker.load("e1") == 4.0
    assert [e.engine_id for e in tracker.due(engines[::2], 1.0)] == ["e0", "e2"]
    assert tracker.load("e1") == 0.0


def test_own_requests_that_ended_during_a_scrape_are_not_kept_as_foreign_load() -> None:
    tracker = EngineLoadTracker()
    # The scrape went out with 3 of ours in flight; they finished before the reply came,
    # and the engine counted them: the engine is idle, not loaded by someone else.
    tracker.report("a", 3.0, own_at_send=3)
    assert tracker.load("a") == 0.0
    tracker.report("a", 5.0, own_at_send=3)  # 2 beyond ours: someone else's
    assert tracker.load("a") == 2.0


async def test_background_scraper_keeps_to_the_budget_over_real_http() -> None:
    gets = 0

    async def metrics(request: web.Request) -> web.Response:
        nonlocal gets
        gets += 1
        return web.Response(text=METRICS)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    engines = [_engine(f"e{i}", url) for i in range(30)]
    # 30 engines every 50 ms would be 600 GETs a second; the budget allows 100.
    tracker = EngineLoadTracker(scrape_interval_s=0.05, scrape_budget=100, scrape_timeout_s=2.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    tracker.start(lambda: engines)
    try:
        for _ in range(200):
            if all(tracker.load(e.engine_id) == 5.0 for e in engines):
                break
            await asyncio.sleep(0.05)
        assert all(tracker.load(e.engine_id) == 5.0 for e in engines)  # every one is read
        await asyncio.sleep(0.5)
        elapsed = loop.time() - started
        assert gets <= 100 * elapsed + 5 + 2  # the budget, the first batch, in-flight ones
    finally:
        await tracker.aclose()
        await runner.cleanup()
    assert tracker._scrapes == set()


# --- the scrape asks for only the series it reads ---------------------------------------


async def test_scrape_asks_for_its_series_and_falls_back_to_a_whole_page() -> None:
    asked: list[tuple[str, str, tuple[str, ...]]] = []  # (server, path, name[] asked)

    def server(name: str, filters: bool) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def metrics(request: web.Request) -> web.Response:
            assert "Accept-Encoding" not in request.headers  # never gzip
            asked.append((name, request.path, tuple(sorted(request.query.getall("name[]", [])))))
            if request.path == "/metrics":
                return web.Response(text=METRICS)  # the whole page, whatever was asked
            if not filters:
                return web.Response(status=404)
            # vLLM's prometheus_client mount at /metrics/: the series asked for (running
            # only here, so the test can tell which page was read).
            return web.Response(text=METRICS.splitlines()[2] + "\n")

        return metrics

    urls, runners = [], []
    for name, filters in (("vllm", True), ("other", False)):
        app = web.Application()
        app.router.add_get("/metrics", server(name, filters))
        app.router.add_get("/metrics/", server(name, filters))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        urls.append(f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}")  # type: ignore[union-attr]
    tracker = EngineLoadTracker(scrape_timeout_s=2.0)
    engines = [_engine("vllm", urls[0]), _engine("other", urls[1])]
    try:
        await tracker.scrape_once(engines)
        first = sorted(asked)
        asked.clear()
        await tracker.scrape_once(engines)
    finally:
        await tracker.aclose()
        for runner in runners:
            await runner.cleanup()
    vllm = [RUNNING, WAITING, "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"]
    sglang = ["sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage"]
    series = tuple(sorted(vllm + sglang))
    assert first == [
        ("other", "/metrics", ()),  # no filtered page there: the whole one instead
        ("other", "/metrics/", series),
        ("vllm", "/metrics/", series),
    ]
    # ... and that engine is not asked for the filtered page again.
    assert sorted(asked) == [("other", "/metrics", ()), ("vllm", "/metrics/", series)]
    assert tracker.load("vllm") == 3.0  # running only: the filtered page was read
    assert tracker.load("other") == 5.0  # 3 running + 2 waiting from the whole page


async def test_scrape_reads_a_busy_sims_filtered_page(sim_engine: SimFactory) -> None:
    # One batch slot and a slow first token: of three requests, one runs and two wait.
    url = sim_engine("--max-num-seqs", "1", "--ttft-ms", "3000")
    body = {"model": "sim", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        calls = [
            asyncio.create_task(client.post("/v1/chat/completions", json=body)) for _ in range(3)
        ]
        tracker = EngineLoadTracker(scrape_timeout_s=2.0)
        try:
            for _ in range(100):
                await tracker.scrape_once([_engine("e", url)])
                if tracker.load("e") == 3.0:
                    break
                await asyncio.sleep(0.02)
            assert tracker.load("e") == 3.0
            full = await client.get("/metrics")
            filtered = await client.get(LOAD_METRICS_PATH)
        finally:
            await tracker.aclose()
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
    names = {
        sample.name
        for family in text_string_to_metric_families(filtered.text)
        for sample in family.samples
    }
    assert names == {RUNNING, WAITING, "vllm:kv_cache_usage_perc"}
    assert len(filtered.content) * 10 < len(full.content)  # the point: a far smaller page
    load = read_load(filtered.text)
    assert load == read_load(full.text)
    assert (load.running, load.waiting) == (1.0, 2.0)
