"""Admission: a model's ready engines take at most their capacity in flight; the rest wait
in that model's queueing policy, which decides who runs next when a slot frees, and a full
queue is refused at once (429 + Retry-After) — shedding is decided here, before any wait.

`per_engine` sets each engine's capacity: -1 (the default) is the engine's own concurrency
(its registered max_concurrent_requests label; else what its gauges showed it runs at once,
measured by the load tracker; else its backend's default, e.g. vLLM's max_num_seqs), a
positive number the same cap for every engine, and 0 no limit: nothing waits here and the
policy is bypassed — engines queue themselves.

Requests wait here, not at an engine: a slot frees on whichever engine finishes first, and
the request that leaves the queue is routed then, among the engines with a free slot
(Scheduler._with_room_first), so nothing queues behind a busy engine while another idles.
One lane per model (aliases share their model's lane).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from sage.common.exceptions import InvalidRequestError, OverloadedError

from .policies import QueuedRequest, SchedulingPolicy, Shed, create_policy
from .policies.slo_aware import Predictor
from .registry import DEFAULT_CONCURRENCY, EngineRecord

# Seconds a refused caller is told to wait: about one request's time on a busy engine.
RETRY_AFTER_S = 1.0

# Engine tuples whose capacity sum is kept (one per model and alias served, in practice).
CAPACITY_CACHE_SIZE = 256

_PRIORITIES = {"high": 0, "normal": 1, "low": 2, "": 1, "0": 0, "1": 1, "2": 2}


def parse_priority(value: str) -> int:
    """high/normal/low or 0/1/2; anything else is a 400 naming the field."""
    try:
        return _PRIORITIES[value.strip().lower()]
    except KeyError:
        raise InvalidRequestError(
            f"priority must be high, normal or low (or 0, 1, 2), got {value!r}",
            param="priority",
        ) from None


@dataclass
class _ModelLane:
    policy: SchedulingPolicy
    running: int = 0
    capacity: int = 1


@dataclass
class AdmissionStats:
    """Counters for GetStatus and metrics."""

    queued: int = 0
    admitted: int = 0
    shed: int = 0
    rejected: int = 0


class AdmissionController:
    """Per-model capacity gate in front of the engines, ordered by a named policy."""

    def __init__(
        self,
        policy_name: str = "fifo",
        *,
        per_engine: int = -1,
        max_queue: int = 10_000,
        predict: Predictor | None = None,
        clock: Callable[[], float] = time.monotonic,
        measured: Callable[[str], int] | None = None,
        measured_version: Callable[[], int] | None = None,
    ) -> None:
        create_policy(policy_name, predict)  # fail fast on an unknown name
        self.policy_name = policy_name
        self.per_engine = per_engine
        self.max_queue = max_queue
        self.predict = predict
        self.clock = clock
        self.measured = measured or (lambda engine_id: 0)  # engine_id -> measured capacity
        # Changes whenever `measured` may answer differently; with it, capacity() of the
        # same engines tuple (the registry's, unchanged until an engine changes) is summed
        # once per change, not once per request.
        self.measured_version = measured_version
        # id(engines) → (engines, version, capacity); the tuple is kept so an id is not
        # reused while cached.
        self._capacities: dict[int, tuple[Sequence[EngineRecord], int, int]] = {}
        self._lanes: dict[str, _ModelLane] = {}
        self.stats = AdmissionStats()

    def _lane(self, model: str) -> _ModelLane:
        lane = self._lanes.get(model)
        if lane is None:
            lane = self._lanes[model] = _ModelLane(create_policy(self.policy_name, self.predict))
        return lane

    @property
    def limited(self) -> bool:
        """Whether in-flight requests are capped at all (per_engine 0: no)."""
        return self.per_engine != 0

    def engine_capacity(self, engine: EngineRecord) -> int:
        """Requests `engine` may have in flight; 0 means no limit."""
        if self.per_engine < 0:
            return (
                engine.declared_concurrency or self.measured(engine.engine_id) or engine.concurrency
            )
        return self.per_engine

    def capacity(self, engines: int | Sequence[EngineRecord]) -> int:
        """Requests a model's ready `engines` (records, or just how many) may have in flight."""
        if isinstance(engines, int):
            per = self.per_engine if self.per_engine > 0 else DEFAULT_CONCURRENCY
            return max(1, engines) * per
        if self.per_engine >= 0:
            return max(1, len(engines) * self.per_engine)
        if self.measured_version is None or not isinstance(engines, tuple):
            return max(1, sum(self.engine_capacity(e) for e in engines))
        version = self.measured_version()
        cached = self._capacities.get(id(engines))
        if cached is not None and cached[0] is engines and cached[1] == version:
            return cached[2]
        total = max(1, sum(self.engine_capacity(e) for e in engines))
        if len(self._capacities) >= CAPACITY_CACHE_SIZE:
            self._capacities.clear()  # engine sets changed since: sum again on demand
        self._capacities[id(engines)] = (engines, version, total)
        return total

    @contextlib.asynccontextmanager
    async def slot(
        self, item: QueuedRequest, engines: int | Sequence[EngineRecord]
    ) -> AsyncIterator[None]:
        """Hold one of the model's slots while the body runs (waiting if all are busy; a
        full queue is refused at once)."""
        if self.per_engine == 0:
            yield
            return
        lane = self._lane(item.model)
        capacity = self.capacity(engines)
        grew, lane.capacity = capacity > lane.capacity, capacity
        if grew:  # measured capacity went up: let waiting requests in first
            self._hand_over(lane)
        if lane.running < lane.capacity and not len(lane.policy):
            lane.running += 1
        else:
            await self._wait(lane, item)
        self.stats.admitted += 1
        try:
            yield
        finally:
            lane.running -= 1
            self._hand_over(lane)

    async def _wait(self, lane: _ModelLane, item: QueuedRequest) -> None:
        if self.stats.queued >= self.max_queue:
            self.stats.rejected += 1
            raise OverloadedError(
                f"the scheduler queue is full ({self.stats.queued} waiting)",
                retry_after=RETRY_AFTER_S,
            )
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        item.payload = future
        if not item.arrival:
            item.arrival = self.clock()
        lane.policy.push(item)
        self.stats.queued += 1
        try:
            await future  # resolved by _hand_over with the slot already counted
        except asyncio.CancelledError:
            if lane.policy.remove(item):
                self.stats.queued -= 1
            elif future.done() and not future.cancelled() and future.exception() is None:
                # The slot was handed to us just as we were cancelled: give it back.
                lane.running -= 1
                self._hand_over(lane)
            raise

    def _hand_over(self, lane: _ModelLane) -> None:
        while lane.running < lane.capacity and len(lane.policy):
            try:
                nxt = lane.policy.pop(self.clock())
            except Shed as shed:
                self.stats.queued -= 1
                self.stats.shed += 1
                future = shed.item.payload
                if isinstance(future, asyncio.Future) and not future.done():
                    future.set_exception(
                        OverloadedError(
                            shed.reason, code="slo_unattainable", retry_after=RETRY_AFTER_S
                        )
                    )
                continue
            if nxt is None:
                return
            self.stats.queued -= 1
            future = nxt.payload
            if isinstance(future, asyncio.Future) and not future.done():
                lane.running += 1
                future.set_result(None)

    def queued_for(self, model: str) -> int:
        """Requests of `model` waiting for a slot now."""
        lane = self._lanes.get(model)
        return len(lane.policy) if lane is not None else 0

    def finished(self, item: QueuedRequest, tokens: float) -> None:
        """Tell the model's policy what a request really cost (fair accounting)."""
        lane = self._lanes.get(item.model)
        if lane is not None:
            lane.policy.on_finish(item, tokens)
