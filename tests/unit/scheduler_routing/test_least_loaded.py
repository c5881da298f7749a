from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sage.services.scheduler.load import EngineLoadTracker
from sage.services.scheduler.routing import LeastLoadedRouter, RouteRequest

from .helpers import FixedLoad, engines


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 20), min_size=1, max_size=8))
def test_picks_an_engine_with_minimal_load(loads: list[int]) -> None:
    pool = engines(len(loads))
    view = FixedLoad({e.engine_id: float(v) for e, v in zip(pool, loads, strict=True)})
    router = LeastLoadedRouter(view)
    for _ in range(3):
        assert view.load(router.pick(RouteRequest("m"), pool).engine_id) == min(loads)


def test_ties_rotate_so_idle_engines_share_sequential_work() -> None:
    router = LeastLoadedRouter(FixedLoad())
    pool = engines(3)
    assert {router.pick(RouteRequest("m"), pool).engine_id for _ in range(3)} == {"e0", "e1", "e2"}


def test_concurrent_requests_spread_evenly_with_the_tracker() -> None:
    tracker = EngineLoadTracker()
    router = LeastLoadedRouter(tracker)
    pool = engines(3)
    held = []
    for _ in range(9):
        engine = router.pick(RouteRequest("m"), pool)
        ctx = tracker.track(engine.engine_id)
        ctx.__enter__()
        held.append(ctx)
    assert [tracker.in_flight(e.engine_id) for e in pool] == [3, 3, 3]
    for ctx in held:
        ctx.__exit__(None, None, None)
    assert [tracker.in_flight(e.engine_id) for e in pool] == [0, 0, 0]
