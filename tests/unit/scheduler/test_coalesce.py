"""ready_runs: chunks ready together travel as one message, none waits for another."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from sage.services.scheduler.coalesce import ready_runs


async def _burst(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i  # no await between items: all ready together


async def _spaced(n: int, gap_s: float) -> AsyncIterator[int]:
    for i in range(n):
        await asyncio.sleep(gap_s)
        yield i


async def _collect(source: AsyncIterator[int], max_run: int = 64) -> list[list[int]]:
    return [run async for run in ready_runs(source, max_run)]


async def test_items_ready_together_form_one_run() -> None:
    assert await _collect(_burst(5)) == [[0, 1, 2, 3, 4]]


async def test_spaced_items_are_not_held_back() -> None:
    runs = await _collect(_spaced(4, 0.01))
    assert [i for run in runs for i in run] == [0, 1, 2, 3]
    assert len(runs) == 4  # each chunk went out when it arrived


async def test_runs_are_bounded() -> None:
    runs = await _collect(_burst(10), max_run=4)
    assert [len(r) for r in runs] == [4, 4, 2]
    assert [i for run in runs for i in run] == list(range(10))


async def test_an_error_ends_the_stream_after_the_items_before_it() -> None:
    async def failing() -> AsyncIterator[int]:
        yield 1
        yield 2
        raise RuntimeError("engine went away")

    seen: list[int] = []
    with pytest.raises(RuntimeError, match="engine went away"):
        async for run in ready_runs(failing()):
            seen += run
    assert seen == [1, 2]


async def test_closing_early_stops_the_source() -> None:
    cleaned = asyncio.Event()

    async def endless() -> AsyncIterator[int]:
        try:
            i = 0
            while True:
                await asyncio.sleep(0.001)
                yield i
                i += 1
        finally:
            cleaned.set()

    runs = ready_runs(endless())
    assert await runs.__anext__() == [0]
    await runs.aclose()  # what a cancelled gRPC stream does
    await asyncio.wait_for(cleaned.wait(), 1)


async def test_a_source_cancelled_from_inside_does_not_leave_the_reader_waiting() -> None:
    async def cancelled() -> AsyncIterator[int]:
        yield 1
        raise asyncio.CancelledError  # e.g. an inner task it awaited was cancelled

    seen: list[int] = []
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(2):
            async for run in ready_runs(cancelled()):
                seen += run
    assert seen == [1]
