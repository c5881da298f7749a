"""Group a stream's items into the runs that were ready together.

A streamed reply crosses edge ← scheduler as gRPC messages; one message per chunk costs a
protobuf encode, a gRPC frame and an HTTP write on each side. When chunks arrive together
(a fast engine, or a busy scheduler catching up), sending them as one message saves that
per-chunk cost without delaying any chunk: a run ends as soon as no further item is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Generic, TypeVar

T = TypeVar("T")


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Done:
    pass


_DONE = _Done()


class _Pump(Generic[T]):
    """Runs `source` in its own task into a bounded queue (the bound is backpressure)."""

    def __init__(self, source: AsyncIterator[T], bound: int) -> None:
        self.queue: asyncio.Queue[T | _Failed | _Done] = asyncio.Queue(maxsize=bound)
        self.stopping = False
        self.task = asyncio.get_running_loop().create_task(self._run(source))

    async def _run(self, source: AsyncIterator[T]) -> None:
        try:
            async for item in source:
                await self.queue.put(item)
        except asyncio.CancelledError:
            if self.stopping:
                raise
            await self.queue.put(_Failed(asyncio.CancelledError()))  # never leave it waiting
            return
        except Exception as exc:  # handed to the consumer, which re-raises it
            await self.queue.put(_Failed(exc))
            return
        await self.queue.put(_DONE)

    async def stop(self) -> None:
        self.stopping = True
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def ready_runs(source: AsyncIterator[T], max_run: int = 64) -> AsyncGenerator[list[T], None]:
    """Yield `source`'s items in order, as lists of the items that were ready together.

    The first item of a run is awaited; the run then takes whatever else is already queued
    (at most `max_run`). An exception from `source` ends the stream after the items before
    it; closing this generator stops `source` (its cleanup runs in the pump task).
    """
    pump = _Pump(source, max_run)
    try:
        while True:
            item = await pump.queue.get()
            run: list[T] = []
            while True:
                if isinstance(item, _Done):
                    if run:
                        yield run
                    return
                if isinstance(item, _Failed):
                    if run:
                        yield run
                    raise item.error
                run.append(item)
                if len(run) >= max_run or pump.queue.empty():
                    break
                item = pump.queue.get_nowait()
            yield run
    finally:
        await pump.stop()
