"""`mockembedder`: seeded random unit vectors, for tests that need an embedder but no model."""

from __future__ import annotations

import random

from sage.common.components.sage_embedding.base import BaseEmbedding, l2_normalize
from sage.common.components.sage_embedding.protocols import Vector
from sage.common.components.sage_embedding.registry import MethodSpec
from sage.common.exceptions import InvalidRequestError

__all__ = ["SPEC", "MockEmbedding"]


class MockEmbedding(BaseEmbedding):
    """Gaussian vectors drawn from a generator seeded by (`seed`, text), then normalised.

    The same text gives the same vector for the same seed, so tests can compare results;
    different texts give unrelated vectors.
    """

    method = "mockembedder"
    default_batch_size = 256

    def __init__(self, dim: int = 128, seed: int = 42) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise InvalidRequestError("mock embedding dim must be a positive integer", param="dim")
        self.dim = dim
        self.seed = seed

    def embed(self, text: str) -> Vector:
        """A unit vector determined by the seed and `text`."""
        rng = random.Random(f"{self.seed}\x00{text}")
        return l2_normalize([rng.gauss(0.0, 1.0) for _ in range(self.dim)])

    def get_dim(self) -> int:
        """The `dim` it was created with."""
        return self.dim


SPEC = MethodSpec(
    name="mockembedder",
    display_name="Mock embedder",
    description="Seeded random unit vectors for tests; no model, no network",
    factory=MockEmbedding,
    default_dimension=128,
    examples=("mockembedder",),
    aliases=("mock",),
)
