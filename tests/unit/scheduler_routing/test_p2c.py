from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from sage.services.scheduler.routing import PowerOfTwoRouter, RouteRequest
from sage.services.scheduler.routing.base import LoadView

from .helpers import FixedLoad, engines


class _Recording:
    """Records the engines whose load the router read (its two candidates)."""

    def __init__(self, inner: LoadView) -> None:
        self.inner = inner
        self.seen: list[str] = []

    def load(self, engine_id: str) -> float:
        self.seen.append(engine_id)
        return self.inner.load(engine_id)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 10), min_size=2, max_size=8), st.integers(0, 2**32))
def test_never_picks_the_more_loaded_of_its_two(loads: list[int], seed: int) -> None:
    pool = engines(len(loads))
    view = _Recording(FixedLoad({e.engine_id: float(v) for e, v in zip(pool, loads, strict=True)}))
    router = PowerOfTwoRouter(view, random.Random(seed))
    for _ in range(5):
        view.seen.clear()
        chosen = router.pick(RouteRequest("m"), pool)
        assert len(set(view.seen)) == 2  # two distinct candidates
        assert chosen.engine_id in view.seen
        assert view.inner.load(chosen.engine_id) == min(view.inner.load(e) for e in view.seen)


def test_single_engine_and_seeded_determinism() -> None:
    one = engines(1)
    assert PowerOfTwoRouter(FixedLoad()).pick(RouteRequest("m"), one) is one[0]
    pool = engines(5)
    first = [PowerOfTwoRouter(FixedLoad(), random.Random(7)).pick(RouteRequest("m"), pool)]
    again = [PowerOfTwoRouter(FixedLoad(), random.Random(7)).pick(RouteRequest("m"), pool)]
    assert first == again


def test_the_max_loaded_engine_is_never_chosen() -> None:
    pool = engines(4)
    router = PowerOfTwoRouter(FixedLoad({"e3": 100.0}), random.Random(1))
    picks = Counter(router.pick(RouteRequest("m"), pool).engine_id for _ in range(300))
    assert "e3" not in picks
    assert set(picks) == {"e0", "e1", "e2"}
