"""The Embedding Batcher's rules, with the engine call injected (a recording coroutine).

The HTTP side is covered by tests/integration/test_embeddings.py against a real engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sage.common.exceptions import OverloadedError, ServiceUnavailableError
from sage.common.float32 import pack
from sage.common.limits import estimate_text_tokens as estimate_tokens
from sage.services.embedding.batcher import BatcherConfig, EmbeddingBatcher
from sage.services.embedding.executor import (
    BatchReply,
    Endpoint,
    EngineDisconnectedError,
    EngineUnreachableError,
)

A = Endpoint("a", "http://127.0.0.1:1")
B = Endpoint("b", "http://127.0.0.1:2")


def vector_of(text: str) -> bytes:
    return pack([float(len(text)), float(sum(map(ord, text)) % 997)])


class RecordingEngine:
    """Answers each batch with a vector derived from each text; records every call."""

    def __init__(self, delay_s: float = 0.0, down: frozenset[str] = frozenset()) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.delay_s = delay_s
        self.down = down
        self.inflight: dict[str, int] = {}
        self.peak: dict[str, int] = {}

    async def __call__(
        self, engine: Endpoint, model: str, texts: Sequence[str], dimensions: int
    ) -> BatchReply:
        if engine.engine_id in self.down:
            raise EngineUnreachableError(f"{engine.engine_id} down")
        self.inflight[engine.engine_id] = self.inflight.get(engine.engine_id, 0) + 1
        self.peak[engine.engine_id] = max(
            self.peak.get(engine.engine_id, 0), self.inflight[engine.engine_id]
        )
        self.calls.append((engine.engine_id, list(texts)))
        await asyncio.sleep(self.delay_s)
        self.inflight[engine.engine_id] -= 1
        return BatchReply([vector_of(t) for t in texts], [len(t) for t in texts])


async def test_concurrent_callers_share_batches_and_get_their_own_vectors() -> None:
    engine = RecordingEngine(delay_s=0.01)
    batcher = EmbeddingBatcher(engine, BatcherConfig(max_batch_texts=64))
    texts = [[f"caller {i} text {j}" for j in range(i % 3 + 1)] for i in range(64)]
    outcomes = await asyncio.gather(*(batcher.embed("m", t, [A]) for t in texts))
    for caller_texts, outcome in zip(texts, outcomes, strict=True):
        assert outcome.vectors == [vector_of(t) for t in caller_texts]
        assert outcome.tokens == [len(t) for t in caller_texts]
        assert outcome.engine_ids == ["a"] * len(caller_texts)
    assert len(engine.calls) < 64 / 2  # batched, not one call per caller
    assert all(len(batch) <= 64 for _, batch in engine.calls)
    await batcher.close()


async def test_batches_are_length_sorted_for_the_engine() -> None:
    engine = RecordingEngine()
    batcher = EmbeddingBatcher(engine, BatcherConfig(max_wait_ms=20))
    await asyncio.gather(batcher.embed("m", ["ccc", "a"], [A]), batcher.embed("m", ["bb"], [A]))
    (_, batch), *_ = engine.calls
    assert [len(t) for t in batch] == sorted(len(t) for t in batch)
    await batcher.close()


async def test_token_budget_caps_a_batch() -> None:
    engine = RecordingEngine(delay_s=0.01)
    budget = estimate_tokens("x" * 300) * 2
    batcher = EmbeddingBatcher(engine, BatcherConfig(max_batch_tokens=budget, max_wait_ms=10))
    await asyncio.gather(*(batcher.embed("m", ["x" * 300], [A]) for _ in range(6)))
    assert all(len(batch) <= 2 for _, batch in engine.calls)
    await batcher.close()


async def test_a_cancelled_caller_is_dropped_from_pending_batches() -> None:
    engine = RecordingEngine(delay_s=0.05)
    batcher = EmbeddingBatcher(engine, BatcherConfig(max_inflight_per_engine=1))
    first = asyncio.create_task(batcher.embed("m", ["first"], [A]))
    await asyncio.sleep(0.01)  # the first batch is now on the engine; the slot is taken
    gone = asyncio.create_task(batcher.embed("m", ["abandoned"], [A]))
    kept = asyncio.create_task(batcher.embed("m", ["kept"], [A]))
    await asyncio.sleep(0.005)
    gone.cancel()
    await first
    assert (await kept).vectors == [vector_of("kept")]
    sent = [t for _, batch in engine.calls for t in batch]
    assert "abandoned" not in sent
    assert batcher.stats.skipped_entries == 1
    await batcher.close()


async def test_full_queue_is_refused_with_retry_after() -> None:
    engine = RecordingEngine(delay_s=0.2)
    batcher = EmbeddingBatcher(
        engine, BatcherConfig(max_queue_texts=4, max_inflight_per_engine=1, max_batch_texts=1)
    )
    waiting = [asyncio.create_task(batcher.embed("m", [f"t{i}"], [A])) for i in range(4)]
    await asyncio.sleep(0.01)
    with pytest.raises(OverloadedError) as info:
        await batcher.embed("m", ["one", "two", "three", "four"], [A])
    assert info.value.retry_after and info.value.http_status == 429
    await asyncio.gather(*waiting)
    await batcher.close()


async def test_least_loaded_engine_gets_the_next_batch() -> None:
    engine = RecordingEngine(delay_s=0.03)
    batcher = EmbeddingBatcher(
        engine, BatcherConfig(max_batch_texts=1, max_inflight_per_engine=1, max_wait_ms=0)
    )
    await asyncio.gather(*(batcher.embed("m", [f"t{i}"], [A, B]) for i in range(8)))
    used = {engine_id for engine_id, _ in engine.calls}
    assert used == {"a", "b"}
    assert engine.peak == {"a": 1, "b": 1}  # never more than the slot limit per engine
    await batcher.close()


async def test_unreachable_engine_fails_over_and_all_down_is_an_error() -> None:
    engine = RecordingEngine(down=frozenset({"a"}))
    batcher = EmbeddingBatcher(engine)
    outcome = await batcher.embed("m", ["hello"], [A, B])
    assert outcome.engine_ids == ["b"]
    with pytest.raises(EngineUnreachableError):
        await batcher.embed("m", ["hello"], [A])
    with pytest.raises(ServiceUnavailableError):
        await batcher.embed("m", ["hello"], [])
    await batcher.close()


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=12),
        min_size=1,
        max_size=20,
    ),
    st.integers(min_value=1, max_value=16),
)
def test_every_caller_gets_its_own_vectors_in_order(
    requests: list[list[str]], max_batch_texts: int
) -> None:
    async def scenario() -> None:
        engine = RecordingEngine()
        batcher = EmbeddingBatcher(
            engine, BatcherConfig(max_batch_texts=max_batch_texts, max_wait_ms=0.5)
        )
        outcomes = await asyncio.gather(*(batcher.embed("m", r, [A, B]) for r in requests))
        for texts, outcome in zip(requests, outcomes, strict=True):
            assert outcome.vectors == [vector_of(t) for t in texts]
        sent = sorted(t for _, batch in engine.calls for t in batch)
        assert sent == sorted(t for r in requests for t in r)  # each text sent exactly once
        await batcher.close()

    asyncio.run(scenario())


async def test_a_batch_dropped_by_its_engine_is_embedded_on_another() -> None:
    """A dropped connection (the engine died, or the scheduler cut it as lost) is retried
    elsewhere like a refused one: embedding the texts again changes nothing."""
    engine = RecordingEngine()
    dropped: list[str] = []

    async def send(e: Endpoint, model: str, texts: Sequence[str], dims: int) -> BatchReply:
        if e.engine_id == "a":
            dropped.append("a")
            raise EngineDisconnectedError("a dropped the connection")
        return await engine(e, model, texts, dims)

    batcher = EmbeddingBatcher(send)
    outcome = await batcher.embed("m", ["hello"], [A, B])
    assert outcome.engine_ids == ["b"] and outcome.vectors == [vector_of("hello")]
    assert dropped == ["a"]  # tried first (the least loaded, ties in order), then b
    await batcher.close()


async def test_forgotten_engines_leave_lanes_that_have_another() -> None:
    engine = RecordingEngine()
    batcher = EmbeddingBatcher(engine, BatcherConfig(max_wait_ms=0))
    await batcher.embed("m", ["x"], [A, B])
    await batcher.embed("n", ["x"], [A])
    batcher.forget({A.base_url})
    lanes = {key[0]: [e.engine_id for e in lane.engines] for key, lane in batcher._lanes.items()}
    assert lanes == {"m": ["b"], "n": ["a"]}  # "n" has no other engine: kept
    await batcher.close()
