"""The project's own chat engine over Hugging Face transformers (small models, CPU or GPU)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from sage.engines.auth import ENGINE_KEY_ENV

from ..spec import EngineSpec
from ._common import (
    check_kind,
    check_single_device,
    device_flag,
    gpu_env,
    modules_availability,
    python_module_argv,
    require,
)
from .base import Availability, LaunchPlan

_INSTALL_HINT = "pip install 'sage-llm-control-plane[engines]'"

GiB = 1 << 30
# Besides weights, KV and the prefill's activations: the CUDA context, cuBLAS workspace and
# the caching allocator's blocks. Measured 0.89 GiB after warm-up and short chats (H100,
# torch 2.11 + CUDA 13; bench/RESULTS.md, "Real chat engine on a GPU"), plus a margin.
RUNTIME_HEADROOM_BYTES = 5 * GiB // 4
_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2}


class TransformersBackend:
    """`python -m sage.engines.transformers`: OpenAI chat/completions, one model, one device."""

    name = "transformers"
    kinds = frozenset({"llm"})
    uses_gpu = True
    launches_process = True
    api_key_env = ENGINE_KEY_ENV
    shards = False

    def availability(self) -> Availability:
        """Needs transformers and torch importable by this interpreter."""
        return modules_availability(("transformers", "torch"), _INSTALL_HINT)

    def plan(self, spec: EngineSpec, port: int, gpu_ids: list[int]) -> LaunchPlan:
        """`python -m sage.engines.transformers --model M ... --device cpu|cuda` + extra args."""
        check_kind(self.name, self.kinds, spec)
        check_single_device(self.name, spec)
        require(self.availability(), self.name)
        argv = [
            *python_module_argv("sage.engines.transformers"),
            "--model",
            spec.model,
            "--served-model-name",
            spec.model,
        ]
        for alias in spec.aliases:
            argv += ["--served-model-name", alias]
        argv += [
            "--host",
            spec.host,
            "--port",
            str(port),
            "--device",
            device_flag(gpu_ids),
        ]
        if spec.max_model_len > 0:
            argv += ["--max-model-len", str(spec.max_model_len)]
        if spec.max_concurrent_requests > 0:
            argv += ["--max-num-seqs", str(spec.max_concurrent_requests)]
        argv += list(spec.extra_args)
        return LaunchPlan(argv=argv, env=gpu_env(gpu_ids), health_path="/health")

    def gpu_memory_bytes(self, spec: EngineSpec) -> int:
        """What the engine will hold on its GPU: the weights in the dtype it serves (it loads
        them whole), one sequence's KV cache and the activations of a prefill at its context
        length (it serves one request at a time), and RUNTIME_HEADROOM_BYTES; 0 when
        `spec.model` is no local folder with safetensors weights (lifecycle then reserves
        its flat default)."""
        folder = Path(spec.model).expanduser()
        params = _safetensors_params(folder) if folder.is_dir() else 0
        if not params:
            return 0
        config = _read_config(folder / "config.json")
        per_value = _served_bytes(spec.extra_args)
        context = _context_bytes(config, spec.max_model_len, per_value)
        return params * per_value + context + RUNTIME_HEADROOM_BYTES


def _safetensors_params(folder: Path) -> int:
    """Parameters in the folder's *.safetensors files, from their headers (no tensor is read):
    exact whatever dtype they were saved in."""
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with path.open("rb") as file:
                (size,) = struct.unpack("<Q", file.read(8))
                header: dict[str, Any] = json.loads(file.read(size))
        except (OSError, ValueError, struct.error):
            return 0  # unreadable: no estimate rather than a wrong one
        total += sum(
            math.prod(entry.get("shape", ()))
            for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict)
        )
    return total


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _served_bytes(extra_args: tuple[str, ...]) -> int:
    """Bytes per value in the engine's dtype: `--dtype` from extra_args, else what the engine
    picks on a GPU (bfloat16, or float16 where bf16 is missing)."""
    dtype = "auto"
    for i, arg in enumerate(extra_args):
        if arg == "--dtype" and i + 1 < len(extra_args):
            dtype = extra_args[i + 1]
        elif arg.startswith("--dtype="):
            dtype = arg.partition("=")[2]
    return _DTYPE_BYTES.get(dtype, 2)


def _context_bytes(config: dict[str, Any], max_model_len: int, per_value: int) -> int:
    """What a full-length sequence adds (max_model_len, else the model's own length): its
    keys and values in every layer, and the prefill's largest live activations in one
    layer (the MLP's gate, up and product; residual, norm and q/k/v/o of hidden size).
    0 when config.json does not say the model's shape."""
    try:
        layers = int(config["num_hidden_layers"])
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        intermediate = int(config.get("intermediate_size") or 4 * hidden)
        length = int(max_model_len or config.get("max_position_embeddings") or 0)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return 0
    kv = 2 * layers * kv_heads * head_dim
    activations = 3 * intermediate + 6 * hidden
    return (kv + activations) * length * per_value
