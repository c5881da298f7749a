"""The per-request indexes and caches that keep routing cost flat in the number of engines
stay right while engines register, deregister, change state and trip breakers: each one is
checked against the plain scan it replaces."""

from __future__ import annotations

import random
from contextlib import AbstractContextManager
from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry

from sage.common.exceptions import ModelNotFoundError
from sage.engines.vllm_metrics import VllmLoad
from sage.services.scheduler.admission import AdmissionController
from sage.services.scheduler.breaker import CircuitBreakers, Outcome
from sage.services.scheduler.core import Scheduler
from sage.services.scheduler.executor import HttpExecutionCoordinator
from sage.services.scheduler.load import EngineLoadTracker
from sage.services.scheduler.registry import EngineKind, EngineRecord, EngineRegistry, EngineState
from sage.services.scheduler.routing import (
    LeastLoadedRouter,
    RoundRobinRouter,
    RouteRequest,
    SessionAffinityRouter,
    failover_order,
    failover_view,
)
from sage.services.scheduler.routing.base import least_loaded
from sage.services.scheduler.routing.load_index import LoadIndexes
from sage.services.scheduler.routing.pd import PdRouter

from .helpers import engines


def _registry(records: list[EngineRecord]) -> EngineRegistry:
    registry = EngineRegistry()
    for record in records:
        registry.register(record)
    return registry


def test_ready_for_by_kind_follows_register_state_and_deregister() -> None:
    llm = engines(3)
    vectors = EngineRecord("x0", "m", EngineKind.EMBEDDING, "http://127.0.0.1:9100")
    registry = _registry([*llm, vectors])
    first = registry.ready_for("m", EngineKind.LLM)
    assert [e.engine_id for e in first] == ["e0", "e1", "e2"]
    assert registry.ready_for("m", EngineKind.LLM) is first  # unchanged: the same tuple
    assert [e.engine_id for e in registry.ready_for("m", EngineKind.EMBEDDING)] == ["x0"]

    registry.set_state("e1", EngineState.DRAINING)
    assert [e.engine_id for e in registry.ready_for("m", EngineKind.LLM)] == ["e0", "e2"]
    registry.register(replace(llm[1], aliases=("alias",)))  # back, ready, with an alias
    assert [e.engine_id for e in registry.ready_for("alias", EngineKind.LLM)] == ["e1"]
    # Back in routing (an engine ready again joins its model's tuple at the end).
    assert [e.engine_id for e in registry.ready_for("m", EngineKind.LLM)] == ["e0", "e2", "e1"]
    for engine_id in ("e0", "e1", "e2"):
        registry.deregister(engine_id)
    with pytest.raises(ModelNotFoundError):
        registry.ready_for("m", EngineKind.LLM)
    with pytest.raises(ModelNotFoundError):
        registry.ready_for("alias", EngineKind.LLM)
    assert [e.engine_id for e in registry.ready_for("m", EngineKind.EMBEDDING)] == ["x0"]


def test_routable_skips_the_scan_only_while_every_breaker_is_closed() -> None:
    now = [100.0]
    breakers = CircuitBreakers(2, 5.0, clock=lambda: now[0])
    pool = ("a", "b", "c")
    assert breakers.routable(pool, str) is pool
    for _ in range(2):
        assert breakers.begin("b")
        breakers.record("b", Outcome.FAILURE)
    assert list(breakers.routable(pool, str)) == ["a", "c"]  # b is open
    now[0] += 5.0
    assert list(breakers.routable(pool, str)) == ["a", "b", "c"]  # due a probe
    assert breakers.begin("b")
    assert list(breakers.routable(pool, str)) == ["a", "c"]  # its probe is out
    breakers.record("b", Outcome.SUCCESS)
    assert breakers.routable(pool, str) is pool  # closed again
    for _ in range(2):
        assert breakers.begin("c")
        breakers.record("c", Outcome.FAILURE)
    assert list(breakers.routable(pool, str)) == ["a", "b"]
    breakers.forget("c")  # deregistered while open
    assert breakers.routable(pool, str) is pool


