"""EmbeddingClientAdapter: the batch `embed(list[str])` interface over any single-text embedder.

The adapter cuts the input into batches of `batch_size` and, for methods that allow it
(remote APIs), runs up to `max_concurrency` batches at once on its own thread pool;
results always come back in input order. Local models run their batches one after the
other in the calling thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Self

from sage.common.components.sage_embedding.protocols import (
    BatchEmbeddingProtocol,
    EmbeddingProtocol,
    Vector,
)
from sage.common.exceptions import InvalidRequestError, UpstreamError

__all__ = ["EmbeddingClientAdapter"]


class EmbeddingClientAdapter:
    """Batch interface over `embedder`; `batch_size` and `max_concurrency` default to what
    the embedder declares (`default_batch_size`, `max_concurrency`), else 32 and 1."""

    def __init__(
        self,
        embedder: EmbeddingProtocol,
        *,
        batch_size: int | None = None,
        max_concurrency: int | None = None,
    ) -> None:
        self.embedder = embedder
        if batch_size is None:
            batch_size = int(getattr(embedder, "default_batch_size", 32))
        if max_concurrency is None:
            max_concurrency = int(getattr(embedder, "max_concurrency", 1))
        self.batch_size = batch_size
        self.max_concurrency = max_concurrency
        if self.batch_size <= 0:
            raise InvalidRequestError("batch_size must be positive", param="batch_size")
        if self.max_concurrency <= 0:
            raise InvalidRequestError("max_concurrency must be positive", param="max_concurrency")
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    @property
    def method_name(self) -> str:
        """The wrapped embedder's method name."""
        return self.embedder.method_name

    def get_dim(self) -> int:
        """Length of the vectors."""
        return self.embedder.get_dim()

    def embed(self, texts: Sequence[str]) -> list[Vector]:
        """One vector per text, in order. Pass a list: a bare string is refused, not split."""
        batch = _validated(texts)
        if not batch:
            return []
        chunks = [batch[i : i + self.batch_size] for i in range(0, len(batch), self.batch_size)]
        if self.max_concurrency == 1 or len(chunks) == 1:
            results = [self._embed_chunk(chunk) for chunk in chunks]
        else:
            results = self._embed_concurrently(chunks)
        vectors = [vector for result in results for vector in result]
        if len(vectors) != len(batch):
            raise UpstreamError(
                f"{self.method_name} returned {len(vectors)} vectors for {len(batch)} texts"
            )
        return vectors

    async def aembed(self, texts: Sequence[str]) -> list[Vector]:
        """`embed` off the event loop, for asyncio callers."""
        return await asyncio.to_thread(self.embed, texts)

    def _embed_chunk(self, chunk: list[str]) -> list[Vector]:
        if isinstance(self.embedder, BatchEmbeddingProtocol):
            got = self.embedder.embed_batch(chunk)
        else:
            got = [self.embedder.embed(text) for text in chunk]
        if len(got) != len(chunk):
            raise UpstreamError(
                f"{self.method_name} returned {len(got)} vectors for a batch of {len(chunk)}"
            )
        return got

    def _embed_concurrently(self, chunks: list[list[str]]) -> list[list[Vector]]:
        pool = self._executor()
        futures: list[Future[list[Vector]]] = [pool.submit(self._embed_chunk, c) for c in chunks]
        try:
            return [future.result() for future in futures]
        finally:
            # After a failure, batches that have not started yet are not sent at all.
            for future in futures:
                future.cancel()

    def _executor(self) -> ThreadPoolExecutor:
        # One pool per adapter bounds in-flight batches even across caller threads.
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=self.max_concurrency, thread_name_prefix="sage-embed"
                )
            return self._pool

    def close(self) -> None:
        """Stop the worker threads; the embedder stays open (it belongs to the caller)."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"EmbeddingClientAdapter({self.embedder!r}, batch_size={self.batch_size}, "
            f"max_concurrency={self.max_concurrency})"
        )


def _validated(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str | bytes):
        raise InvalidRequestError(
            "EmbeddingClientAdapter.embed takes a list of texts; for one text call "
            "embed([text]) or the embedder's embed(text)",
            param="texts",
        )
    batch = list(texts)
    for index, text in enumerate(batch):
        if not isinstance(text, str):
            raise InvalidRequestError(
                f"texts[{index}] is {type(text).__name__}, not str", param="texts"
            )
    return batch
