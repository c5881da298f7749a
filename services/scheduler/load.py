"""EngineLoadTracker: how busy each engine is, for load-aware routing.

Two sources: requests this scheduler has in flight to each engine (exact, updated around
every engine call) and, optionally, the engine's own vLLM gauges scraped from `/metrics`
(`vllm:num_requests_running` + `vllm:num_requests_waiting`, summed over vLLM's `engine`
label, or SGLang's `sglang:num_running_reqs` + `sglang:num_queue_reqs`; read by
sage.engines.vllm_metrics), which also see traffic from elsewhere. The
scrape is stale by up to one interval, so only the part of it this scheduler did not cause
is added to the live in-flight count.

The same scrapes teach the scheduler each engine's concurrency when nobody declared it
(CapacityEstimate): an engine with requests waiting runs all it can, so its running count
is its capacity now; one that runs everything it was given, nothing waiting, is probed one
request higher (the step doubles while probes keep succeeding). vLLM does not export its
max_num_seqs, and the real limit also moves with KV-cache room, so it is measured.

Scraping costs the scheduler CPU per engine per second, not per request: at most
`scrape_budget` engines are scraped per second, oldest first, in small batches every
SCRAPE_TICK_S, so each engine is read every max(interval, engines / budget) seconds instead
of every engine at once every interval. Between scrapes the exact in-flight count carries
routing; an engine filling up before its capacity is known is read first (see track).
Each scrape names the series it reads (vllm_metrics.LOAD_METRICS_PATH): vLLM and the sim
answer with under 1 KB instead of 18-66 KB, about a third of the scheduler CPU per scrape
(bench/RESULTS.md, item 7); an engine without that page is read from its whole /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from sage.common.engine_keys import engine_auth_headers, is_managed
from sage.common.http.http1 import Http1Error, Http1Pool, engine_tls_context
from sage.engines.vllm_metrics import (
    LOAD_METRICS_PATH,
    WHOLE_METRICS_PATH,
    VllmLoad,
    read_load,
)

from .registry import EngineRecord

log = logging.getLogger("sage.scheduler.load")


@dataclass(frozen=True, slots=True)
class EngineReport:
    """One scrape: the engine's running + waiting requests, and our in-flight count then."""

    queued: float
    own_in_flight: int


# A probe costs one request queued inside an engine when the estimate was right: probe only
# after the engine ran at its estimate, nothing waiting, for this many scrapes in a row.
PROBE_AFTER_SCRAPES = 3
# Closest two scrapes may follow each other when requests pile onto an engine of unknown
# capacity (EngineLoadTracker.track wakes the scraper).
MIN_SCRAPE_GAP_S = 0.05
# The scraper looks for due engines this often (or every interval, if shorter), so a budget
# of B engines per second goes out in batches of about B * SCRAPE_TICK_S, not in one burst.
SCRAPE_TICK_S = 0.1
# Answers to the filtered scrape path that mean "no such page here", not "engine down".
_NOT_THERE = frozenset((301, 302, 303, 307, 308, 404, 405))


@dataclass(slots=True)
class CapacityEstimate:
    """An engine's concurrency as its gauges show it (see the module docstring)."""

    value: int = 0  # 0: not measured yet
    step: int = 1
    full_scrapes: int = 0  # consecutive scrapes at `value` with nothing waiting
    peak: int = 0  # the most it was ever seen running

    def observe(self, running: float, waiting: float, ceiling: int) -> None:
        """Fold in one scrape; `ceiling` bounds the probe (the backend's documented max)."""
        busy = int(running)
        self.peak = max(self.peak, busy)
        if waiting >= 1 and busy >= 1:
            self.value, self.step, self.full_scrapes = min(busy, ceiling), 1, 0
        elif self.value and busy >= self.value:
            self.full_scrapes += 1
            if self.full_scrapes >= PROBE_AFTER_SCRAPES:  # it kept up: try one more
                self.value = min(ceiling, self.value + self.step)
                self.step, self.full_scrapes = min(self.step * 2, 64), 0
        else:
            self.full_scrapes = 0


def parse_queue_depth(text: str) -> float:
    """Running + waiting requests in a Prometheus text exposition (all models and engine
    cores; `..._waiting_by_reason` is not counted again)."""
    return read_load(text).queued


