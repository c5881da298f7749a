"""How much GPU memory a model needs per GPU, before it is started.

Weights come, in this order, from what is on disk (a local model folder or the Hugging
Face hub cache): the safetensors/PyTorch index's `total_size`, the weight files' sizes,
or a parameter count computed from `config.json`; otherwise from `MODEL_SIZE_TABLE` or a
size written in the name (`Qwen2.5-7B-Instruct` → 7e9 parameters) at 2 bytes per parameter
(bf16; 1 for fp8/int8, 0.5 for 4-bit names).

Per GPU = weights / tensor_parallel × (1 + overhead_fraction) + context_bytes. This is what
the model needs to load and run small batches; the KV cache an engine like vLLM sizes from
`gpu_memory_utilization` is not included, so such engines should reserve a fraction.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sage.common.exceptions import InvalidRequestError

GiB = 1 << 30

# Parameters (billions) of common models whose names do not say their size. Keys are
# lowercase substrings of the model name; the longest match wins.
MODEL_SIZE_TABLE: dict[str, float] = {
    "bge-m3": 0.568,
    "bge-large": 0.335,
    "bge-base": 0.109,
    "bge-small": 0.033,
    "bge-reranker-v2-m3": 0.568,
    "all-minilm-l6": 0.023,
    "all-minilm-l12": 0.033,
    "all-mpnet-base": 0.109,
    "e5-large": 0.335,
    "e5-base": 0.109,
    "e5-small": 0.033,
    "gte-large": 0.335,
    "gte-base": 0.109,
    "gte-small": 0.033,
    "nomic-embed-text": 0.137,
    "gpt2": 0.124,
    "gpt2-medium": 0.355,
    "gpt2-large": 0.774,
    "gpt2-xl": 1.558,
    "mixtral-8x7b": 46.7,
    "mixtral-8x22b": 141.0,
    "deepseek-v3": 671.0,
    "deepseek-r1": 671.0,
}

_SIZE_IN_NAME = re.compile(r"(?<![a-z0-9.])(?:(\d+)x)?(\d+(?:\.\d+)?)([bm])(?![a-z])")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_DTYPE_BYTES = {"float32": 4.0, "float": 4.0, "float16": 2.0, "half": 2.0, "bfloat16": 2.0}


@dataclass(frozen=True)
class MemoryEstimate:
    """A model's weights and what one GPU of a tensor-parallel group needs for it."""

    model: str
    weights_bytes: int
    per_gpu_bytes: int
    tensor_parallel_size: int
    # "weights" (files on disk), "config" (config.json) or "table" (name / MODEL_SIZE_TABLE).
    source: str


class ModelMemoryEstimator:
    """Estimates per-GPU memory from local files, else from the documented table."""

    def __init__(
        self,
        hub_cache_dirs: Sequence[Path] = (),
        *,
        overhead_fraction: float = 0.2,
        context_bytes: int = 1 * GiB,
    ) -> None:
        self.hub_cache_dirs = tuple(hub_cache_dirs)
        self.overhead_fraction = overhead_fraction
        self.context_bytes = context_bytes

    def estimate(self, model: str, tensor_parallel_size: int = 1) -> MemoryEstimate:
        """The estimate; raises InvalidRequestError when nothing is known about the model."""
        if not model or not model.strip():
            raise InvalidRequestError("model is required", param="model")
        if tensor_parallel_size < 1:
            raise InvalidRequestError(
                f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}",
                param="tensor_parallel_size",
            )
        weights, source = self._weights(model)
        per_gpu = (
            int(weights / tensor_parallel_size * (1 + self.overhead_fraction)) + self.context_bytes
        )
        return MemoryEstimate(model, weights, per_gpu, tensor_parallel_size, source)

    def _weights(self, model: str) -> tuple[int, str]:
        folder = self.local_folder(model)
        if folder is not None:
            on_disk = _weights_on_disk(folder)
            if on_disk:
                return on_disk, "weights"
            config = _read_json(folder / "config.json")
            if config:
                params = params_from_config(config)
                if params:
                    return int(params * _bytes_per_param(config, model)), "config"
        params = params_from_name(model)
        if params:
            return int(params * _bytes_per_param({}, model)), "table"
        raise InvalidRequestError(
            f"cannot estimate memory for model {model!r}: no local config or weights, and its "
            "size is neither in its name nor in the table; give the memory explicitly",
            param="model",
        )

    def local_folder(self, model: str) -> Path | None:
        """The model's folder: the path itself, or the newest hub-cache snapshot of it."""
        path = Path(model).expanduser()
        if path.is_dir():
            return path
        if "/" not in model or model.startswith(("/", ".")):
            return None
        repo = "models--" + model.replace("/", "--")
        for cache in self.hub_cache_dirs:
            snapshots = cache / repo / "snapshots"
            if snapshots.is_dir():
                found = sorted(
                    (p for p in snapshots.iterdir() if p.is_dir()),
                    key=lambda p: p.stat().st_mtime,
                    reverse=True,
                )
                if found:
                    return found[0]
        return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _weights_on_disk(folder: Path) -> int:
    for name in _WEIGHT_INDEXES:
        total = _read_json(folder / name).get("metadata", {}).get("total_size")
        if isinstance(total, int | float) and total > 0:
            return int(total)
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        # stat() follows the hub cache's symlinks to the blobs.
        sizes = [p.stat().st_size for p in folder.glob(pattern) if p.exists()]
        if sizes:
            return sum(sizes)
    return 0


