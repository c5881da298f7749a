"""`hash`: deterministic bag-of-tokens vectors with no model and no network.

Useful for tests, demos and as an offline fallback: the same text always gives the same
vector on every machine, and texts sharing words get similar vectors.
"""

from __future__ import annotations

import hashlib
import re

from sage.common.components.sage_embedding.base import BaseEmbedding, l2_normalize
from sage.common.components.sage_embedding.protocols import Vector
from sage.common.components.sage_embedding.registry import MethodSpec
from sage.common.exceptions import InvalidRequestError

__all__ = ["SPEC", "HashEmbedding"]

TOKEN_PATTERN = re.compile(r"[\w\u4e00-\u9fa5]+")
"""Words, numbers and CJK runs; punctuation and spaces separate tokens."""


class HashEmbedding(BaseEmbedding):
    """Each lower-cased token's SHA-256, read as eight 4-byte little-endian integers, adds 1
    at each integer mod `dim`; the sum is L2-normalised (an empty text stays all zeros)."""

    method = "hash"
    default_batch_size = 256

    def __init__(self, dim: int = 384) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise InvalidRequestError("hash embedding dim must be a positive integer", param="dim")
        self.dim = dim

    def embed(self, text: str) -> Vector:
        """The normalised token-hash histogram of `text`."""
        counts = [0.0] * self.dim
        for token in TOKEN_PATTERN.findall(text.lower()):
            digest = hashlib.sha256(token.encode("utf-8")).digest()
            for offset in range(0, len(digest), 4):
                counts[int.from_bytes(digest[offset : offset + 4], "little") % self.dim] += 1.0
        return l2_normalize(counts)

    def get_dim(self) -> int:
        """The `dim` it was created with."""
        return self.dim


SPEC = MethodSpec(
    name="hash",
    display_name="Hash embedding",
    description="Deterministic token-hash vectors; no model download, no network, no API key",
    factory=HashEmbedding,
    default_dimension=384,
    examples=("hash",),
)
