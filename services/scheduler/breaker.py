"""Per-engine circuit breakers: stop sending requests to an engine that keeps failing.

closed → open after `failures` consecutive engine failures (refused connections, timeouts,
5xx); an open engine is left out of routing until its cool-down ends; then one half-open
probe request goes through: success closes the breaker, failure re-opens it with a doubled
cool-down (capped). A 4xx is the client's fault and proves the engine answers, so it counts
as success. No I/O here: the clock is injected and the scheduler reports outcomes.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from sage.common.exceptions import (
    DeadlineExceededError,
    OverloadedError,
    SageError,
    UpstreamError,
)

log = logging.getLogger("sage.scheduler.breaker")


class BreakerState(StrEnum):
    """Where one engine's breaker stands."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Outcome(StrEnum):
    """How one engine call ended, as far as the engine's health goes."""

    SUCCESS = "success"
    FAILURE = "failure"
    NEUTRAL = "neutral"  # says nothing about the engine (client went away, 429)


def classify(exc: BaseException) -> Outcome:
    """Engine faults (unreachable, timeout, 5xx) are failures; a 4xx reply is success."""
    if isinstance(exc, UpstreamError | DeadlineExceededError):
        return Outcome.FAILURE
    if isinstance(exc, OverloadedError) or not isinstance(exc, SageError):
        return Outcome.NEUTRAL
    return Outcome.SUCCESS


@dataclass
class EngineBreaker:
    """One engine's breaker state and counters (read by metrics at scrape time)."""

    state: BreakerState = BreakerState.CLOSED
    consecutive_failures: int = 0
    open_until: float = 0.0
    cooldown_s: float = 0.0
    probing: bool = False
    attempts: int = 0
    failures: int = 0
    opened: int = 0
    probes: int = 0


E = TypeVar("E")


class EngineCall:
    """One claimed engine call; `succeeded()` settles it early (a stream's first byte)."""

    __slots__ = ("breakers", "engine_id", "settled")

    def __init__(self, breakers: CircuitBreakers, engine_id: str) -> None:
        self.breakers = breakers
        self.engine_id = engine_id
        self.settled = False

    def succeeded(self) -> None:
        """Record success now; later errors of this call no longer count."""
        if not self.settled:
            self.settled = True
            self.breakers.record(self.engine_id, Outcome.SUCCESS)


