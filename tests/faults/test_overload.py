"""Overload at 10x capacity through the edge: the excess is refused with 429 + Retry-After,
admitted requests keep a latency bounded relative to an unloaded baseline measured in the
same test, memory stays bounded, and every request finishes."""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing as mp
import os
import statistics
import time

import httpx
import psutil
import pytest

from sage.rpc.scheduler.v1 import scheduler_pb2
from tests.conftest import SimFactory
from tests.faults.conftest import Plane, PlaneFactory

PER_ENGINE = 4  # requests in flight per engine
MAX_QUEUE = 8
CAPACITY = PER_ENGINE  # one engine
# CI keeps counts small; SAGE_FAULTS_SCALE=5 runs a longer overload by hand.
SCALE = max(1, int(os.environ.get("SAGE_FAULTS_SCALE", "1")))


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


async def _load(
    plane: Plane, workers: int, total: int, deadline_s: float
) -> tuple[list[float], list[int], list[str | None]]:
    """`workers` closed-loop clients send `total` requests; (admitted latencies, statuses,
    Retry-After of each 429). Bounded by `deadline_s` overall.

    The clients run in a process of their own, as real clients do: in the test's process
    they shared its event loop and GIL with the in-process edge and scheduler, and their
    own wait for a turn was charged to the gateway's latency."""
    base_url = str(plane.client.base_url)
    loop = asyncio.get_running_loop()
    with concurrent.futures.ProcessPoolExecutor(1, mp.get_context("spawn")) as pool:
        return await loop.run_in_executor(pool, _run_clients, base_url, workers, total, deadline_s)


def _run_clients(
    base_url: str, workers: int, total: int, deadline_s: float
) -> tuple[list[float], list[int], list[str | None]]:
    return asyncio.run(_clients(base_url, workers, total, deadline_s))


async def _clients(
    base_url: str, workers: int, total: int, deadline_s: float
) -> tuple[list[float], list[int], list[str | None]]:
    latencies: list[float] = []
    statuses: list[int] = []
    retry_after: list[str | None] = []
    sent = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < total:
            sent += 1
            began = time.perf_counter()
            resp = await client.post(
                "/v1/chat/completions",
                json={
                    "model": "sim",
                    "messages": [{"role": "user", "content": f"load {sent}"}],
                    "max_tokens": 8,
                },
            )
            statuses.append(resp.status_code)
            if resp.status_code == 200:
                latencies.append(time.perf_counter() - began)
            elif resp.status_code == 429:
                retry_after.append(resp.headers.get("retry-after"))
                await asyncio.sleep(0.01)  # a polite client backs off a little

    async with httpx.AsyncClient(
        base_url=base_url,
        timeout=60,
        limits=httpx.Limits(max_connections=500, max_keepalive_connections=100),
    ) as client:
        await asyncio.wait_for(
            asyncio.gather(*(worker(client) for _ in range(workers))), deadline_s
        )
    return latencies, statuses, retry_after


@pytest.mark.slow
async def test_ten_times_capacity_is_shed_with_429_and_admitted_latency_stays_bounded(
    plane_factory: PlaneFactory, sim_engine: SimFactory
) -> None:
    plane = await plane_factory(
        scheduler_max_inflight_per_engine=PER_ENGINE, scheduler_max_queue=MAX_QUEUE
    )
    url = sim_engine("--ttft-ms", "20", "--tpot-ms", "10", "--max-num-seqs", str(PER_ENGINE))
    await plane.register("sim-0", url)
    engine = psutil.Process(sim_engine.procs[-1].pid)  # type: ignore[attr-defined]
    me = psutil.Process()

    baseline, statuses, _ = await _load(plane, CAPACITY, 40, 60)
    assert statuses == [200] * 40
    rss_before = me.memory_info().rss + engine.memory_info().rss

    latencies, statuses, retry_after = await _load(plane, 10 * CAPACITY, 400 * SCALE, 120)

    service = statistics.median(baseline)
    admitted = statistics.median(latencies)
    print(  # figures for the log (pytest -s)
        f"overload: {statuses.count(200)} admitted, {statuses.count(429)} refused; "
        f"median {admitted * 1e3:.0f} ms (p99 {_p99(latencies) * 1e3:.0f} ms) vs unloaded "
        f"median {service * 1e3:.0f} ms (p99 {_p99(baseline) * 1e3:.0f} ms)"
    )
    assert len(statuses) == 400 * SCALE  # nothing hung, nothing lost
    assert set(statuses) <= {200, 429}, sorted(set(statuses))
    assert statuses.count(429) > 0 and latencies
    assert all(value is not None and float(value) > 0 for value in retry_after)
    # Admitted work waits at most one queue's worth: MAX_QUEUE requests ahead drained
    # CAPACITY at a time, then its own service, so (1 + MAX_QUEUE / CAPACITY) = 3 service
    # times; allow twice that for the 2 shared cores that also run the clients and the edge.
    # Medians, not p99s: p99 here is the max of a few dozen samples and follows CPU hiccups
    # (admitted p99 0.59-1.85 s on 2 cores, 4.5-12x the unloaded p99, at medians 3.2-4.0x
    # the unloaded median), and a queue 3x too big (24) kept p99 at 6x the unloaded p99,
    # inside the old 8x bound. The medians tell them apart: 6.8x for a queue of 24 and 9.4x
    # for one of 36 (theory: 7 and 10 service times), both failing this bound.
    bound = 2 * (1 + MAX_QUEUE / CAPACITY)
    assert admitted < bound * service, (admitted, service, bound)
    growth = me.memory_info().rss + engine.memory_info().rss - rss_before
    assert growth < 64 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB under overload"
    status = await plane.scheduler.GetStatus(scheduler_pb2.GetStatusRequest())
    assert status.in_flight == 0 and status.queued == 0
