"""`mockembedder`: seeded, deterministic, unit-length random vectors."""

from __future__ import annotations

import math

import pytest

from sage.common.components.sage_embedding import EmbeddingFactory, MockEmbedding
from sage.common.exceptions import InvalidRequestError


def test_deterministic_per_seed_and_text() -> None:
    first = EmbeddingFactory.create("mockembedder", dim=16, seed=7)
    again = EmbeddingFactory.create("mock", dim=16, seed=7)
    other_seed = MockEmbedding(dim=16, seed=8)
    assert first.embed("x") == again.embed("x")
    assert first.embed("x") != first.embed("y")
    assert first.embed("x") != other_seed.embed("x")


def test_shape_and_norm() -> None:
    embedder = MockEmbedding()
    vector = embedder.embed("hello")
    assert embedder.get_dim() == len(vector) == 128
    assert math.isclose(math.fsum(v * v for v in vector), 1.0)
    assert embedder.method_name == "mockembedder"


def test_bad_dim() -> None:
    with pytest.raises(InvalidRequestError):
        MockEmbedding(dim=0)
