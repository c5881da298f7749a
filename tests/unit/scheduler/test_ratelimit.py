"""Per-tenant token buckets on requests and tokens per minute."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sage.common.exceptions import RateLimitError
from sage.services.scheduler.core import RequestBody, estimate_tokens
from sage.services.scheduler.ratelimit import TenantLimits, TenantRateLimiter


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"max_tokens": 100, "n": 2}', 27 // 4 + 200),
        (b'{"max_completion_tokens": 9, "max_tokens": 100}', 47 // 4 + 9),
        # a direct gRPC caller's body is not validated: odd fields count as absent
        (b'{"max_tokens": true, "n": -3}', 29 // 4),
        (b'{"max_tokens": "900"}', 21 // 4),
        (b"[1, 2]", 6 // 4),
        (b"not json", 8 // 4),
        (b'{"max_tokens": 4294967296, "n": 4294967296}', 2**31 - 1),
    ],
)
def test_the_token_estimate_reads_the_body_whoever_sent_it(body: bytes, expected: int) -> None:
    assert estimate_tokens(RequestBody(body)) == expected


def test_requests_per_minute_with_retry_after() -> None:
    clock = Clock()
    limiter = TenantRateLimiter(clock)
    limits = TenantLimits("team-a", requests_per_minute=2)
    limiter.admit(limits, 10)
    limiter.admit(limits, 10)
    with pytest.raises(RateLimitError) as info:
        limiter.admit(limits, 10)
    assert info.value.retry_after == pytest.approx(30.0)
    assert info.value.code == "rate_limit_exceeded"
    assert "requests per minute" in info.value.message
    clock.now += 29
    with pytest.raises(RateLimitError) as again:
        limiter.admit(limits, 10)
    assert again.value.retry_after == pytest.approx(1.0)
    clock.now += 1
    limiter.admit(limits, 10)


def test_tenants_are_independent() -> None:
    limiter = TenantRateLimiter(Clock())
    limiter.admit(TenantLimits("a", requests_per_minute=1), 1)
    with pytest.raises(RateLimitError):
        limiter.admit(TenantLimits("a", requests_per_minute=1), 1)
    limiter.admit(TenantLimits("b", requests_per_minute=1), 1)


def test_tokens_per_minute_and_settlement() -> None:
    clock = Clock()
    limiter = TenantRateLimiter(clock)
    limits = TenantLimits("t", tokens_per_minute=600)
    limiter.admit(limits, 500)
    with pytest.raises(RateLimitError) as info:
        limiter.admit(limits, 500)
    # 100 left, 500 needed at 10 tokens/s
    assert info.value.retry_after == pytest.approx(40.0)
    assert "tokens per minute" in info.value.message
    # the engine reported 50 used: 450 come back
    limiter.settle(limits, 500, 50)
    limiter.admit(limits, 500)


def test_a_request_larger_than_the_budget_waits_for_a_full_bucket() -> None:
    clock = Clock()
    limiter = TenantRateLimiter(clock)
    limits = TenantLimits("t", tokens_per_minute=60)
    limiter.admit(limits, 600)  # admitted on a full bucket, owes 540
    with pytest.raises(RateLimitError) as info:
        limiter.admit(limits, 1)
    assert info.value.retry_after == pytest.approx(541.0)


def test_a_refused_request_charges_nothing() -> None:
    limiter = TenantRateLimiter(Clock())
    both = TenantLimits("t", requests_per_minute=5, tokens_per_minute=100)
    limiter.admit(both, 100)
    for _ in range(3):
        with pytest.raises(RateLimitError):
            limiter.admit(both, 50)
    # had the refusals taken requests, the request bucket would now be at 1
    clock_limits = TenantLimits("t", requests_per_minute=5)
    for _ in range(4):
        limiter.admit(clock_limits, 0)


def test_changed_limits_apply_at_once() -> None:
    limiter = TenantRateLimiter(Clock())
    for _ in range(3):
        limiter.admit(TenantLimits("t", requests_per_minute=100), 0)
    # the bucket shrinks to the new capacity: one more, then refused
    limiter.admit(TenantLimits("t", requests_per_minute=1), 0)
    with pytest.raises(RateLimitError):
        limiter.admit(TenantLimits("t", requests_per_minute=1), 0)


@given(
    rpm=st.integers(1, 1000),
    gaps=st.lists(st.floats(0, 5, allow_nan=False), min_size=1, max_size=200),
)
def test_never_admits_more_than_the_limit_per_minute(rpm: int, gaps: list[float]) -> None:
    clock = Clock()
    limiter = TenantRateLimiter(clock)
    limits = TenantLimits("t", requests_per_minute=rpm)
    admitted: list[float] = []
    for gap in gaps:
        clock.now += gap
        try:
            limiter.admit(limits, 0)
        except RateLimitError as exc:
            assert exc.retry_after is not None and exc.retry_after > 0
            continue
        admitted.append(clock.now)
    # any 60 s window holds at most the burst (rpm) plus what refills in it (rpm)
    for i, start in enumerate(admitted):
        in_window = sum(1 for t in admitted[i:] if t < start + 60)
        assert in_window <= 2 * rpm
