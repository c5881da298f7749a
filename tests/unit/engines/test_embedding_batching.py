"""The embedding engine's batcher waits max_wait_ms for company only when the model was
idle: what piled up while a batch ran goes to the model as soon as that batch is done."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from sage.engines.embedding.batching import InProcessBatcher

COMPUTE_S = 0.2
WAIT_MS = 1500.0


async def test_requests_that_piled_up_during_a_batch_are_not_held_for_the_wait() -> None:
    batches: list[list[str]] = []
    running = threading.Event()

    def compute(texts: list[str]) -> tuple[Any, list[int]]:
        running.set()
        time.sleep(COMPUTE_S)
        batches.append(texts)
        return [[float(len(t))] for t in texts], [1] * len(texts)

    batcher = InProcessBatcher(compute, max_batch_size=8, max_wait_ms=WAIT_MS)
    try:
        first = asyncio.create_task(batcher.embed(["first"]))
        assert await asyncio.to_thread(running.wait, 30)  # the model runs "first" (after the wait)
        later = asyncio.create_task(batcher.embed(["second", "third"]))
        await first
        first_done = time.monotonic()
        vectors, tokens = await later
        # One more batch of compute, not the wait (1.5 s) on top of it.
        assert time.monotonic() - first_done < WAIT_MS / 1000
        assert batches == [["first"], ["second", "third"]]
        assert [list(v) for v in vectors] == [[6.0], [5.0]] and tokens == [1, 1]
    finally:
        await batcher.close()
