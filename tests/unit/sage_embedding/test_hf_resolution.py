"""`hf` model resolution without loading a model: offline errors, paths, availability."""

from __future__ import annotations

from pathlib import Path

import pytest

from sage.common.components.sage_embedding import EmbeddingFactory, check_model_availability
from sage.common.components.sage_embedding.methods.hf import hf_cache_dir, hf_offline
from sage.common.exceptions import ConfigurationError, ModelNotFoundError

from .hf_support import MINILM_ID, fake_hub_cache, minilm_path, needs_sentence_transformers

pytestmark = needs_sentence_transformers


def test_hub_id_offline_is_needs_download(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigurationError, match="needs_download") as caught:
        EmbeddingFactory.create("hf", model="BAAI/bge-small-zh-v1.5")
    assert caught.value.code == "model_needs_download"
    assert "HF_HUB_OFFLINE" in caught.value.message
    assert "BAAI/bge-small-zh-v1.5" in caught.value.message
    status = check_model_availability("hf", "BAAI/bge-small-zh-v1.5")
    assert status["status"] == "needs_download"
    assert "offline" in status["message"]
    assert status["action"]


def test_uncached_hub_id_online_is_needs_download_too() -> None:
    status = check_model_availability("hf", "BAAI/bge-small-zh-v1.5", env={})
    assert status["status"] == "needs_download"
    assert "downloaded from https://huggingface.co" in status["message"]
    mirror = check_model_availability(
        "hf", "BAAI/bge-small-zh-v1.5", env={"HF_ENDPOINT": "https://hf-mirror.com"}
    )
    assert "https://hf-mirror.com" in mirror["message"]


def test_local_files_only_never_downloads() -> None:
    with pytest.raises(ConfigurationError, match="local_files_only"):
        EmbeddingFactory.create("hf", model="BAAI/bge-small-zh-v1.5", local_files_only=True)


def test_missing_folder_is_model_not_found(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        EmbeddingFactory.create("hf", model=missing)
    assert check_model_availability("hf", missing)["status"] == "unavailable"
    assert check_model_availability("hf", "not a valid id!")["status"] == "unavailable"


def test_statuses_for_folder_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_model_availability("hf", str(minilm_path()))["status"] == "available"
    monkeypatch.setenv("HF_HUB_CACHE", str(fake_hub_cache(tmp_path / "hub")))
    assert check_model_availability("hf", MINILM_ID)["status"] == "cached"
    assert check_model_availability("hf")["status"] == "available"


def test_environment_helpers() -> None:
    assert hf_offline({"HF_HUB_OFFLINE": "true"})
    assert hf_offline({"TRANSFORMERS_OFFLINE": "1"})
    assert not hf_offline({"HF_HUB_OFFLINE": "0"})
    assert hf_cache_dir({"HF_HOME": "/x"}) == "/x/hub"
    assert hf_cache_dir({"HF_HUB_CACHE": "/c", "HF_HOME": "/x"}) == "/c"
    assert hf_cache_dir({}) is None
