"""The Embedding Batcher: many callers' texts → token-budgeted batches → one engine call each.

Follows TEI's queue: one asyncio task per (model, dimensions) lane owns its queue; each
entry carries its own future; entries whose caller has gone (deadline, cancel) are skipped
and counted. A batch is dispatched when an engine has a free slot (least-loaded first), so
while engines are busy the next batch keeps growing up to its caps: batch size follows load.

Fairness: an entry larger than one batch is cut into batch-sized slices, and each batch
shares its caps among the waiting entries, round-robin (sage.common.fairbatch). A small
request that arrives behind a huge one rides in the next batch, so it waits about one batch
per engine slot, not the whole huge request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from sage.common.exceptions import OverloadedError, ServiceUnavailableError
from sage.common.fairbatch import take_batch
from sage.common.limits import check_embedding_tokens, estimate_text_tokens

from .executor import BatchReply, Endpoint, EngineDisconnectedError, EngineUnreachableError

log = logging.getLogger("sage.embedding")

Send = Callable[[Endpoint, str, Sequence[str], int], Awaitable[BatchReply]]


@dataclass
class BatcherConfig:
    """Caps and limits; defaults suit small embedding models on one engine.

    `max_request_tokens` (0: none) refuses a request over it with a 400 naming the limit
    (settings.embedding_max_tokens_per_request)."""

    max_batch_texts: int = 256
    max_batch_tokens: int = 16384
    max_wait_ms: float = 2.0
    max_inflight_per_engine: int = 2
    max_queue_texts: int = 20000
    max_request_tokens: int = 0


@dataclass
class EmbedOutcome:
    """One caller's vectors (input order, packed float32), tokens, and the engine per vector."""

    vectors: list[bytes]
    tokens: list[int]
    engine_ids: list[str]


@dataclass
class _Entry:
    texts: list[str]
    future: asyncio.Future[EmbedOutcome]
    costs: list[int] = field(init=False)
    taken: int = 0  # texts already given to a batch, in order
    unanswered: int = field(init=False)  # texts whose vectors have not come back
    vectors: list[bytes] = field(init=False)
    tokens: list[int] = field(init=False)
    engine_ids: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.costs = [estimate_text_tokens(t) for t in self.texts]
        self.unanswered = len(self.texts)
        self.vectors = [b""] * len(self.texts)
        self.tokens = [0] * len(self.texts)
        self.engine_ids = [""] * len(self.texts)

    @property
    def remaining(self) -> int:
        """Texts not yet given to a batch."""
        return len(self.texts) - self.taken


@dataclass(frozen=True)
class _Slice:
    entry: _Entry
    start: int
    end: int


@dataclass
class _Lane:
    model: str
    dimensions: int
    engines: list[Endpoint]
    queue: deque[_Entry] = field(default_factory=deque)
    queued_texts: int = 0
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


@dataclass
class BatcherStats:
    """Counters for status and tests."""

    batches: int = 0
    texts: int = 0
    skipped_entries: int = 0
    rejected_entries: int = 0
    largest_batch: int = 0


