"""Queueing policies, tested directly (no scheduler, no gRPC)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sage.common.exceptions import ConfigurationError
from sage.services.scheduler.policies import (
    POLICY_NAMES,
    QueuedRequest,
    RequestClass,
    Shed,
    create_policy,
)
from sage.services.scheduler.policies.fair import FairPolicy
from sage.services.scheduler.policies.priority import PriorityPolicy
from sage.services.scheduler.policies.slo_aware import SloAwarePolicy


def req(**kw: object) -> QueuedRequest:
    return QueuedRequest(model="m", **kw)  # type: ignore[arg-type]


def drain(policy: object, now: float = 0.0) -> list[QueuedRequest]:
    out = []
    while (item := policy.pop(now)) is not None:  # type: ignore[attr-defined]
        out.append(item)
    return out


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_policy_returns_every_request_once(name: str) -> None:
    policy = create_policy(name)
    items = [
        req(tenant=f"t{i % 3}", priority=i % 3, cost=10 + i, arrival=i * 0.01, deadline=10 + i)
        for i in range(30)
    ]
    for item in items:
        policy.push(item)
    assert len(policy) == 30
    assert policy.remove(items[5]) and not policy.remove(items[5])
    out = drain(policy, now=1.0)
    assert sorted(i.seq for i in out) == sorted(i.seq for i in items if i is not items[5])
    assert len(policy) == 0


def test_unknown_policy_name_is_an_error() -> None:
    with pytest.raises(ConfigurationError) as info:
        create_policy("round_robin_please")
    assert "fifo" in info.value.message and info.value.param == "policy"
    with pytest.raises(ConfigurationError):
        create_policy("fifo:extra")


def test_fifo_keeps_arrival_order() -> None:
    policy = create_policy("fifo")
    items = [req() for _ in range(5)]
    for item in items:
        policy.push(item)
    assert drain(policy) == items


def test_priority_serves_high_class_first_but_ages_low_class() -> None:
    policy = PriorityPolicy(aging_s=1.0)
    low = req(priority=2, arrival=0.0)
    policy.push(low)
    high = req(priority=0, arrival=0.5)
    policy.push(high)
    assert policy.pop(now=0.6) is high  # no aging yet: class 0 wins
    policy.push(high2 := req(priority=0, arrival=2.9))
    # low has waited 3 s = 3 classes of credit: effective -1 < 0
    assert policy.pop(now=3.0) is low
    assert policy.pop(now=3.0) is high2


def test_fair_heavy_tenant_cannot_starve_light_one() -> None:
    policy = FairPolicy()
    for _ in range(50):
        policy.push(req(tenant="heavy", cost=100))
    policy.push(light := req(tenant="light", cost=100))
    first_two = [policy.pop(0.0), policy.pop(0.0)]
    assert light in first_two


def test_fair_returning_tenant_cannot_bank_idle_time() -> None:
    policy = FairPolicy()
    for _ in range(10):
        policy.push(req(tenant="a", cost=100))
    for _ in range(5):
        policy.pop(0.0)  # a's counter grows to 500
    for _ in range(10):
        policy.push(req(tenant="b", cost=100))  # b joins: lifted to a's level, not 0
    served = [policy.pop(0.0).tenant for _ in range(6)]  # type: ignore[union-attr]
    assert served.count("a") >= 2  # interleaved, not b six times in a row


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(1, 500)), min_size=1, max_size=60
    )
)
def test_fair_never_lets_counters_drift_apart_by_more_than_one_request(
    arrivals: list[tuple[str, int]],
) -> None:
    """While tenants all have work queued, the served-token counters stay within the
    largest single request of each other (VTC's bound) — nobody starves."""
    policy = FairPolicy()
    for tenant, cost in arrivals:
        policy.push(req(tenant=tenant, cost=float(cost)))
    max_cost = max(c for _, c in arrivals)
    while len(policy):
        waiting = {t for t, q in policy._queues.items() if q}
        policy.pop(0.0)
        live = [policy.counters[t] for t in waiting]
        assert max(live) - min(live) <= 2 * max_cost


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), min_size=1, max_size=40))
def test_slo_aware_pops_in_deadline_order(deadlines: list[float]) -> None:
    policy = SloAwarePolicy()
    for d in deadlines:
        policy.push(req(deadline=d))
    popped = [i.deadline for i in drain(policy, now=0.0)]
    assert popped == sorted(deadlines)


def test_slo_aware_demotes_or_sheds_hopeless_requests() -> None:
    predict = lambda item: 5.0  # noqa: E731 - every request takes 5 s
    demote = SloAwarePolicy(predict, on_miss="demote")
    hopeless = req(deadline=1.0, arrival=0.0)
    feasible = req(deadline=20.0, arrival=0.1)
    demote.push(hopeless)
    demote.push(feasible)
    assert drain(demote, now=0.5) == [feasible, hopeless]
    shed = SloAwarePolicy(predict, on_miss="shed")
    shed.push(hopeless)
    with pytest.raises(Shed) as info:
        shed.pop(0.5)
    assert info.value.item is hopeless and len(shed) == 0


def test_hybrid_lets_embeddings_pass_llm_queue() -> None:
    policy = create_policy("hybrid:fifo")
    chat = req()
    emb = req(request_class=RequestClass.EMBEDDING)
    policy.push(chat)
    policy.push(emb)
    assert drain(policy) == [emb, chat]


def test_cost_optimized_prefers_short_jobs_but_ages() -> None:
    policy = create_policy("cost_optimized")
    long = req(cost=2000, arrival=0.0)
    short = req(cost=10, arrival=0.0)
    policy.push(long)
    policy.push(short)
    assert policy.pop(0.0) is short
    policy.push(short2 := req(cost=10, arrival=100.0))
    assert policy.pop(100.0) is long  # waited 100 s: 5000 tokens of credit
    assert policy.pop(100.0) is short2
