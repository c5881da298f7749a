from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from sage.services.scheduler.routing import RouteRequest, SessionAffinityRouter

from .helpers import FixedLoad, engines

KEYS = [f"session-{i}" for i in range(2000)]


def _assign(router: SessionAffinityRouter, n: int) -> dict[str, str]:
    pool = engines(n)
    return {k: router.pick(RouteRequest("m", k), pool).engine_id for k in KEYS}


def test_same_key_same_engine_and_keys_spread() -> None:
    router = SessionAffinityRouter()
    pool = engines(4)
    first = {k: router.pick(RouteRequest("m", k), pool).engine_id for k in KEYS[:200]}
    assert first == {k: router.pick(RouteRequest("m", k), pool).engine_id for k in KEYS[:200]}
    shares = Counter(_assign(router, 4).values())
    assert set(shares) == {"e0", "e1", "e2", "e3"}
    assert min(shares.values()) > len(KEYS) / 4 * 0.6  # virtual nodes keep arcs even


def test_order_of_engines_does_not_matter() -> None:
    router = SessionAffinityRouter()
    pool = engines(5)
    for key in KEYS[:100]:
        assert router.pick(RouteRequest("m", key), pool) == router.pick(
            RouteRequest("m", key), list(reversed(pool))
        )


@settings(max_examples=15, deadline=None)
@given(st.integers(2, 12))
def test_adding_an_engine_moves_about_one_nth_of_sessions(n: int) -> None:
    router = SessionAffinityRouter()
    before = _assign(router, n)
    after = _assign(router, n + 1)
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(after[k] == f"e{n}" for k in moved)  # only onto the new engine
    assert len(moved) <= 2 * len(KEYS) / (n + 1)


def test_removing_an_engine_moves_only_its_sessions() -> None:
    router = SessionAffinityRouter()
    before = _assign(router, 6)
    pool = [e for e in engines(6) if e.engine_id != "e2"]
    after = {k: router.pick(RouteRequest("m", k), pool).engine_id for k in KEYS}
    assert all(after[k] == before[k] for k in KEYS if before[k] != "e2")


def test_no_key_falls_back_to_least_loaded() -> None:
    router = SessionAffinityRouter(FixedLoad({"e0": 5.0, "e1": 1.0, "e2": 3.0}))
    assert router.pick(RouteRequest("m"), engines(3)).engine_id == "e1"
