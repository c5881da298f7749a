"""The circuit breaker's state machine, on an injected clock."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from sage.common.exceptions import (
    DeadlineExceededError,
    InvalidRequestError,
    OverloadedError,
    UpstreamError,
)
from sage.services.scheduler.breaker import BreakerState, CircuitBreakers, Outcome, classify
from sage.services.scheduler.executor import EngineUnreachableError


@dataclass
class Clock:
    """A manual monotonic clock."""

    now: float = 100.0

    def __call__(self) -> float:
        return self.now


def _ident(engine: str) -> str:
    return engine


def _fail(breakers: CircuitBreakers, engine: str, times: int) -> None:
    for _ in range(times):
        assert breakers.begin(engine, force=True)
        breakers.record(engine, Outcome.FAILURE)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def breakers(clock: Clock) -> CircuitBreakers:
    return CircuitBreakers(3, 5.0, max_cooldown_s=12.0, clock=clock)


def test_opens_after_consecutive_failures_only(breakers: CircuitBreakers) -> None:
    _fail(breakers, "a", 2)
    breakers.begin("a")
    breakers.record("a", Outcome.SUCCESS)  # resets the run
    _fail(breakers, "a", 2)
    assert breakers.state("a") is BreakerState.CLOSED
    _fail(breakers, "a", 1)
    assert breakers.state("a") is BreakerState.OPEN
    assert breakers.engines["a"].opened == 1


def test_open_engines_are_not_routable_until_cooldown(
    breakers: CircuitBreakers, clock: Clock
) -> None:
    _fail(breakers, "a", 3)
    assert breakers.routable(["a", "b"], _ident) == ["b"]
    assert not breakers.begin("a")
    clock.now += 5.0
    assert breakers.state("a") is BreakerState.HALF_OPEN
    assert breakers.routable(["a", "b"], _ident) == ["a", "b"]


def test_single_half_open_probe_success_closes(breakers: CircuitBreakers, clock: Clock) -> None:
    _fail(breakers, "a", 3)
    clock.now += 5.0
    assert breakers.begin("a")
    assert breakers.engines["a"].probes == 1
    # While the probe is out, nobody else gets through (nor is it routed).
    assert not breakers.begin("a")
    assert breakers.routable(["a", "b"], _ident) == ["b"]
    breakers.record("a", Outcome.SUCCESS)
    assert breakers.state("a") is BreakerState.CLOSED
    assert breakers.routable(["a"], _ident) == ["a"]


def test_failed_probe_reopens_with_longer_capped_cooldown(
    breakers: CircuitBreakers, clock: Clock
) -> None:
    _fail(breakers, "a", 3)
    cooldowns = []
    for _ in range(3):
        clock.now = breakers.engines["a"].open_until
        assert breakers.begin("a")
        breakers.record("a", Outcome.FAILURE)
        assert breakers.state("a") is BreakerState.OPEN
        cooldowns.append(breakers.engines["a"].cooldown_s)
    assert cooldowns == [10.0, 12.0, 12.0]
    clock.now = breakers.engines["a"].open_until
    breakers.begin("a")
    breakers.record("a", Outcome.SUCCESS)
    _fail(breakers, "a", 3)
    assert breakers.engines["a"].cooldown_s == 5.0  # success reset the back-off


def test_neutral_probe_lets_the_next_request_probe(breakers: CircuitBreakers, clock: Clock) -> None:
    _fail(breakers, "a", 3)
    clock.now += 5.0
    assert breakers.begin("a")
    breakers.record("a", Outcome.NEUTRAL)  # e.g. the client went away
    assert breakers.begin("a")


def test_all_open_routes_to_the_one_whose_cooldown_ends_first(
    breakers: CircuitBreakers, clock: Clock
) -> None:
    _fail(breakers, "a", 3)
    clock.now += 1.0
    _fail(breakers, "b", 3)
    assert breakers.routable(["b", "a"], _ident) == ["a"]
    assert breakers.begin("a", force=True)  # the last candidate is always tried
    assert breakers.state("a") is BreakerState.HALF_OPEN


def test_classify_engine_faults_but_not_client_errors() -> None:
    assert classify(EngineUnreachableError("refused")) is Outcome.FAILURE
    assert classify(UpstreamError("HTTP 500")) is Outcome.FAILURE
    assert classify(DeadlineExceededError("timeout")) is Outcome.FAILURE
    assert classify(InvalidRequestError("bad")) is Outcome.SUCCESS
    assert classify(OverloadedError("busy")) is Outcome.NEUTRAL
    assert classify(asyncio.CancelledError()) is Outcome.NEUTRAL


def test_guard_records_exceptions_and_early_success(breakers: CircuitBreakers) -> None:
    for _ in range(3):
        breakers.begin("a")
        with pytest.raises(EngineUnreachableError), breakers.guard("a"):
            raise EngineUnreachableError("refused")
    assert breakers.state("a") is BreakerState.OPEN
    breakers.begin("b")
    with pytest.raises(UpstreamError), breakers.guard("b") as call:
        call.succeeded()  # a stream's first byte arrived
        raise UpstreamError("mid-stream")
    assert breakers.engines["b"].failures == 0


def test_state_changes_are_logged(
    breakers: CircuitBreakers, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="sage.scheduler.breaker"):
        _fail(breakers, "a", 3)
    assert any("closed -> open" in r.getMessage() for r in caplog.records)