def test_least_loaded_tree_answers_what_the_scan_answers_through_changes() -> None:
    rng = random.Random(18)
    tracker = EngineLoadTracker()
    indexes = LoadIndexes(tracker)
    registry = _registry(engines(37))
    held: list[AbstractContextManager[None]] = []
    for step in range(1500):
        op = rng.random()
        ids = [e.engine_id for e in registry.engines()]
        if op < 0.35:
            engine_id = rng.choice(ids)
            ctx = tracker.track(engine_id)
            ctx.__enter__()
            held.append(ctx)
        elif op < 0.65 and held:
            held.pop(rng.randrange(len(held))).__exit__(None, None, None)
        elif op < 0.8:
            tracker.report(rng.choice(ids), float(rng.randint(0, 6)))
        elif op < 0.85:
            tracker.retain(rng.sample(ids, len(ids) // 2))  # forgets the others' reports
        elif op < 0.92:
            victim = rng.choice(ids)
            if len(ids) > 1:
                registry.deregister(victim)
        else:
            fresh = f"n{step}"
            registry.register(EngineRecord(fresh, "m", EngineKind.LLM, "http://127.0.0.1:1"))
        pool = registry.ready_for("m", EngineKind.LLM)
        for start in (step, step + 1, rng.randrange(1000)):
            expected = least_loaded(pool, tracker, start)
            assert indexes.least("m", pool, start) == expected
        assert indexes.tree("m", pool) is not None  # the tree, not the scan, answered


def test_least_loaded_router_keeps_rotating_ties_like_the_scan() -> None:
    tracker = EngineLoadTracker()
    pool = tuple(engines(5))
    router = LeastLoadedRouter(tracker)
    with tracker.track("e1"), tracker.track("e3"):
        picked = [router.pick(RouteRequest("m"), pool).engine_id for _ in range(6)]
    assert picked == ["e0", "e2", "e2", "e4", "e4", "e0"]


def test_failover_view_is_failover_order_built_on_demand() -> None:
    pool = tuple(engines(6))
    for turn in range(8):
        # Two routers in step: `turn` picks each, then one answers each way.
        ref_router, view_router = RoundRobinRouter(), RoundRobinRouter()
        for _ in range(turn):
            ref_router.pick(RouteRequest("m"), pool)
            view_router.pick(RouteRequest("m"), pool)
        expected = failover_order(ref_router, RouteRequest("m"), pool)
        view = failover_view(view_router, RouteRequest("m"), pool)
        assert view[0] == expected[0]
        assert len(view) == len(expected)
        assert list(view) == expected
        assert [view[i] for i in range(-len(view), len(view))] == expected + expected
        assert view[1:3] == expected[1:3]


def test_admission_capacity_is_recomputed_when_measured_capacity_or_engines_change() -> None:
    measured = {"e0": 0, "e1": 0}
    version = [0]
    admission = AdmissionController(
        measured=lambda engine_id: measured.get(engine_id, 0),
        measured_version=lambda: version[0],
    )
    pool = tuple(replace(e, backend="transformers") for e in engines(2))
    assert admission.capacity(pool) == 128  # 2 x the backend's default 64
    measured["e0"] = 4
    assert admission.capacity(pool) == 128  # cached until the tracker says it changed
    version[0] += 1
    assert admission.capacity(pool) == 68
    grown = (*pool, replace(engines(3)[2], backend="transformers"))
    assert admission.capacity(grown) == 132  # another tuple: summed afresh


def test_admission_capacity_follows_the_trackers_measurements() -> None:
    tracker = EngineLoadTracker()
    admission = AdmissionController(
        measured=tracker.capacity, measured_version=lambda: tracker.capacity_version
    )
    pool = tuple(engines(2))
    assert admission.capacity(pool) == 512
    tracker.observe("e0", VllmLoad(running=3.0, waiting=2.0), ceiling=256)
    assert admission.capacity(pool) == 259
    tracker.retain(["e1"])  # e0 deregistered: measured afresh if it comes back
    assert admission.capacity(pool) == 512


async def test_pd_pools_follow_the_registry_tuple() -> None:
    registry = _registry(engines(2))
    pd = PdRouter(RoundRobinRouter(), CollectorRegistry())
    calls: list[str] = []

    async def prefill(engine: EngineRecord, leg: bytes) -> bytes:
        calls.append(engine.engine_id)
        return b'{"kv_transfer_params": {"remote_engine_id": "p"}}'

    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    pool = registry.ready_for("m", EngineKind.LLM)
    assert await pd.plan(RouteRequest("m"), body, pool, prefill) is None
    registry.register(EngineRecord("p0", "m", EngineKind.LLM, "http://127.0.0.1:1", role="prefill"))
    registry.register(EngineRecord("d0", "m", EngineKind.LLM, "http://127.0.0.1:2", role="decode"))
    plan = await pd.plan(RouteRequest("m"), body, registry.ready_for("m", EngineKind.LLM), prefill)
    assert plan is not None and calls == ["p0"]
    assert [e.engine_id for e in plan.candidates] == ["d0", "e0", "e1"]
    registry.deregister("p0")
    assert (
        await pd.plan(RouteRequest("m"), body, registry.ready_for("m", EngineKind.LLM), prefill)
        is None
    )


def _room_first_by_scan(
    scheduler: Scheduler, route: RouteRequest, pool: tuple[EngineRecord, ...]
) -> list[EngineRecord]:
    """Scheduler._with_room_first as it was: always scanning every engine for room."""
    room = [
        e
        for e in pool
        if scheduler.load.in_flight(e.engine_id) < scheduler.admission.engine_capacity(e)
    ]
    if not room or len(room) == len(pool):
        return failover_order(scheduler.router, route, pool)
    ordered = failover_order(scheduler.router, route, room)
    first = {e.engine_id for e in ordered}
    return ordered + [e for e in pool if e.engine_id not in first]


def test_room_first_without_a_scan_orders_engines_as_the_scan_did() -> None:
    rng = random.Random(7)
    registry = _registry(engines(9))
    twins: list[Scheduler] = []
    for _ in range(2):  # one answers with the fast path, one by the scan; same inputs
        load = EngineLoadTracker()
        twins.append(
            Scheduler(
                registry,
                RoundRobinRouter(),
                HttpExecutionCoordinator(),
                admission=AdmissionController(per_engine=2),
                load=load,
            )
        )
    fast, scan = twins
    held: list[tuple[AbstractContextManager[None], AbstractContextManager[None]]] = []
    route = RouteRequest("m")
    for step in range(400):
        ids = [e.engine_id for e in registry.engines()]
        if rng.random() < 0.55:
            engine_id = rng.choice(ids)
            pair = (fast.load.track(engine_id), scan.load.track(engine_id))
            for entering in pair:
                entering.__enter__()
            held.append(pair)
        elif held:
            for leaving in held.pop(rng.randrange(len(held))):
                leaving.__exit__(None, None, None)
        if step % 50 == 49:  # an engine leaves and another joins: a new registry tuple
            registry.deregister(rng.choice(ids))
            registry.register(EngineRecord(f"n{step}", "m", EngineKind.LLM, "http://127.0.0.1:1"))
        pool = registry.ready_for("m", EngineKind.LLM)
        assert list(fast._with_room_first(route, pool)) == _room_first_by_scan(scan, route, pool)


def test_session_affinity_cache_moves_sessions_when_engines_change() -> None:
    registry = _registry(engines(8))
    cached = SessionAffinityRouter()
    keys = [f"user-{i}" for i in range(40)]

    def owners(router: SessionAffinityRouter) -> dict[str, str]:
        pool = registry.ready_for("m", EngineKind.LLM)
        return {k: router.pick(RouteRequest("m", session_key=k), pool).engine_id for k in keys}

    before = owners(cached)
    assert before == owners(cached)  # answered from the cache the second time
    moved = next(iter(before.values()))
    registry.deregister(moved)
    after = owners(cached)
    assert after == owners(SessionAffinityRouter())  # as a router that never cached
    assert moved not in after.values()
    assert {k: v for k, v in before.items() if v != moved} == {
        k: v for k, v in after.items() if before[k] != moved
    }
