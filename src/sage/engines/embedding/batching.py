"""In-process dynamic batching, TEI style: one task owns the queue, one thread runs the model.

While a batch runs on the model thread, new requests pile up and form the next batch, so
batch size follows load without a fixed wait. Each job carries its own future; jobs whose
caller has gone are skipped and counted.

A job larger than one batch is cut into batch-sized slices, and each batch shares its caps
among the waiting jobs, round-robin (sage.common.fairbatch): a huge request never becomes
one giant forward pass, and a small one that arrives behind it rides in the next batch
instead of waiting for the whole huge one.
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

from sage.common.fairbatch import take_batch

log = logging.getLogger("sage.engines.embedding")

Compute = Callable[[list[str]], tuple[Any, list[int]]]


@dataclass
class _Job:
    texts: list[str]
    future: asyncio.Future[tuple[Any, list[int]]]
    costs: list[int]
    taken: int = 0  # texts already given to a batch, in order
    parts: list[Any] = field(default_factory=list)  # vectors of the batches done, in order
    tokens: list[int] = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return len(self.texts) - self.taken


@dataclass(frozen=True)
class _Slice:
    job: _Job
    start: int
    end: int


@dataclass
class BatchStats:
    """Counters exported on /metrics."""

    batches: int = 0
    texts: int = 0
    skipped_jobs: int = 0
    queued_texts: int = 0


def _joined(parts: list[Any]) -> Any:
    """One job's vectors from its slices: arrays stacked, anything else concatenated."""
    if len(parts) == 1:
        return parts[0]
    # Imported here: the module stays importable on the base install (no numpy), and the
    # model that made these arrays has already loaded numpy.
    import numpy as np

    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts)
    return [row for part in parts for row in part]


class InProcessBatcher:
    """Groups concurrent requests into model batches capped by count and characters.

    `max_text_chars` caps what one text counts against `max_batch_chars`: the model
    truncates at its window, so an 8 KB text costs no more than a window's worth."""

    def __init__(
        self,
        compute: Compute,
        *,
        max_batch_size: int = 64,
        max_batch_chars: int = 65536,
        max_text_chars: int = 0,
        max_wait_ms: float = 2.0,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._compute = compute
        self.max_batch_size = max(1, max_batch_size)
        self.max_batch_chars = max(1, max_batch_chars)
        self.max_text_chars = max_text_chars
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

    def _cost(self, text: str) -> int:
        if self.max_text_chars > 0:
            return max(1, min(len(text), self.max_text_chars))
        return max(1, len(text))

    async def embed(self, texts: list[str]) -> tuple[Any, list[int]]:
        """Vectors (array, one row per text) and token counts, in input order."""
        if not texts:
            return [], []
        self.start()
        job = _Job(
            texts, asyncio.get_running_loop().create_future(), [self._cost(t) for t in texts]
        )
        self._queue.append(job)
        self.stats.queued_texts += len(texts)
        self._wakeup.set()
        return await job.future

    def _take(self) -> list[_Slice]:
        """The next batch, fair across the waiting jobs (sage.common.fairbatch)."""
        for job in [j for j in self._queue if j.future.done()]:  # callers that went away
            self._queue.remove(job)
            self.stats.queued_texts -= job.remaining
            self.stats.skipped_jobs += 1
        slices = [
            _Slice(job, start, end)
            for job, start, end in take_batch(
                self._queue, self.max_batch_size, self.max_batch_chars
            )
        ]
        self.stats.queued_texts -= sum(s.end - s.start for s in slices)
        return slices

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            idle = True  # the model has had nothing to do since the last wakeup
            while self._queue:
                if idle and self.stats.queued_texts < self.max_batch_size and self.max_wait_s > 0:
                    # After idle, a short wait lets requests that arrive together share one
                    # batch. After a batch, what piled up meanwhile goes at once: the wait
                    # would leave the model idle once per batch (~2% of its time at 64
                    # one-text callers on CPU).
                    await asyncio.sleep(self.max_wait_s)
                idle = False
                slices = self._take()
                if not slices:
                    continue
                texts = [t for s in slices for t in s.job.texts[s.start : s.end]]
                try:
                    vectors, tokens = await loop.run_in_executor(self._thread, self._compute, texts)
                except Exception as exc:  # the model failed: every caller of this batch hears it
                    log.exception("embedding batch failed", extra={"texts": len(texts)})
                    for s in slices:
                        if not s.job.future.done():
                            s.job.future.set_exception(exc)
                    continue
                self.stats.batches += 1
                self.stats.texts += len(texts)
                if self._on_batch is not None:
                    self._on_batch(len(texts))
                offset = 0
                for s in slices:
                    size = s.end - s.start
                    job = s.job
                    if not job.future.done():
                        # Batches run one at a time, so a job's slices come back in order.
                        job.parts.append(vectors[offset : offset + size])
                        job.tokens.extend(tokens[offset : offset + size])
                        if s.end == len(job.texts):
                            job.future.set_result((_joined(job.parts), job.tokens))
                    offset += size
