"""The seed document's two embedding snippets, run as written.

Only the `hf` model name differs where the network is needed: this machine has none, so
`BAAI/bge-small-zh-v1.5` must fail with a clear needs_download error, and the same flow
runs with the bundled all-MiniLM-L6-v2 folder instead.
"""

from __future__ import annotations

import pytest

from sage.common.exceptions import ConfigurationError

from .hf_support import minilm_path, needs_sentence_transformers


def test_local_embedding_snippet(capsys: pytest.CaptureFixture[str]) -> None:
    # --- verbatim from the seed (本地 Embedding) ---
    from sage.common.components.sage_embedding import (  # noqa: I001
        EmbeddingFactory,
        EmbeddingClientAdapter,
        list_embedding_models,
    )

    for method, info in list_embedding_models().items():
        print(f"{method}: {info['description']}")

    embedder = EmbeddingFactory.create("hash", dim=384)
    client = EmbeddingClientAdapter(embedder)  # 获得批量接口
    vectors = client.embed(["Hello", "World"])
    single_vector = embedder.embed("single-text")  # 仍可按需单条调用
    # --- end of seed snippet ---

    printed = capsys.readouterr().out.splitlines()
    assert "hash: " + list_embedding_models()["hash"]["description"] in printed
    assert len(printed) == 11
    assert len(vectors) == 2 and all(len(v) == 384 for v in vectors)
    assert vectors[0] != vectors[1]
    assert len(single_vector) == 384


@needs_sentence_transformers
def test_hf_snippet_offline_says_needs_download(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from sage.common.components.sage_embedding import (  # noqa: I001
        EmbeddingFactory,
        EmbeddingClientAdapter,
        check_model_availability,
    )

    with pytest.raises(ConfigurationError, match="needs_download"):
        EmbeddingFactory.create("hf", model="BAAI/bge-small-zh-v1.5")
    assert check_model_availability("hf", "BAAI/bge-small-zh-v1.5")["status"] == "needs_download"
    assert EmbeddingClientAdapter is not None


@needs_sentence_transformers
@pytest.mark.slow
def test_hf_snippet_with_the_bundled_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_folder = str(minilm_path())
    # --- the seed's hf snippet, with the bundled model folder as the model name ---
    from sage.common.components.sage_embedding import (  # noqa: I001
        EmbeddingFactory,
        EmbeddingClientAdapter,
    )

    # EmbeddingFactory 返回单文本接口 → 通过 Adapter 获得批量 embed(list[str])
    raw_embedder = EmbeddingFactory.create("hf", model=model_folder)
    client = EmbeddingClientAdapter(raw_embedder)
    vectors = client.embed(["Hello", "World"])

    # 直接消费 BaseEmbedding 时需逐条调用:raw_embedder.embed("only-one-text")
    one = raw_embedder.embed("only-one-text")
    # --- end of seed snippet ---

    assert len(vectors) == 2 and all(len(v) == 384 for v in vectors)
    assert len(one) == raw_embedder.get_dim() == 384
