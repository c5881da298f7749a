"""The small interfaces every embedding method and its callers agree on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol, TypedDict, runtime_checkable

__all__ = [
    "AvailabilityStatus",
    "BatchEmbeddingProtocol",
    "EmbeddingModelInfo",
    "EmbeddingProtocol",
    "ModelAvailability",
    "Vector",
]

Vector = list[float]
"""One embedding: plain Python floats, so it serialises anywhere without numpy."""


@runtime_checkable
class EmbeddingProtocol(Protocol):
    """One text in, one vector out; what `EmbeddingFactory.create` hands back."""

    @property
    def method_name(self) -> str:
        """The registry name of the method (`hash`, `hf`, `openai`, ...)."""
        ...

    def embed(self, text: str) -> Vector:
        """The embedding of a single text."""
        ...

    def get_dim(self) -> int:
        """Length of the vectors this embedder returns."""
        ...


@runtime_checkable
class BatchEmbeddingProtocol(EmbeddingProtocol, Protocol):
    """An embedder that also embeds many texts in one call (one request, one forward pass)."""

    def embed_batch(self, texts: Sequence[str]) -> list[Vector]:
        """Embeddings of `texts`, in the same order."""
        ...


class EmbeddingModelInfo(TypedDict):
    """What `list_embedding_models()` says about one method."""

    display_name: str
    description: str
    requires_api_key: bool
    requires_download: bool
    default_dimension: int | None
    examples: list[str]


AvailabilityStatus = Literal[
    "available", "needs_api_key", "needs_download", "cached", "unavailable"
]


class ModelAvailability(TypedDict):
    """What `check_model_availability()` found; `action` is empty when nothing needs doing."""

    status: AvailabilityStatus
    message: str
    action: str
