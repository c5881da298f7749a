"""BaseEmbedding: the shared shape of every embedding method."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from types import TracebackType
from typing import ClassVar, Self

from sage.common.components.sage_embedding.protocols import Vector

__all__ = ["BaseEmbedding", "l2_normalize"]


class BaseEmbedding(ABC):
    """A single-text embedder; batching and concurrency come from `EmbeddingClientAdapter`.

    Subclasses set `method` (the registry name) and say how the adapter may drive them:
    `default_batch_size` texts per `embed_batch` call, and at most `max_concurrency` such
    calls at once (1 for local models, which already use every core).
    """

    method: ClassVar[str] = ""
    default_batch_size: ClassVar[int] = 32
    max_concurrency: ClassVar[int] = 1

    @property
    def method_name(self) -> str:
        """The registry name of this method."""
        return type(self).method

    @property
    def model_name(self) -> str:
        """The model behind the vectors; methods without models report their own name."""
        return self.method_name

    @abstractmethod
    def embed(self, text: str) -> Vector:
        """The embedding of one text."""

    def embed_batch(self, texts: Sequence[str]) -> list[Vector]:
        """Embeddings of `texts` in order; methods with a native batch call override this."""
        return [self.embed(text) for text in texts]

    @abstractmethod
    def get_dim(self) -> int:
        """Length of the vectors."""

    def close(self) -> None:  # noqa: B027 - optional hook, most methods hold nothing
        """Release connections or models; the default holds nothing."""

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
        return f"{type(self).__name__}(method={self.method_name!r}, model={self.model_name!r})"


def l2_normalize(values: Sequence[float]) -> Vector:
    """`values` scaled to unit length; an all-zero vector stays zero (it has no direction)."""
    norm = math.sqrt(math.fsum(v * v for v in values))
    if norm == 0.0:
        return [0.0] * len(values)
    return [v / norm for v in values]