class EmbeddingBatcher:
    """Micro-batches embedding requests across callers and engines."""

    def __init__(self, send: Send, config: BatcherConfig | None = None) -> None:
        self._send = send
        self.config = config or BatcherConfig()
        self._lanes: dict[tuple[str, int], _Lane] = {}
        self._inflight: dict[str, int] = {}
        self._slot_freed = asyncio.Condition()
        self._batches: set[asyncio.Task[None]] = set()
        self.stats = BatcherStats()

    async def embed(
        self, model: str, texts: Sequence[str], engines: Sequence[Endpoint], dimensions: int = 0
    ) -> EmbedOutcome:
        """Queue `texts` and wait for their vectors; InvalidRequestError over the per-request
        token cap, OverloadedError when the queue is full."""
        check_embedding_tokens(texts, self.config.max_request_tokens)
        if not texts:
            return EmbedOutcome([], [], [])
        if not engines:
            raise ServiceUnavailableError(f"no embedding engine is ready for model {model!r}")
        key = (model, dimensions)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(model, dimensions, list(engines))
        lane.engines = list(engines)  # the scheduler's current view wins
        if lane.queued_texts + len(texts) > self.config.max_queue_texts:
            self.stats.rejected_entries += 1
            raise OverloadedError(
                f"embedding queue for {model!r} is full ({lane.queued_texts} texts waiting)",
                retry_after=1.0,
            )
        entry = _Entry(list(texts), asyncio.get_running_loop().create_future())
        lane.queue.append(entry)
        lane.queued_texts += len(entry.texts)
        if lane.task is None or lane.task.done():
            lane.task = asyncio.get_running_loop().create_task(self._run(lane))
        lane.wakeup.set()
        return await entry.future

    def forget(self, base_urls: set[str]) -> None:
        """Engines found lost leave every lane that has another engine to send to (a lane
        learns the scheduler's engines again with its next request)."""
        for lane in self._lanes.values():
            kept = [e for e in lane.engines if e.base_url.rstrip("/") not in base_urls]
            if kept:
                lane.engines = kept

    def queued(self) -> int:
        """Texts waiting in every lane."""
        return sum(lane.queued_texts for lane in self._lanes.values())

    async def close(self) -> None:
        """Stop every lane; waiting callers are told the service is going away."""
        for lane in self._lanes.values():
            if lane.task is not None:
                lane.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await lane.task
            for entry in lane.queue:
                if not entry.future.done():
                    entry.future.set_exception(
                        ServiceUnavailableError("the embedding service is shutting down")
                    )
        for task in list(self._batches):
            task.cancel()

    async def _acquire(self, lane: _Lane) -> Endpoint:
        """The least-loaded engine of the lane with a free slot (waits for one)."""
        async with self._slot_freed:
            while True:
                free = [
                    e
                    for e in lane.engines
                    if self._inflight.get(e.engine_id, 0) < self.config.max_inflight_per_engine
                ]
                if free:
                    engine = min(free, key=lambda e: self._inflight.get(e.engine_id, 0))
                    self._inflight[engine.engine_id] = self._inflight.get(engine.engine_id, 0) + 1
                    return engine
                await self._slot_freed.wait()

    async def _release(self, engine: Endpoint) -> None:
        async with self._slot_freed:
            self._inflight[engine.engine_id] -= 1
            self._slot_freed.notify_all()

    def _take(self, lane: _Lane) -> list[_Slice]:
        """The next batch, fair across the lane's waiting entries (sage.common.fairbatch)."""
        for entry in [e for e in lane.queue if e.future.done()]:  # the caller has gone
            lane.queue.remove(entry)
            lane.queued_texts -= entry.remaining
            self.stats.skipped_entries += 1
        batch = [
            _Slice(entry, start, end)
            for entry, start, end in take_batch(
                lane.queue, self.config.max_batch_texts, self.config.max_batch_tokens
            )
        ]
        lane.queued_texts -= sum(s.end - s.start for s in batch)
        return batch

    async def _run(self, lane: _Lane) -> None:
        wait_s = self.config.max_wait_ms / 1000
        while True:
            await lane.wakeup.wait()
            lane.wakeup.clear()
            while lane.queue:
                engine = await self._acquire(lane)
                if lane.queued_texts < self.config.max_batch_texts and wait_s > 0:
                    # Callers that arrive together share one batch.
                    await asyncio.sleep(wait_s)
                batch = self._take(lane)
                if not batch:
                    await self._release(engine)
                    continue
                task = asyncio.get_running_loop().create_task(self._dispatch(lane, engine, batch))
                self._batches.add(task)
                task.add_done_callback(self._batches.discard)

    async def _dispatch(self, lane: _Lane, engine: Endpoint, batch: list[_Slice]) -> None:
        texts = [t for s in batch for t in s.entry.texts[s.start : s.end]]
        # Similar lengths side by side: the engine pads less inside its own sub-batches.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        sorted_texts = [texts[i] for i in order]
        started = time.perf_counter()
        tried: set[str] = set()
        try:
            while True:
                try:
                    reply = await self._send(engine, lane.model, sorted_texts, lane.dimensions)
                    break
                except (EngineUnreachableError, EngineDisconnectedError) as exc:
                    # Embedding a batch again changes nothing: a dropped one goes too.
                    tried.add(engine.engine_id)
                    others = [e for e in lane.engines if e.engine_id not in tried]
                    if not others:
                        raise
                    log.warning(
                        "embedding engine unreachable, retrying batch elsewhere"
                        if isinstance(exc, EngineUnreachableError)
                        else "embedding engine dropped the batch, retrying it elsewhere",
                        extra={"engine_id": engine.engine_id, "error": str(exc)},
                    )
                    await self._release(engine)
                    engine = others[0]
                    async with self._slot_freed:
                        self._inflight[engine.engine_id] = (
                            self._inflight.get(engine.engine_id, 0) + 1
                        )
        except Exception as exc:  # every caller of the batch hears why
            for s in batch:
                if not s.entry.future.done():
                    s.entry.future.set_exception(exc)
            return
        finally:
            await self._release(engine)
        vectors: list[bytes] = [b""] * len(texts)
        tokens = [0] * len(texts)
        for pos, original in enumerate(order):
            vectors[original] = reply.vectors[pos]
            tokens[original] = reply.tokens[pos]
        self.stats.batches += 1
        self.stats.texts += len(texts)
        self.stats.largest_batch = max(self.stats.largest_batch, len(texts))
        log.debug(
            "batch done",
            extra={
                "texts": len(texts),
                "engine_id": engine.engine_id,
                "ms": round((time.perf_counter() - started) * 1e3, 2),
            },
        )
        offset = 0
        for s in batch:
            entry = s.entry
            size = s.end - s.start
            if not entry.future.done():
                entry.vectors[s.start : s.end] = vectors[offset : offset + size]
                entry.tokens[s.start : s.end] = tokens[offset : offset + size]
                entry.engine_ids[s.start : s.end] = [engine.engine_id] * size
                entry.unanswered -= size
                if entry.unanswered == 0:
                    entry.future.set_result(
                        EmbedOutcome(entry.vectors, entry.tokens, entry.engine_ids)
                    )
            offset += size
