"""EmbeddingClientAdapter: batches of batch_size, order kept, concurrency bounded."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sage.common.components.sage_embedding import (
    EmbeddingClientAdapter,
    EmbeddingFactory,
    MockEmbedding,
)
from sage.common.exceptions import InvalidRequestError, UpstreamError

from .fakes import FakeFactory, Recorded, Reply, fake_vector, openai_style_reply


class InFlight:
    """An OpenAI fake that answers slowly and records the most requests it held at once."""

    def __init__(self, delay_s: float = 0.05) -> None:
        self.delay_s = delay_s
        self.current = 0
        self.peak = 0
        self.lock = threading.Lock()

    def __call__(self, request: Recorded) -> Reply:
        with self.lock:
            self.current += 1
            self.peak = max(self.peak, self.current)
        try:
            time.sleep(self.delay_s)
            return openai_style_reply(request.json()["input"], "m")
        finally:
            with self.lock:
                self.current -= 1


def test_remote_batches_are_sized_and_order_is_kept(fake_provider: FakeFactory) -> None:
    server = fake_provider(InFlight(delay_s=0.0))
    embedder = EmbeddingFactory.create("openai", api_key="k", base_url=server.url + "/v1")
    texts = [f"text-{i}" for i in range(10)]
    with EmbeddingClientAdapter(embedder, batch_size=3, max_concurrency=2) as client:
        assert client.embed(texts) == [fake_vector(t) for t in texts]
    sizes = sorted(len(r.json()["input"]) for r in server.requests)
    assert sizes == [1, 3, 3, 3]
    sent = sorted(t for r in server.requests for t in r.json()["input"])
    assert sent == sorted(texts)


def test_concurrency_is_bounded(fake_provider: FakeFactory) -> None:
    fake = InFlight(delay_s=0.05)
    server = fake_provider(fake)
    embedder = EmbeddingFactory.create("openai", api_key="k", base_url=server.url + "/v1")
    texts = [str(i) for i in range(12)]
    with EmbeddingClientAdapter(embedder, batch_size=1, max_concurrency=3) as client:
        assert client.embed(texts) == [fake_vector(t) for t in texts]
    assert len(server.requests) == 12
    assert fake.peak == 3


def test_bound_holds_across_caller_threads(fake_provider: FakeFactory) -> None:
    fake = InFlight(delay_s=0.03)
    server = fake_provider(fake)
    embedder = EmbeddingFactory.create("openai", api_key="k", base_url=server.url + "/v1")
    client = EmbeddingClientAdapter(embedder, batch_size=1, max_concurrency=2)
    results: dict[int, list[list[float]]] = {}

    def call(n: int) -> None:
        results[n] = client.embed([f"{n}-{i}" for i in range(4)])

    threads = [threading.Thread(target=call, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    client.close()
    assert fake.peak == 2
    for n in range(3):
        assert results[n] == [fake_vector(f"{n}-{i}") for i in range(4)]


def test_defaults_come_from_the_embedder() -> None:
    remote = EmbeddingFactory.create("openai", api_key="k")
    assert EmbeddingClientAdapter(remote).batch_size == 64
    assert EmbeddingClientAdapter(remote).max_concurrency == 4
    local = EmbeddingFactory.create("hash")
    assert EmbeddingClientAdapter(local).max_concurrency == 1


class ThreadRecorder(MockEmbedding):
    """Remembers which threads ran its batches."""

    def __init__(self) -> None:
        super().__init__(dim=8)
        self.threads: set[int] = set()
        self.batches: list[int] = []

    def embed_batch(self, texts: Sequence[str]) -> list[list[float]]:
        self.threads.add(threading.get_ident())
        self.batches.append(len(texts))
        return super().embed_batch(texts)


def test_local_methods_run_in_the_calling_thread() -> None:
    embedder = ThreadRecorder()
    vectors = EmbeddingClientAdapter(embedder, batch_size=4).embed([str(i) for i in range(10)])
    assert len(vectors) == 10
    assert embedder.threads == {threading.get_ident()}
    assert embedder.batches == [4, 4, 2]


class SingleOnly:
    """Implements only EmbeddingProtocol: no embed_batch."""

    method_name = "single"

    def embed(self, text: str) -> list[float]:
        return [float(len(text))]

    def get_dim(self) -> int:
        return 1


def test_protocol_only_embedders_work() -> None:
    client = EmbeddingClientAdapter(SingleOnly())
    assert client.embed(["a", "bbb"]) == [[1.0], [3.0]]
    assert client.get_dim() == 1
    assert client.method_name == "single"


def test_input_validation() -> None:
    client = EmbeddingClientAdapter(EmbeddingFactory.create("hash"))
    with pytest.raises(InvalidRequestError, match="list of texts"):
        client.embed("Hello")
    with pytest.raises(InvalidRequestError, match=r"texts\[1\] is int"):
        client.embed(["ok", 3])  # type: ignore[list-item]
    assert client.embed([]) == []
    with pytest.raises(InvalidRequestError):
        EmbeddingClientAdapter(SingleOnly(), batch_size=0)


def test_first_failure_is_raised(fake_provider: FakeFactory) -> None:
    def handler(request: Recorded) -> Reply:
        texts = request.json()["input"]
        if "bad" in texts:
            return Reply(400, {"error": {"message": "bad input"}})
        return openai_style_reply(texts, "m")

    server = fake_provider(handler)
    embedder = EmbeddingFactory.create("openai", api_key="k", base_url=server.url + "/v1")
    with (
        EmbeddingClientAdapter(embedder, batch_size=1, max_concurrency=2) as client,
        pytest.raises(InvalidRequestError, match="bad input"),
    ):
        client.embed(["a", "bad", "c"])


class Broken(MockEmbedding):
    def embed_batch(self, texts: Sequence[str]) -> list[list[float]]:
        return super().embed_batch(texts)[:-1]


def test_short_answers_are_detected() -> None:
    with pytest.raises(UpstreamError, match="returned 1 vectors for a batch of 2"):
        EmbeddingClientAdapter(Broken()).embed(["a", "b"])


async def test_aembed_runs_off_the_event_loop() -> None:
    client = EmbeddingClientAdapter(ThreadRecorder())
    vectors = await client.aembed(["x", "y"])
    assert len(vectors) == 2
    assert threading.get_ident() not in client.embedder.threads  # type: ignore[attr-defined]


@settings(max_examples=50, deadline=None)
@given(
    texts=st.lists(st.text(max_size=12), max_size=40),
    batch_size=st.integers(min_value=1, max_value=7),
    concurrency=st.integers(min_value=1, max_value=4),
)
def test_every_text_gets_its_own_vector_in_order(
    texts: list[str], batch_size: int, concurrency: int
) -> None:
    embedder = MockEmbedding(dim=8, seed=3)
    with EmbeddingClientAdapter(
        embedder, batch_size=batch_size, max_concurrency=concurrency
    ) as client:
        assert client.embed(texts) == [embedder.embed(t) for t in texts]
