"""Admission: per-model slots, waiting in policy order, cancellation, shedding, overload."""

from __future__ import annotations

import asyncio

import pytest

from sage.common.exceptions import InvalidRequestError, OverloadedError
from sage.services.scheduler.admission import AdmissionController, parse_priority
from sage.services.scheduler.policies import QueuedRequest


async def hold(
    admission: AdmissionController, item: QueuedRequest, log: list[str], release: asyncio.Event
) -> None:
    async with admission.slot(item, engines=1):
        log.append(item.tenant)
        await release.wait()


async def test_unlimited_admission_never_waits() -> None:
    admission = AdmissionController("fifo", per_engine=0)
    async with (
        admission.slot(QueuedRequest(model="m"), engines=1),
        admission.slot(QueuedRequest(model="m"), engines=1),
    ):
        assert admission.stats.queued == 0


async def test_waiters_run_in_priority_order_when_slots_free() -> None:
    admission = AdmissionController("priority", per_engine=1)
    release = asyncio.Event()
    log: list[str] = []
    first = asyncio.create_task(
        hold(admission, QueuedRequest(model="m", tenant="first"), log, release)
    )
    await asyncio.sleep(0)
    waiters = [
        asyncio.create_task(
            hold(
                admission,
                QueuedRequest(model="m", tenant=name, priority=p, arrival=1.0 + i),
                log,
                release,
            )
        )
        for i, (name, p) in enumerate([("low", 2), ("normal", 1), ("high", 0)])
    ]
    await asyncio.sleep(0.01)
    assert log == ["first"] and admission.stats.queued == 3
    release.set()
    await asyncio.gather(first, *waiters)
    assert log == ["first", "high", "normal", "low"]
    assert admission.stats.queued == 0


async def test_cancelled_waiter_leaves_the_queue_and_slots_are_not_leaked() -> None:
    admission = AdmissionController("fifo", per_engine=1)
    release = asyncio.Event()
    log: list[str] = []
    first = asyncio.create_task(hold(admission, QueuedRequest(model="m", tenant="a"), log, release))
    await asyncio.sleep(0)
    gone = asyncio.create_task(
        hold(admission, QueuedRequest(model="m", tenant="gone"), log, release)
    )
    await asyncio.sleep(0.01)
    gone.cancel()
    await asyncio.sleep(0)
    assert admission.stats.queued == 0
    release.set()
    await first
    # the slot is free again: a new request runs at once
    async with admission.slot(QueuedRequest(model="m"), engines=1):
        pass
    assert "gone" not in log


async def test_full_queue_is_refused_with_retry_after() -> None:
    admission = AdmissionController("fifo", per_engine=1, max_queue=1)
    release = asyncio.Event()
    log: list[str] = []
    first = asyncio.create_task(hold(admission, QueuedRequest(model="m"), log, release))
    await asyncio.sleep(0)
    waiting = asyncio.create_task(hold(admission, QueuedRequest(model="m"), log, release))
    await asyncio.sleep(0.01)
    with pytest.raises(OverloadedError) as info:
        async with admission.slot(QueuedRequest(model="m"), engines=1):
            pass
    assert info.value.retry_after == 1.0
    release.set()
    await asyncio.gather(first, waiting)


async def test_hopeless_request_is_shed_under_slo_aware_shed() -> None:
    clock = [0.0]
    admission = AdmissionController(
        "slo_aware_shed", per_engine=1, predict=lambda item: 5.0, clock=lambda: clock[0]
    )
    release = asyncio.Event()
    log: list[str] = []
    first = asyncio.create_task(hold(admission, QueuedRequest(model="m"), log, release))
    await asyncio.sleep(0)
    doomed = asyncio.create_task(
        hold(admission, QueuedRequest(model="m", deadline=1.0), log, release)
    )
    await asyncio.sleep(0.01)
    clock[0] = 0.5
    release.set()
    await first
    with pytest.raises(OverloadedError) as info:
        await doomed
    assert info.value.code == "slo_unattainable"
    assert admission.stats.shed == 1


def test_priority_values() -> None:
    assert [parse_priority(v) for v in ("high", "NORMAL", "low", "", "0", "2")] == [
        0,
        1,
        2,
        1,
        0,
        2,
    ]
    with pytest.raises(InvalidRequestError) as info:
        parse_priority("urgent!!")
    assert info.value.param == "priority"