class EngineLoadTracker:
    """Per-engine load = in flight from here + what the engine reported beyond that."""

    def __init__(
        self,
        *,
        scrape_interval_s: float = 2.0,
        scrape_timeout_s: float = 1.0,
        scrape_budget: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.scrape_interval_s = scrape_interval_s
        self.scrape_timeout_s = scrape_timeout_s
        self.scrape_budget = scrape_budget  # engines scraped per second at most; 0: no limit
        self._clock = clock
        # Engine id -> when its last scrape began, least recent first (never: -inf, in front).
        self._scraped: OrderedDict[str, float] = OrderedDict()
        self._urgent: dict[str, None] = {}  # filling up with capacity unknown: read first
        self._pending: set[str] = set()  # a scrape of it is under way
        self._paths: dict[str, str] = {}  # engines without the filtered page: whole /metrics
        self._scrapes: set[asyncio.Task[None]] = set()
        self._tokens = 0.0  # the budget's bucket, refilled at scrape_budget per second
        self._refilled: float | None = None
        # The engine tuple last reconciled, and its records by id: the registry hands out
        # the same tuple until an engine changes, so a tick costs nothing per engine.
        self._known: Sequence[EngineRecord] | None = None
        self._by_id: dict[str, EngineRecord] = {}
        self._in_flight: dict[str, int] = {}
        self._reports: dict[str, EngineReport] = {}
        self._capacity: dict[str, CapacityEstimate] = {}
        self._task: asyncio.Task[None] | None = None
        # Its own pool, not the executor's: a scrape never waits for a slot behind user
        # requests. One kept-alive connection per engine address, or a batch's worth where
        # engines share one (a proxy, or a benchmark's one simulator standing in for many):
        # with one, every scrape of a batch but the first paid a new connection.
        self._http = Http1Pool(max_idle_per_host=32, ssl_context=engine_tls_context)
        self._wake = asyncio.Event()  # set: scrape now (see track)
        # Called with an engine id whenever load(engine_id) may have changed, so indexes
        # over loads (routing/least_loaded.py) stay right without rescanning every engine.
        self._listeners: list[Callable[[str], None]] = []
        # Bumped whenever a measured capacity changes: admission caches sums keyed by it.
        self.capacity_version = 0

    def subscribe(self, listener: Callable[[str], None]) -> None:
        """Call `listener(engine_id)` after every change to that engine's load."""
        self._listeners.append(listener)

    def _changed(self, engine_id: str) -> None:
        for listener in self._listeners:
            listener(engine_id)

    def in_flight(self, engine_id: str) -> int:
        """Requests this scheduler has in flight to `engine_id`."""
        return self._in_flight.get(engine_id, 0)

    def busy(self) -> Mapping[str, int]:
        """The live table of engines with requests in flight from here (read only; no
        copy: per-request callers rely on it costing nothing)."""
        return self._in_flight

    def in_flight_by_engine(self) -> dict[str, int]:
        """Every engine with requests in flight from here, and how many."""
        return dict(self._in_flight)

    def loads(self) -> dict[str, float]:
        """What load-aware routing sees for every engine it has a count or a report of."""
        return {e: self.load(e) for e in sorted(self._in_flight.keys() | self._reports.keys())}

    def capacity(self, engine_id: str) -> int:
        """The engine's concurrency as measured from its gauges; 0 while unknown."""
        estimate = self._capacity.get(engine_id)
        return estimate.value if estimate is not None else 0

    def observe(self, engine_id: str, load: VllmLoad, ceiling: int, own_at_send: int = 0) -> None:
        """Record one scrape of `engine_id`: its queue for routing, its capacity for
        admission (never above `ceiling`); `own_at_send` as in report."""
        self.report(engine_id, load.queued, own_at_send)
        estimate = self._capacity.setdefault(engine_id, CapacityEstimate())
        before = estimate.value
        estimate.observe(load.running, load.waiting, ceiling)
        if estimate.value != before:
            self.capacity_version += 1

    def load(self, engine_id: str) -> float:
        """In flight from here plus the engine-reported queue not caused by us; 0 if unknown."""
        own = self._in_flight.get(engine_id, 0)
        report = self._reports.get(engine_id)
        if report is None:
            return float(own)
        return own + max(0.0, report.queued - report.own_in_flight)

    @contextlib.contextmanager
    def track(self, engine_id: str) -> Iterator[None]:
        """Count one request in flight to `engine_id` for the duration of the block."""
        counts = self._in_flight
        busy = counts[engine_id] = counts.get(engine_id, 0) + 1
        estimate = self._capacity.get(engine_id)
        if busy >= 2 and (estimate is None or (not estimate.value and busy > estimate.peak)):
            # Capacity unknown and more in flight than the engine was ever seen running:
            # look now, not at the next interval, so a burst is capped within one scrape
            # of the engine filling up (and an engine that never fills is not polled hot).
            self._urgent[engine_id] = None
            self._wake.set()
        if self._listeners:
            self._changed(engine_id)
        try:
            yield
        finally:
            left = counts[engine_id] - 1
            if left:
                counts[engine_id] = left
            else:
                del counts[engine_id]  # no entry outlives its last request
            if self._listeners:
                self._changed(engine_id)

    def report(self, engine_id: str, queued: float, own_at_send: int = 0) -> None:
        """Record an engine's running + waiting requests as of now; `own_at_send`: our
        in-flight count when the scrape was sent. The engine counted somewhere between, so
        the larger of the two is taken as ours: requests of ours that ended meanwhile are
        not kept as someone else's load until the next scrape (a period, at many engines)."""
        own = max(own_at_send, self._in_flight.get(engine_id, 0))
        self._reports[engine_id] = EngineReport(queued, own)
        if self._listeners:
            self._changed(engine_id)

    def retain(self, engine_ids: Iterable[str]) -> None:
        """Forget reports of engines not in `engine_ids` (they were deregistered)."""
        live = set(engine_ids)
        for engine_id in [k for k in self._reports if k not in live]:
            del self._reports[engine_id]
            if self._listeners:
                self._changed(engine_id)
        for engine_id in [k for k in self._capacity if k not in live]:
            del self._capacity[engine_id]  # a re-registered engine is measured afresh
            self.capacity_version += 1

    async def _scrape(self, engine: EngineRecord) -> None:
        """GET one engine's /metrics; an engine that fails keeps no report."""
        engine_id = engine.engine_id
        own_at_send = self._in_flight.get(engine_id, 0)
        try:
            # Engines lifecycle started require their key on /metrics too. A redirect
            # is never followed (Http1Pool follows none): an engine could otherwise
            # point the scrape at loopback or metadata addresses; a 3xx is a failure.
            headers = engine_auth_headers(engine_id, is_managed(engine.backend))
            path = self._paths.get(engine_id, LOAD_METRICS_PATH)
            status, body = await self._http.get(
                engine.base_url, path, headers, self.scrape_timeout_s
            )
            if status in _NOT_THERE and path == LOAD_METRICS_PATH:
                # Not vLLM's filtering /metrics/ (another server): read its whole /metrics,
                # now and from now on.
                self._paths[engine_id] = path = WHOLE_METRICS_PATH
                status, body = await self._http.get(
                    engine.base_url, path, headers, self.scrape_timeout_s
                )
            if status != 200:
                raise Http1Error(f"HTTP {status}")
            text = body.decode()  # Prometheus' text format is UTF-8
        except (Http1Error, TimeoutError, UnicodeDecodeError):
            if self._reports.pop(engine_id, None) is not None and self._listeners:
                self._changed(engine_id)
            return
        if engine_id in self._scraped:  # not deregistered meanwhile
            self.observe(engine_id, read_load(text), engine.concurrency, own_at_send)

    async def scrape_once(self, engines: Iterable[EngineRecord]) -> None:
        """Poll every engine's /metrics concurrently, whatever the budget."""
        records = list(engines)
        self._reconcile(records)
        now = self._clock()
        for engine in records:
            self._mark(engine.engine_id, now)
        await asyncio.gather(*(self._scrape(e) for e in records))

    def period(self, engines: int) -> float:
        """How often each of `engines` engines is scraped: every interval, or as often as
        the budget allows."""
        if self.scrape_budget <= 0:
            return self.scrape_interval_s
        return max(self.scrape_interval_s, engines / self.scrape_budget)

    def _tick(self) -> float:
        return min(SCRAPE_TICK_S, self.scrape_interval_s)

    def _reconcile(self, records: Sequence[EngineRecord]) -> None:
        """Start tracking new engines (in front: never scraped) and forget gone ones."""
        if isinstance(records, tuple) and records is self._known:
            return
        self._known, self._by_id = records, {e.engine_id: e for e in records}
        scraped = self._scraped
        ids = [e.engine_id for e in records]
        for engine_id in reversed(ids):  # so new ones end up in registration order
            if engine_id not in scraped:
                scraped[engine_id] = -math.inf
                scraped.move_to_end(engine_id, last=False)
        if len(scraped) != len(ids) or len(self._reports) > len(ids):
            live = set(ids)
            for engine_id in [k for k in scraped if k not in live]:
                del scraped[engine_id]
                self._urgent.pop(engine_id, None)
                self._paths.pop(engine_id, None)
            self.retain(live)

    def _mark(self, engine_id: str, now: float) -> None:
        self._scraped[engine_id] = now
        self._scraped.move_to_end(engine_id)
        self._urgent.pop(engine_id, None)

    def due(self, engines: Sequence[EngineRecord], now: float | None = None) -> list[EngineRecord]:
        """The engines to scrape now, marked as scraped: those filling up with capacity
        unknown first, then the least recently scraped whose period has passed, no more
        than the budget's tokens allow."""
        now = self._clock() if now is None else now
        self._reconcile(engines)
        if self.scrape_budget > 0:
            cap = max(1.0, self.scrape_budget * self._tick())
            if self._refilled is None:
                self._tokens = cap
            else:
                since = now - self._refilled
                self._tokens = min(cap, self._tokens + self.scrape_budget * since)
            self._refilled = now
            allowed = int(self._tokens + 1e-9)
        else:
            allowed = len(engines)
        by_id = self._by_id
        picked: list[str] = []
        for engine_id in self._urgent:
            if len(picked) >= allowed:
                break
            if engine_id in by_id and engine_id not in self._pending:
                picked.append(engine_id)
        # A tick late is as good as on time: without the half tick, a period of one
        # interval would come out one tick longer.
        oldest = now - (self.period(len(engines)) - self._tick() / 2)
        for engine_id, started in self._scraped.items():
            if len(picked) >= allowed or started > oldest:
                break  # the rest were scraped more recently still
            if engine_id not in self._pending and engine_id not in self._urgent:
                picked.append(engine_id)
        for engine_id in picked:
            self._mark(engine_id, now)
        if self.scrape_budget > 0:
            self._tokens -= len(picked)
        return [by_id[e] for e in picked]

    def _start_due(self, engines: Sequence[EngineRecord]) -> None:
        """Start scraping the due engines without waiting for them: an engine that takes
        its whole timeout holds up nobody else's reading."""
        for engine in self.due(engines):
            self._pending.add(engine.engine_id)
            task = asyncio.create_task(self._scrape(engine))
            self._scrapes.add(task)
            task.add_done_callback(functools.partial(self._scrape_done, engine.engine_id))

    def _scrape_done(self, engine_id: str, task: asyncio.Task[None]) -> None:
        self._scrapes.discard(task)
        self._pending.discard(engine_id)
        if not task.cancelled() and task.exception() is not None:
            log.error("engine load scrape failed", exc_info=task.exception())

    async def _scrape_forever(self, engines: Callable[[], Sequence[EngineRecord]]) -> None:
        while True:
            self._wake.clear()
            try:
                self._start_due(engines())
            except Exception:  # keep scraping; one bad round must not stop load readings
                log.exception("engine load scrape failed")
            # At most every MIN_SCRAPE_GAP_S when woken, else every tick.
            await asyncio.sleep(MIN_SCRAPE_GAP_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, self._tick() - MIN_SCRAPE_GAP_S))

    def start(self, engines: Callable[[], Sequence[EngineRecord]]) -> None:
        """Start polling `engines()`' /metrics (in the running loop): each engine every
        period(len(engines())) seconds, staggered."""
        if self._task is None:
            self._task = asyncio.create_task(self._scrape_forever(engines))

    async def aclose(self) -> None:
        """Stop the scraper and close its connections."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for task in list(self._scrapes):
            task.cancel()
        await asyncio.gather(*self._scrapes, return_exceptions=True)
        await self._http.aclose()
