"""Shedding by default (issue 16, "no load shedding by default"): with default settings the
scheduler keeps each engine at its own concurrency, and a full queue is refused at once with
429 + Retry-After, not after a wait.

A real stack (edge on a socket, scheduler and embedding service over gRPC) in front of
simulator engines run as child processes; the flood comes from a process of its own, so its
clients do not share the gateway's event loop (see tests/faults/test_overload.py)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing as mp
import re
import statistics
import time
from typing import Any

import grpc
import httpx
import pytest

from sage.common.config.settings import SageSettings
from sage.common.exceptions import OverloadedError
from sage.rpc.scheduler.v1 import scheduler_pb2
from sage.services.lifecycle.server import engine_pb
from sage.services.lifecycle.spec import EngineSpec
from sage.services.lifecycle.store import EngineRecord as LifecycleRecord
from sage.services.scheduler.admission import AdmissionController
from sage.services.scheduler.policies import QueuedRequest
from sage.services.scheduler.registry import EngineKind, EngineRecord
from sage.services.scheduler.server import record_from_pb
from tests.conftest import SimFactory
from tests.security.conftest import tenant

CONCURRENCY = 4  # the engine's max_num_seqs, declared at registration as lifecycle does
MAX_QUEUE = 8
# About 6x what the engine serves (4 slots / ~0.17 s a request ≈ 24 requests/s): beyond
# capacity, yet not so much that the gateway's own CPU (2 shared cores in CI, with the
# flood's clients) becomes the queue — that is throughput, not shedding.
RATE = 150  # requests per second
TOTAL = 300
# Every PROBE-th request names a model nobody serves: refused by the gateway without
# admission, its latency is what one pass through the edge and the scheduler costs at that
# moment of the flood, so the 429s are judged against it and not against a wall-clock figure.
PROBE = 10


@pytest.fixture
def settings(settings: SageSettings) -> SageSettings:
    """The security settings (tenant keys on) with a small queue; in-flight per engine is
    left at its default (-1: each engine's own concurrency)."""
    return settings.model_copy(update={"scheduler_max_queue": MAX_QUEUE})


def _metric(text: str, name: str) -> float:
    """The sum of the samples of `name` (labels ignored) in a Prometheus text page."""
    pattern = re.compile(r"^" + re.escape(name) + r"(?:\{[^}]*\})? (\S+)$", re.M)
    return sum(float(v) for v in pattern.findall(text))


async def _engine_metrics(base_url: str) -> str:
    async with httpx.AsyncClient() as client:
        return (await client.get(base_url + "/metrics")).text


def _flood(base_url: str, headers: dict[str, str]) -> list[tuple[int, float, str | None]]:
    return asyncio.run(_clients(base_url, headers))


async def _clients(base_url: str, headers: dict[str, str]) -> list[tuple[int, float, str | None]]:
    """An open-loop flood: TOTAL requests at RATE per second, each sent on schedule whether
    or not earlier ones have answered; (status, seconds, Retry-After) of each."""
    results: list[tuple[int, float, str | None]] = []

    async def one(client: httpx.AsyncClient, model: str) -> None:
        began = time.perf_counter()
        resp = await client.post(
            "/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
        )
        results.append(
            (resp.status_code, time.perf_counter() - began, resp.headers.get("retry-after"))
        )

    async with httpx.AsyncClient(
        base_url=base_url,
        headers=headers,
        timeout=60,
        limits=httpx.Limits(max_connections=200, max_keepalive_connections=200),
    ) as client:
        await client.get("/health")  # connect before the clock starts
        start = time.perf_counter()
        tasks = []
        for i in range(TOTAL):
            await asyncio.sleep(max(0.0, start + i / RATE - time.perf_counter()))
            model = "ghost" if i % PROBE == PROBE // 2 else "sim"
            tasks.append(asyncio.create_task(one(client, model)))
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
    return results


@pytest.mark.slow
async def test_flood_is_shed_at_once_with_retry_after_and_the_engine_never_queues(
    control_plane: Any, sim_engine: SimFactory
) -> None:
    url = sim_engine(
        "--ttft-ms",
        "150",
        "--tpot-ms",
        "5",
        "--max-tokens-default",
        "4",
        "--max-num-seqs",
        str(CONCURRENCY),
    )
    await control_plane.register(
        "sim-0",
        "sim",
        url,
        backend="sim",
        labels={"max_concurrent_requests": str(CONCURRENCY)},
    )
    base_url = str(control_plane.client.base_url)
    loop = asyncio.get_running_loop()
    with concurrent.futures.ProcessPoolExecutor(1, mp.get_context("spawn")) as pool:
        results = await loop.run_in_executor(pool, _flood, base_url, tenant())

    statuses = [status for status, _, _ in results]
    refused = [(seconds, retry) for status, seconds, retry in results if status == 429]
    served = statuses.count(200)
    fastest_ms = min(seconds for status, seconds, _ in results if status == 200) * 1e3
    p50_ms = statistics.median(seconds for seconds, _ in refused) * 1e3 if refused else 0.0
    probe_ms = statistics.median(s for status, s, _ in results if status == 404) * 1e3
    print(
        f"flood: {served} served (fastest {fastest_ms:.0f} ms), {len(refused)} refused, "
        f"429 p50 {p50_ms:.1f} ms, unknown-model 404 p50 {probe_ms:.1f} ms"
    )
    assert len(results) == TOTAL  # nothing hung, nothing lost
    assert statuses.count(404) == TOTAL // PROBE  # the probes, and only they
    assert set(statuses) <= {200, 404, 429}, sorted(set(statuses))
    assert served >= CONCURRENCY
    assert len(refused) >= 50, f"only {len(refused)} requests were refused"
    assert all(retry is not None and float(retry) >= 1 for _, retry in refused)
    # Refusals are decided at admission, not after a wait: a 429 costs what a pass through
    # the gateway costs just then (the probes' 404s; 2-4 ms when the cores are free), while
    # one that waited for a slot would add at least a service time (the 150 ms TTFT, as the
    # fastest served request shows). Against the probes, not a wall-clock figure (this held
    # 50 ms, and once did not under load): a starved gateway delays both alike.
    assert p50_ms < probe_ms + fastest_ms / 2, (p50_ms, probe_ms, fastest_ms)

    # Default settings kept the engine at its concurrency: it never queued a request (each
    # waits ~170 ms when it does; 0.1 s in all allows for sub-millisecond hand-over races).
    text = await _engine_metrics(url)
    assert _metric(text, "vllm:request_queue_time_seconds_count") == served
    assert _metric(text, "vllm:request_queue_time_seconds_sum") < 0.1, text
    status = await control_plane.scheduler.GetStatus(scheduler_pb2.GetStatusRequest())
    assert status.in_flight == 0 and status.queued == 0


async def test_default_cap_sends_work_to_the_engine_with_room(
    control_plane: Any, sim_engine: SimFactory
) -> None:
    """One engine runs 1 request at a time, the other 3: four concurrent requests fill both
    exactly (round-robin alone would queue one behind the small engine)."""
    small = sim_engine("--ttft-ms", "400", "--max-tokens-default", "1", "--max-num-seqs", "1")
    large = sim_engine("--ttft-ms", "400", "--max-tokens-default", "1", "--max-num-seqs", "3")
    for engine_id, url, slots in (("small", small, 1), ("large", large, 3)):
        await control_plane.register(
            engine_id, "sim", url, backend="sim", labels={"max_concurrent_requests": str(slots)}
        )
    replies = await asyncio.gather(
        *(
            control_plane.client.post(
                "/v1/chat/completions",
                headers=tenant(),
                json={"model": "sim", "messages": [{"role": "user", "content": f"q{i}"}]},
            )
            for i in range(4)
        )
    )
    assert [r.status_code for r in replies] == [200] * 4
    for url in (small, large):
        text = await _engine_metrics(url)
        assert _metric(text, "vllm:request_queue_time_seconds_sum") < 0.1, (url, text)
    assert _metric(await _engine_metrics(small), "vllm:request_queue_time_seconds_count") == 1


def test_engine_concurrency_comes_from_registration_else_the_backend() -> None:
    def record(backend: str, **labels: str) -> EngineRecord:
        return EngineRecord(
            "e", "m", EngineKind.LLM, "http://127.0.0.1:1", backend=backend, labels=labels
        )

    assert record("vllm", max_concurrent_requests="12").concurrency == 12
    assert record("vllm").concurrency == 256  # vLLM's default max_num_seqs
    assert record("transformers").concurrency < record("vllm").concurrency
    admission = AdmissionController("fifo")  # the default: each engine's own concurrency
    assert admission.capacity([record("sim", max_concurrent_requests="3"), record("vllm")]) == 259


async def test_every_shed_carries_retry_after() -> None:
    """A full queue and an SLO the queue cannot meet are both refused with Retry-After."""
    full = AdmissionController("fifo", per_engine=1, max_queue=0)
    async with full.slot(QueuedRequest(model="m"), engines=1):
        # Decided at once, not after a wait: the first step of entering the slot raises,
        # without ever suspending (a wait would hand the event loop a future here).
        entering = full.slot(QueuedRequest(model="m"), engines=1).__aenter__()
        with pytest.raises(OverloadedError) as refused:
            entering.send(None)
    assert refused.value.retry_after and refused.value.http_status == 429

    clock = [0.0]
    slo = AdmissionController(
        "slo_aware_shed", per_engine=1, predict=lambda item: 5.0, clock=lambda: clock[0]
    )
    running = slo.slot(QueuedRequest(model="m"), engines=1)
    await running.__aenter__()
    waiter = asyncio.create_task(
        slo.slot(QueuedRequest(model="m", deadline=1.0), engines=1).__aenter__()
    )
    await asyncio.sleep(0)
    clock[0] = 0.5
    await running.__aexit__(None, None, None)
    with pytest.raises(OverloadedError) as shed:
        await waiter
    assert shed.value.retry_after and shed.value.code == "slo_unattainable"


async def test_lifecycle_declares_the_concurrency_it_launched_with(control_plane: Any) -> None:
    """An engine lifecycle starts with max_concurrent_requests (the sim's and vLLM's
    --max-num-seqs) reaches the scheduler with that number, which caps its in-flight."""
    spec = EngineSpec(model="sim", backend="sim", max_concurrent_requests=6)
    record = LifecycleRecord("sim-6", spec, "sim", "http://127.0.0.1:9", "127.0.0.1", 9)
    await control_plane.scheduler.RegisterEngine(
        scheduler_pb2.RegisterEngineRequest(engine=engine_pb(record))
    )
    listed = await control_plane.scheduler.ListEngines(scheduler_pb2.ListEnginesRequest())
    (engine,) = [e for e in listed.engines if e.engine_id == "sim-6"]
    assert engine.labels["max_concurrent_requests"] == "6"
    assert record_from_pb(engine).concurrency == 6
    # A registrant's bad declaration is refused, naming the label.
    bad = engine_pb(LifecycleRecord("bad", spec, "sim", "http://127.0.0.1:9", "127.0.0.1", 9))
    bad.labels["max_concurrent_requests"] = "lots"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await control_plane.scheduler.RegisterEngine(
            scheduler_pb2.RegisterEngineRequest(engine=bad)
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_concurrent_requests" in (refused.value.details() or "")