class CircuitBreakers:
    """The breakers of every engine, keyed by engine id."""

    def __init__(
        self,
        failures: int = 5,
        cooldown_s: float = 5.0,
        *,
        max_cooldown_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = max(1, failures)
        self.cooldown_s = cooldown_s
        self.max_cooldown_s = max(cooldown_s, max_cooldown_s)
        self.clock = clock
        self.engines: dict[str, EngineBreaker] = {}
        # Engines whose breaker is not closed (kept by _move and forget): while it is
        # empty, routable() hands its input back untouched instead of scanning every engine
        # per request.
        self._tripped: set[str] = set()

    def _get(self, engine_id: str) -> EngineBreaker:
        breaker = self.engines.get(engine_id)
        if breaker is None:
            breaker = self.engines[engine_id] = EngineBreaker()
        return breaker

    def state(self, engine_id: str) -> BreakerState:
        """The engine's state; an open breaker whose cool-down ended is reported half-open."""
        breaker = self.engines.get(engine_id)
        if breaker is None:
            return BreakerState.CLOSED
        if breaker.state is BreakerState.OPEN and self.clock() >= breaker.open_until:
            return BreakerState.HALF_OPEN
        return breaker.state

    def routable(self, engines: Sequence[E], engine_id: Callable[[E], str]) -> Sequence[E]:
        """The engines routing may use: closed ones, and open ones due a probe. When every
        engine is open, the one whose cool-down ends first, so requests are not refused.
        With every breaker closed, `engines` itself (the same object: callers cache by it)."""
        if not self._tripped:
            return engines
        now = self.clock()
        allowed: list[E] = []
        for engine in engines:
            breaker = self.engines.get(engine_id(engine))
            if (
                breaker is None
                or breaker.state is BreakerState.CLOSED
                or (breaker.state is BreakerState.OPEN and now >= breaker.open_until)
            ):
                allowed.append(engine)
        if allowed or not engines:
            return allowed
        return [min(engines, key=lambda e: self._get(engine_id(e)).open_until)]

    def begin(self, engine_id: str, *, force: bool = False) -> bool:
        """Claim one call to the engine; False when it should be skipped (open, or its
        probe is already out). `force` (the last engine left) always claims."""
        breaker = self._get(engine_id)
        if breaker.state is not BreakerState.CLOSED:
            due = breaker.state is BreakerState.OPEN and self.clock() >= breaker.open_until
            if not (due or force):
                return False
            if breaker.state is BreakerState.OPEN:
                self._move(engine_id, breaker, BreakerState.HALF_OPEN)
            breaker.probing = True
            breaker.probes += 1
        breaker.attempts += 1
        return True

    def record(self, engine_id: str, outcome: Outcome) -> None:
        """Report how a call claimed with `begin` ended."""
        breaker = self._get(engine_id)
        probe, breaker.probing = breaker.probing, False
        if outcome is Outcome.SUCCESS:
            breaker.consecutive_failures = 0
            breaker.cooldown_s = 0.0
            if breaker.state is not BreakerState.CLOSED:
                self._move(engine_id, breaker, BreakerState.CLOSED)
        elif outcome is Outcome.FAILURE:
            breaker.failures += 1
            breaker.consecutive_failures += 1
            if breaker.state is BreakerState.HALF_OPEN or (
                breaker.state is BreakerState.CLOSED
                and breaker.consecutive_failures >= self.threshold
            ):
                self._open(engine_id, breaker)
        elif probe and breaker.state is BreakerState.HALF_OPEN:
            # The probe told us nothing: let the next request probe instead.
            self._move(engine_id, breaker, BreakerState.OPEN)

    def record_exception(self, engine_id: str, exc: BaseException) -> None:
        """`record` with the outcome `classify` gives the exception."""
        self.record(engine_id, classify(exc))

    @contextlib.contextmanager
    def guard(self, engine_id: str) -> Iterator[EngineCall]:
        """Record the outcome of the call in the body (claimed with `begin`) when it ends,
        unless `EngineCall.succeeded()` settled it earlier."""
        call = EngineCall(self, engine_id)
        try:
            yield call
        except BaseException as exc:
            if not call.settled:
                call.settled = True
                self.record_exception(engine_id, exc)
            raise
        call.succeeded()

    def forget(self, engine_id: str) -> None:
        """Drop an engine's breaker (it was deregistered)."""
        self.engines.pop(engine_id, None)
        self._tripped.discard(engine_id)

    def _open(self, engine_id: str, breaker: EngineBreaker) -> None:
        breaker.cooldown_s = (
            min(breaker.cooldown_s * 2, self.max_cooldown_s)
            if breaker.cooldown_s
            else self.cooldown_s
        )
        breaker.open_until = self.clock() + breaker.cooldown_s
        breaker.opened += 1
        self._move(engine_id, breaker, BreakerState.OPEN)

    def _move(self, engine_id: str, breaker: EngineBreaker, state: BreakerState) -> None:
        log.info(
            "circuit breaker %s: %s -> %s",
            engine_id,
            breaker.state.value,
            state.value,
            extra={
                "engine_id": engine_id,
                "breaker_state": state.value,
                "cooldown_s": breaker.cooldown_s,
                "consecutive_failures": breaker.consecutive_failures,
            },
        )
        breaker.state = state
        if state is BreakerState.CLOSED:
            self._tripped.discard(engine_id)
        else:
            self._tripped.add(engine_id)
