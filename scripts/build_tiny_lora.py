"""Build a tiny random LoRA adapter (PEFT layout) for the tiny Llama of build_tiny_llama.py.

LoRA tests need an adapter without a hub download or peft: this writes adapter_config.json and
adapter_model.safetensors directly (rank 8, q_proj and v_proj of every layer). lora_B is not
zero (PEFT's initialisation would make the adapter a no-op), so greedy output with the adapter
differs from the base model's: a test can tell that the adapter was applied.

    python scripts/build_tiny_lora.py OUT_DIR [--base MODEL_DIR] [--seed 1] [--rank 8]

Needs torch and safetensors (vLLM's venv and the project's have both).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# The tiny Llama's shapes (scripts/build_tiny_llama.py): hidden 128, 2 layers, 2 kv heads x 64.
HIDDEN = 128
LAYERS = 2
TARGETS = ("q_proj", "v_proj")


def build(out: Path, base: str = "", seed: int = 1, rank: int = 8) -> Path:
    """Write the adapter to `out` (created if missing); returns `out`."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(LAYERS):
        for target in TARGETS:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, HIDDEN, generator=generator)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(HIDDEN, rank, generator=generator)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": list(TARGETS),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: build into OUT_DIR and print what was written."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write (created if missing)")
    parser.add_argument("--base", default="", help="base model path, for adapter_config.json")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)
    out = build(args.out, args.base, args.seed, args.rank)
    print(f"built {out}: {sorted(p.name for p in out.iterdir())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
