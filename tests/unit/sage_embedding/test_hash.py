"""`hash`: the documented token-hash algorithm, deterministic and normalised."""

from __future__ import annotations

import hashlib
import math
import re

import pytest

from sage.common.components.sage_embedding import EmbeddingFactory, HashEmbedding
from sage.common.exceptions import InvalidRequestError


def reference(text: str, dim: int) -> list[float]:
    """The spec, written out independently: tokens, SHA-256, 4-byte LE chunks mod dim, L2."""
    vec = [0.0] * dim
    for token in re.findall(r"[\w\u4e00-\u9fa5]+", text.lower()):
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        for i in range(0, 32, 4):
            vec[int.from_bytes(digest[i : i + 4], "little") % dim] += 1
    norm = math.sqrt(sum(v * v for v in vec))
    return [v / norm for v in vec] if norm else vec


@pytest.mark.parametrize("text", ["Hello", "Hello, World!", "混合 text 中文分词 42", "a a a b"])
@pytest.mark.parametrize("dim", [384, 17, 1])
def test_matches_the_specification(text: str, dim: int) -> None:
    assert HashEmbedding(dim=dim).embed(text) == pytest.approx(reference(text, dim))


def test_known_vector_for_one_token() -> None:
    digest = hashlib.sha256(b"hello").digest()
    expected = [0.0] * 384
    for i in range(0, 32, 4):
        expected[int.from_bytes(digest[i : i + 4], "little") % 384] += 1
    norm = math.sqrt(sum(v * v for v in expected))
    vector = EmbeddingFactory.create("hash", dim=384).embed("HELLO")
    assert vector == pytest.approx([v / norm for v in expected])


def test_properties() -> None:
    embedder = HashEmbedding()
    assert embedder.get_dim() == 384
    assert embedder.method_name == "hash"
    assert embedder.embed("Hello world") == embedder.embed("hello,   WORLD.")
    assert math.isclose(math.fsum(v * v for v in embedder.embed("anything")), 1.0)
    assert embedder.embed("") == [0.0] * 384
    assert embedder.embed("!!!") == [0.0] * 384
    assert embedder.embed_batch(["a", "b"]) == [embedder.embed("a"), embedder.embed("b")]


@pytest.mark.parametrize("dim", [0, -3, True])
def test_bad_dim(dim: int) -> None:
    with pytest.raises(InvalidRequestError, match="dim"):
        HashEmbedding(dim=dim)