def params_from_config(config: dict[str, Any]) -> float:
    """Approximate parameter count of a transformer from its Hugging Face config
    (embeddings + attention with grouped KV heads + a dense or mixture-of-experts MLP)."""
    config = {**config.get("text_config", {}), **config} if "text_config" in config else config

    def first(*keys: str) -> Any:
        return next((config[k] for k in keys if isinstance(config.get(k), int | float)), None)

    hidden = first("hidden_size", "d_model", "n_embd", "dim")
    layers = first("num_hidden_layers", "n_layer", "num_layers", "n_layers")
    vocab = first("vocab_size") or 0
    if not hidden or not layers:
        return 0.0
    heads = first("num_attention_heads", "n_head", "n_heads") or max(1, hidden // 128)
    kv_heads = first("num_key_value_heads", "n_kv_heads") or heads
    head_dim = first("head_dim") or hidden / heads
    intermediate = first("intermediate_size", "n_inner", "ffn_dim", "d_ff") or 4 * hidden
    experts = first("num_local_experts", "num_experts", "n_routed_experts") or 1
    expert_size = first("moe_intermediate_size") or intermediate
    gated = str(config.get("hidden_act", config.get("activation_function", ""))) in {
        "silu",
        "swiglu",
        "swish",
    }
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    mlp = experts * (3 if gated else 2) * hidden * (expert_size if experts > 1 else intermediate)
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings", True) else 2)
    return float(embeddings + layers * (attention + mlp))


def params_from_name(model: str) -> float:
    """Parameters from MODEL_SIZE_TABLE (longest key in the name) or a size in the name."""
    name = model.lower().rsplit("/", 1)[-1]
    keys = [k for k in MODEL_SIZE_TABLE if k in name]
    if keys:
        return MODEL_SIZE_TABLE[max(keys, key=len)] * 1e9
    best = 0.0
    for experts, size, unit in _SIZE_IN_NAME.findall(name):
        value = float(size) * (1e9 if unit == "b" else 1e6) * (int(experts) if experts else 1)
        best = max(best, value)
    return best


def _bytes_per_param(config: dict[str, Any], model: str) -> float:
    quant = config.get("quantization_config")
    if isinstance(quant, dict):
        bits = quant.get("bits") or quant.get("w_bit")
        if isinstance(bits, int) and bits > 0:
            return bits / 8
        if "fp8" in str(quant.get("quant_method", "")).lower():
            return 1.0
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "").removeprefix("torch.")
    if dtype in _DTYPE_BYTES:
        return _DTYPE_BYTES[dtype]
    name = model.lower()
    if any(tag in name for tag in ("awq", "gptq", "int4", "4bit", "-q4")):
        return 0.5
    if any(tag in name for tag in ("fp8", "int8", "8bit")):
        return 1.0
    return 2.0
