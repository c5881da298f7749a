from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sage.services.scheduler.routing import PrefixAwareRouter, RouteRequest
from sage.services.scheduler.routing.prefix_aware import PrefixIndex, block_hashes

from .helpers import FixedLoad, engines

SYSTEM = "You are a helpful assistant. " * 10  # 290 chars: four whole 64-char blocks


def test_block_hashes_are_chained_and_ignore_a_partial_tail() -> None:
    a = block_hashes("a" * 64 + "b" * 64 + "c" * 10)
    b = block_hashes("x" * 64 + "b" * 64)
    assert len(a) == 2 and len(b) == 2
    assert a[1] != b[1]  # the same second block after a different first one differs
    assert block_hashes("short") == []


def test_index_is_lru_bounded() -> None:
    index = PrefixIndex(capacity=3)
    index.add([1, 2, 3])
    index.add([1])  # refresh 1
    index.add([4])  # evicts 2, the least recently used
    assert len(index) == 3
    assert index.match([1]) == 1 and index.match([2]) == 0


def test_repeated_prefix_sticks_and_new_prefixes_go_least_loaded() -> None:
    load = FixedLoad()
    router = PrefixAwareRouter(load, load_margin=2.0)
    pool = engines(3)
    first = router.pick(RouteRequest("m", prefix=SYSTEM + "question one"), pool)
    for i in range(10):
        again = router.pick(RouteRequest("m", prefix=SYSTEM + f"question {i}"), pool)
        assert again == first
    load.values[first.engine_id] = 1.0
    other = router.pick(RouteRequest("m", prefix="Z" * 300), pool)
    assert other != first


def test_longest_match_wins() -> None:
    router = PrefixAwareRouter(FixedLoad())
    pool = engines(2)
    short_doc = "d" * 128
    long_doc = short_doc + "e" * 256
    a = router.pick(RouteRequest("m", prefix=short_doc), pool)
    # a different, longer prefix sharing nothing lands elsewhere (ties rotate)
    b = router.pick(RouteRequest("m", prefix="q" * 512), pool)
    assert a != b
    router_b_index = router.pick(RouteRequest("m", prefix=long_doc), pool)
    assert router_b_index == a  # shares the first two blocks with a's cache


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 6), st.floats(0, 5), st.lists(st.integers(0, 3), min_size=1, max_size=30))
def test_sticks_until_the_load_guard_trips(n: int, margin: float, increments: list[int]) -> None:
    load = FixedLoad()
    router = PrefixAwareRouter(load, load_margin=margin)
    pool = engines(n)
    home = router.pick(RouteRequest("m", prefix=SYSTEM), pool)
    for step in increments:
        load.values[home.engine_id] = load.load(home.engine_id) + step
        chosen = router.pick(RouteRequest("m", prefix=SYSTEM), pool)
        least = min(load.load(e.engine_id) for e in pool)
        if load.load(home.engine_id) - least > margin:
            assert load.load(chosen.engine_id) == least  # guard: hot prefix spills over
        else:
            assert chosen == home
        if chosen != home:
            break  # the spill engine now caches the prefix too


def test_departed_engines_are_forgotten() -> None:
    router = PrefixAwareRouter(FixedLoad())
    pool = engines(3)
    home = router.pick(RouteRequest("m", prefix=SYSTEM), pool)
    rest = [e for e in pool if e != home]
    assert router.pick(RouteRequest("m", prefix=SYSTEM), rest) in rest
    assert home.engine_id not in router._indexes["m"]
