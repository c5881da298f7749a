"""What `engine list` shows of engines that ended: one stopped while it was starting is
STOPPED with a reason a person reads (never a FAILED `CancelledError`), and ended engines
leave the registry for the history log, by prune (which `sage llm serve` does as it
starts) or past a bounded count. The engines are real simulator processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from sage.common.exceptions import EngineStartError
from sage.services.lifecycle.manager import (
    MAX_FINISHED_ENGINES,
    STOPPED_DURING_STARTUP,
    EngineLifecycleManager,
)
from sage.services.lifecycle.spec import EngineSpec
from sage.services.lifecycle.store import STOPPED, EngineRecord, EngineStore

# A simulator that takes a minute to listen, as a real engine loading weights does.
SLOW = EngineSpec(model="sim", backend="sim", extra_args=("--startup-delay-s", "60"))
FAST = EngineSpec(model="sim", backend="sim")


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[EngineLifecycleManager]:
    lifecycle = EngineLifecycleManager(tmp_path / "state", health_interval_s=0.05)
    yield lifecycle
    await lifecycle.shutdown()


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def _starting(manager: EngineLifecycleManager) -> EngineRecord:
    """The one engine once it has a process."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        records = manager.instances()
        if records and records[0].pid:
            return records[0]
        await asyncio.sleep(0.05)
    raise AssertionError("no engine was spawned")


async def test_an_engine_stopped_during_start_up_is_stopped_with_a_reason(
    manager: EngineLifecycleManager,
) -> None:
    record = await manager.start(SLOW, wait=False)
    assert record.state == "starting" and record.pid
    stopped = await manager.stop(record.engine_id)
    # The background start notices the stop and leaves the record to it.
    await asyncio.gather(*list(manager._tasks))
    [listed] = manager.instances()
    for shown in (stopped, listed):
        assert (shown.state, shown.error) == (STOPPED, STOPPED_DURING_STARTUP)
    assert _gone(record.pid)


async def test_a_start_whose_caller_goes_away_stops_the_engine(
    manager: EngineLifecycleManager,
) -> None:
    """Ctrl-C on `sage llm serve` cancels its StartEngine call mid-way."""
    start = asyncio.create_task(manager.start(SLOW, wait=True))
    record = await _starting(manager)
    start.cancel()
    with pytest.raises(asyncio.CancelledError):
        await start
    [listed] = manager.instances()
    assert listed.state == STOPPED
    assert listed.error.startswith(STOPPED_DURING_STARTUP), listed.error
    assert "CancelledError" not in listed.error
    assert _gone(record.pid)


async def test_a_waiting_start_says_the_engine_was_stopped(
    manager: EngineLifecycleManager,
) -> None:
    start = asyncio.create_task(manager.start(SLOW, wait=True))
    record = await _starting(manager)
    await manager.stop(record.engine_id)
    with pytest.raises(EngineStartError) as caught:
        await start
    assert STOPPED_DURING_STARTUP in caught.value.message
    assert [(r.state, r.error) for r in manager.instances()] == [(STOPPED, STOPPED_DURING_STARTUP)]


async def test_prune_moves_ended_engines_to_the_history_log(
    manager: EngineLifecycleManager, tmp_path: Path
) -> None:
    ran = await manager.start(FAST)
    await manager.stop(ran.engine_id)
    live = await manager.start(FAST)
    assert manager.prune() == [ran.engine_id]
    assert [r.engine_id for r in manager.instances()] == [live.engine_id]
    lines = manager.history_path.read_text().splitlines()
    assert [(d["engine_id"], d["state"]) for d in map(json.loads, lines)] == [
        (ran.engine_id, STOPPED)
    ]
    # What a restarted lifecycle reads back is the pruned registry.
    assert [r.engine_id for r in EngineStore(tmp_path / "state" / "engines.json").load()] == [
        live.engine_id
    ]


async def test_the_registry_keeps_a_bounded_number_of_ended_engines(tmp_path: Path) -> None:
    """A registry from many runs (as older versions left it) is trimmed on start."""
    state = tmp_path / "state"
    old = [
        EngineRecord(
            engine_id=f"old-{i:02d}",
            spec=FAST,
            backend="sim",
            base_url="http://127.0.0.1:1",
            host="127.0.0.1",
            port=1,
            state=STOPPED,
            started_at=1000.0 + i,
        )
        for i in range(MAX_FINISHED_ENGINES + 5)
    ]
    EngineStore(state / "engines.json").save(old)
    manager = EngineLifecycleManager(state)
    try:
        await manager.recover()
        kept = [r.engine_id for r in manager.instances()]
        archived = [
            json.loads(line)["engine_id"] for line in manager.history_path.read_text().splitlines()
        ]
    finally:
        with contextlib.suppress(Exception):
            await manager.shutdown()
    assert kept == [r.engine_id for r in old[5:]]
    assert archived == [r.engine_id for r in old[:5]]
