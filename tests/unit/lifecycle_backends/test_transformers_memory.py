"""What lifecycle reserves on a GPU for the transformers chat engine (issue 17, item 6).

It used to reserve a flat 2 GiB whatever the model: a 1.1B model in bfloat16 (2 GiB of
weights alone) was under-reserved, and the ledger could place another engine into memory
this one was about to take. Now the reservation is read from the model folder; on an H100
(scripts/device/gpu_chat_check.sh) a 1.1B engine used 3002 MiB after short chats and 3192 MiB
after a 1956-token prompt, inside its reservation of weights + context + headroom.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sage.services.lifecycle.backends import BACKENDS
from sage.services.lifecycle.backends.transformers import RUNTIME_HEADROOM_BYTES
from sage.services.lifecycle.manager import DEFAULT_SMALL_ENGINE_GB, EngineLifecycleManager
from sage.services.lifecycle.spec import EngineSpec

from .test_vllm_real_args import RecordingGpus

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LAYERS, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, MAX_POS = 2, 64, 128, 4, 2, 512


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A real (random) Llama saved by transformers in float32, and its parameter count."""
    config = transformers.LlamaConfig(
        vocab_size=1000,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POS,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(str(folder), safe_serialization=True)
    params = sum(p.numel() for p in model.parameters())
    return folder, params


async def reserved(tmp_path: Path, spec: EngineSpec) -> int:
    """Bytes per GPU lifecycle asks gpu_manager for when it starts `spec` on a GPU."""
    gpus = RecordingGpus()
    manager = EngineLifecycleManager(tmp_path / "state", gpus=gpus)
    try:
        await manager._reserve("e", spec, BACKENDS["transformers"])
    finally:
        await manager.shutdown()
    ((_, count, per_gpu, fraction),) = gpus.asked
    assert (count, fraction) == (1, 0.0)
    return per_gpu


def context(length: int, per_value: int) -> int:
    """One sequence's KV in every layer + the prefill's live activations in one layer."""
    kv = 2 * LAYERS * KV_HEADS * (HIDDEN // HEADS)
    activations = 3 * INTERMEDIATE + 6 * HIDDEN
    return (kv + activations) * length * per_value


async def test_reservation_is_weights_in_served_dtype_plus_context_and_headroom(
    llama_dir: tuple[Path, int], tmp_path: Path
) -> None:
    folder, params = llama_dir
    # Saved in float32, served in bfloat16 on a GPU: the weights take half their file size.
    got = await reserved(tmp_path, EngineSpec(model=str(folder), backend="transformers"))
    assert got == params * 2 + context(MAX_POS, 2) + RUNTIME_HEADROOM_BYTES
    assert got != int(DEFAULT_SMALL_ENGINE_GB * 2**30)


async def test_dtype_and_context_length_change_the_reservation(
    llama_dir: tuple[Path, int], tmp_path: Path
) -> None:
    folder, params = llama_dir
    spec = EngineSpec(
        model=str(folder),
        backend="transformers",
        max_model_len=128,
        extra_args=("--dtype", "float32"),
    )
    got = await reserved(tmp_path, spec)
    assert got == params * 4 + context(128, 4) + RUNTIME_HEADROOM_BYTES


async def test_explicit_memory_wins_and_unknown_models_get_the_default(
    llama_dir: tuple[Path, int], tmp_path: Path
) -> None:
    folder, _ = llama_dir
    explicit = EngineSpec(model=str(folder), backend="transformers", required_memory_gb=3)
    assert await reserved(tmp_path, explicit) == 3 * 2**30
    # A hub id (nothing on disk) or a folder without safetensors: no estimate to make.
    for model in ("org/some-chat-model", str(tmp_path)):
        got = await reserved(tmp_path, EngineSpec(model=model, backend="transformers"))
        assert got == int(DEFAULT_SMALL_ENGINE_GB * 2**30)
