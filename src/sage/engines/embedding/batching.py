"""In-process dynamic batching, TEI style: one task owns the queue, one thread runs the model.

While a batch runs on the model thread, new requests pile up and form the next batch, so
batch size follows load without a fixed wait. Each job carries its own future; jobs whose
caller has gone are skipped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("sage.engines.embedding")

Compute = Callable[[list[str]], tuple[Any, list[int]]]


@dataclass
class _Job:
    texts: list[str]
    future: asyncio.Future[tuple[Any, list[int]]]
    chars: int = field(init=False)

    def __post_init__(self) -> None:
        self.chars = sum(len(t) for t in self.texts)


@dataclass
class BatchStats:
    """Counters exported on /metrics."""

    batches: int = 0
    texts: int = 0
    skipped_jobs: int = 0
    queued_texts: int = 0


class InProcessBatcher:
    """Groups concurrent requests into model batches capped by count and characters."""

    def __init__(
        self,
        compute: Compute,
        *,
        max_batch_size: int = 64,
        max_batch_chars: int = 65536,
        max_wait_ms: float = 2.0,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._compute = compute
        self.max_batch_size = max_batch_size
        self.max_batch_chars = max_batch_chars
        self.max_wait_s = max_wait_ms / 1000
        self._on_batch = on_batch
        self._queue: deque[_Job] = deque()
        self._wakeup = asyncio.Event()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-model")
        self._task: asyncio.Task[None] | None = None
        self.stats = BatchStats()

    def start(self) -> None:
        """Start the batching task on the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stop batching; waiting callers get CancelledError."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for job in self._queue:
            job.future.cancel()
        self._queue.clear()
        self._thread.shutdown(wait=False, cancel_futures=True)

    async def embed(self, texts: list[str]) -> tuple[Any, list[int]]:
        """Vectors (array, one row per text) and token counts, in input order."""
        self.start()
        job = _Job(texts, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self.stats.queued_texts += len(texts)
        self._wakeup.set()
        return await job.future

    def _take(self) -> list[_Job]:
        jobs: list[_Job] = []
        count = chars = 0
        while self._queue:
            job = self._queue[0]
            if job.future.done():  # caller went away
                self._queue.popleft()
                self.stats.queued_texts -= len(job.texts)
                self.stats.skipped_jobs += 1
                continue
            if jobs and (
                count + len(job.texts) > self.max_batch_size
                or chars + job.chars > self.max_batch_chars
            ):
                break
            self._queue.popleft()
            self.stats.queued_texts -= len(job.texts)
            jobs.append(job)
            count += len(job.texts)
            chars += job.chars
        return jobs

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                pending = sum(len(j.texts) for j in self._queue)
                if pending < self.max_batch_size and self.max_wait_s > 0:
                    # A short wait lets requests that arrive together share one batch.
                    await asyncio.sleep(self.max_wait_s)
                jobs = self._take()
                if not jobs:
                    continue
                texts = [t for job in jobs for t in job.texts]
                try:
                    vectors, tokens = await loop.run_in_executor(self._thread, self._compute, texts)
                except Exception as exc:  # the model failed: every caller of this batch hears it
                    log.exception("embedding batch failed", extra={"texts": len(texts)})
                    for job in jobs:
                        if not job.future.done():
                            job.future.set_exception(exc)
                    continue
                self.stats.batches += 1
                self.stats.texts += len(texts)
                if self._on_batch is not None:
                    self._on_batch(len(texts))
                start = 0
                for job in jobs:
                    end = start + len(job.texts)
                    if not job.future.done():
                        job.future.set_result((vectors[start:end], tokens[start:end]))
                    start = end
