"""GPUResourceManager's SAGE methods over simulated NVML, and the model memory estimator."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sage.common.exceptions import InsufficientResourcesError, InvalidRequestError, NotFoundError
from sage.services.gpu_manager import GPUResourceManager
from sage.services.gpu_manager.estimate import (
    MODEL_SIZE_TABLE,
    ModelMemoryEstimator,
    params_from_config,
    params_from_name,
)
from sage.services.gpu_manager.ledger import ReservationLedger, SafetyMargin
from sage.services.gpu_manager.nvml import NvmlReader
from sage.services.gpu_manager.sim_nvml import NVML_ERROR_LIBRARY_NOT_FOUND, SimGpu, SimNvml
from sage.services.gpu_manager.store import ReservationStore

GiB = 1 << 30


def manager(
    nvml: SimNvml, tmp_path: Path, estimator: ModelMemoryEstimator | None = None
) -> GPUResourceManager:
    return GPUResourceManager(
        NvmlReader(nvml),
        ReservationLedger(
            margin=SafetyMargin(0.0, GiB), store=ReservationStore(tmp_path / "r.json")
        ),
        estimator,
    )


def test_get_system_status_merges_readings_and_ledger(tmp_path: Path) -> None:
    nvml = SimNvml([SimGpu(name="NVIDIA H200", total_bytes=140 * GiB, used_bytes=20 * GiB)])
    gpus = manager(nvml, tmp_path)
    gpus.reserve("e1", memory_per_gpu_bytes=30 * GiB, owner_pid=os.getpid())
    (status,) = gpus.get_system_status()
    assert status["name"] == "NVIDIA H200" and status["index"] == 0
    assert status["memory_total_gb"] == 140.0 and status["memory_used_gb"] == 20.0
    assert status["memory_free_gb"] == 120.0 and status["memory_reserved_gb"] == 30.0
    assert status["memory_available_gb"] == 89.0  # 120 - 1 margin - 30
    assert status["engines"] == ["e1"] and status["uuid"].startswith("GPU-")


def test_no_gpu_host_has_an_empty_status(tmp_path: Path) -> None:
    gpus = manager(SimNvml(init_error=NVML_ERROR_LIBRARY_NOT_FOUND), tmp_path)
    assert gpus.get_system_status() == []
    assert gpus.check_resource_availability(1.0) == []
    with pytest.raises(InsufficientResourcesError):
        gpus.allocate_resources(1.0)


def test_check_allocate_release_resources(tmp_path: Path) -> None:
    gpus = manager(SimNvml([SimGpu(total_bytes=40 * GiB), SimGpu(total_bytes=80 * GiB)]), tmp_path)
    assert gpus.check_resource_availability(30.0) == [1]
    assert gpus.check_resource_availability(30.0, count=2) == [0, 1]
    assert gpus.check_resource_availability(50.0, count=2) == []
    assert gpus.allocate_resources(30.0, count=2) == [0, 1]
    assert gpus.check_resource_availability(30.0) == [1]  # 49 left on 1, 9 on 0
    assert gpus.allocate_resources(30.0) == [1]
    with pytest.raises(InsufficientResourcesError):
        gpus.allocate_resources(30.0)
    gpus.release_resources([1, 0], 30.0)
    assert [r.gpu_index for r in gpus.reservations()] == [1]
    gpus.release_resources([1], 30.0)
    assert gpus.reservations() == []
    with pytest.raises(NotFoundError):
        gpus.release_resources([1], 30.0)


@pytest.mark.parametrize("gb", [0.0, -1.0, float("nan")])
def test_sizes_must_be_positive(tmp_path: Path, gb: float) -> None:
    gpus = manager(SimNvml(), tmp_path)
    with pytest.raises(InvalidRequestError):
        gpus.allocate_resources(gb)
    with pytest.raises(InvalidRequestError):
        gpus.check_resource_availability(gb)
    with pytest.raises(InvalidRequestError):
        gpus.release_resources([0], gb)


def test_count_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError):
        manager(SimNvml(), tmp_path).allocate_resources(1.0, count=0)


# ---- estimate_model_memory -----------------------------------------------------------


def test_estimate_from_table_and_name(tmp_path: Path) -> None:
    gpus = manager(SimNvml(), tmp_path, ModelMemoryEstimator([tmp_path / "no-cache"]))
    # 7e9 params x 2 bytes = 13.04 GiB; /2 GPUs x 1.2 + 1 GiB context.
    assert gpus.estimate_model_memory("Qwen/Qwen2.5-7B-Instruct", 2) == pytest.approx(8.823, 1e-3)
    assert gpus.estimate_model_memory("Qwen/Qwen2.5-7B-Instruct") == pytest.approx(16.646, 1e-3)
    assert gpus.estimate_model_memory("BAAI/bge-m3") == pytest.approx(
        MODEL_SIZE_TABLE["bge-m3"] * 1e9 * 2 / GiB * 1.2 + 1, 1e-3
    )
    with pytest.raises(InvalidRequestError) as info:
        gpus.estimate_model_memory("acme/mystery-model")
    assert info.value.param == "model"
    with pytest.raises(InvalidRequestError):
        gpus.estimate_model_memory("Qwen/Qwen2.5-7B-Instruct", 0)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("Qwen/Qwen2.5-0.5B-Instruct", 0.5e9),
        ("meta-llama/Llama-3.1-70B", 70e9),
        ("facebook/opt-125m", 125e6),
        ("mistralai/Mixtral-8x7B-v0.1", 46.7e9),
        ("some/model-4x2b", 8e9),
        ("BAAI/bge-small-en-v1.5", 0.033e9),
        ("sentence-transformers/all-MiniLM-L6-v2", 0.023e9),
        ("acme/v2-chat", 0.0),
    ],
)
def test_params_from_name(name: str, params: float) -> None:
    assert params_from_name(name) == pytest.approx(params)


def test_estimate_from_local_safetensors_and_hub_cache(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny" / "snapshots" / "abc123"
    blobs = cache / "models--acme--tiny" / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, size in enumerate((3 * GiB // 4, GiB // 4)):
        blob = blobs / f"blob{i}"
        with blob.open("wb") as fh:
            fh.truncate(size)  # sparse: a real size, no disk used
        (snapshot / f"model-0000{i}.safetensors").symlink_to(blob)
    estimator = ModelMemoryEstimator([cache], overhead_fraction=0.0, context_bytes=0)
    est = estimator.estimate("acme/tiny")
    assert (est.weights_bytes, est.source) == (GiB, "weights")
    assert estimator.estimate("acme/tiny", 4).per_gpu_bytes == GiB // 4
    # A local folder path works the same, and the index's total_size wins over file sizes.
    (snapshot / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 5 * GiB}, "weight_map": {}})
    )
    assert estimator.estimate(str(snapshot)).weights_bytes == 5 * GiB


def test_estimate_from_config_json(tmp_path: Path) -> None:
    config = {  # Qwen2.5-7B's shape: about 7.6e9 parameters
        "hidden_size": 3584,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "intermediate_size": 18944,
        "vocab_size": 152064,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    assert params_from_config(config) == pytest.approx(7.6e9, rel=0.02)
    folder = tmp_path / "qwen"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    est = ModelMemoryEstimator(overhead_fraction=0.0, context_bytes=0).estimate(str(folder))
    assert est.source == "config"
    assert est.weights_bytes == pytest.approx(2 * params_from_config(config), rel=1e-6)
    (folder / "config.json").write_text(
        json.dumps({**config, "quantization_config": {"bits": 4, "quant_method": "awq"}})
    )
    quantised = ModelMemoryEstimator(overhead_fraction=0.0, context_bytes=0).estimate(str(folder))
    assert quantised.weights_bytes == pytest.approx(est.weights_bytes / 4, rel=1e-6)
