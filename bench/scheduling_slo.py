"""SLO attainment under bursty mixed load: our policies vs round-robin vs vllm-router.

Four simulator engines of different speeds (few batch slots each, so queues form) serve one
seeded trace: bursts of chat requests from two tenants (one heavy) in two priority classes,
each with an end-to-end SLO, mixed with embedding requests (served by a sim embedding engine:
through our embedding service for us; straight to the engine for vllm-router, which has one
worker pool). Every configuration replays the same trace against the same engines in this
one run. A request meets its SLO when it completes within its deadline; goodput is
SLO-meeting requests per second.

Scenarios: `bursty` alternates 5 s at 8 req/s and 5 s at 40 req/s (bursts just above
capacity); `overload` alternates 5 s at 12 req/s and 5 s at 80 req/s (bursts ~2.5x capacity).

Every scenario runs for several seeds (default 7, 23, 41: each its own trace, replayed by
every configuration) and the tables give each configuration's mean and spread (min–max)
over the seeds. "ours: defaults" is the stack with nothing set (no policy, routing or
in-flight cap chosen: what `sage llm serve` runs); the other rows of ours set only the
policy and routing, so admission caps engines at their measured concurrency in all of them.

Usage: python bench/scheduling_slo.py [--scenarios bursty,overload] [--seeds 7,23,41]
       [--requests 300] [--configs defaults,fifo+round_robin,...] [--inflight N]
       [--vllm-router /path/to/vllm-router] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen

import aiohttp
import grpc

from sage.common.grpc import create_sync_channel
from sage.common.security import new_secret
from sage.common.utils.processes import free_port, stop_process, wait_http
from sage.rpc.common.v1 import common_pb2
from sage.rpc.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

ENGINE_TPOT_MS = (8, 12, 20, 32)  # four engines of different speeds
SLOTS = 4  # batch slots per engine (sim --max-num-seqs)


SCENARIOS = {"bursty": (8.0, 40.0), "overload": (12.0, 80.0)}  # calm, burst req/s
EMBED_SHARE = 0.15  # of arrivals are embedding requests (4 inputs, SLO 500 ms)


@dataclass(frozen=True)
class TraceItem:
    at: float  # seconds from start
    tenant: str
    priority: str
    max_tokens: int
    slo_ms: int
    kind: str = "chat"


def make_trace(
    n: int,
    seed: int = 7,
    scenario: str = "bursty",
    *,
    rates: tuple[float, float] | None = None,
    embed_share: float = EMBED_SHARE,
    slo_ms: tuple[int, int] = (1500, 6000),
) -> list[TraceItem]:
    """Bursty arrivals: 5 s calm then 5 s burst, repeating; a share are embeddings.
    `rates` (calm, burst req/s) and `slo_ms` (high, low) rescale the trace for slower
    engines (bench/real_vllm.py); one seed gives the same draws whatever they are."""
    calm, burst = rates or SCENARIOS[scenario]
    rng = random.Random(seed)
    items: list[TraceItem] = []
    t = 0.0
    while len(items) < n:
        rate = burst if int(t // 5) % 2 else calm
        t += rng.expovariate(rate)
        tenant = "heavy" if rng.random() < 0.75 else "light"
        if rng.random() < embed_share:
            items.append(TraceItem(t, tenant, "high", 0, 500, kind="embedding"))
            continue
        high = rng.random() < 0.25
        items.append(
            TraceItem(
                at=t,
                tenant=tenant,
                priority="high" if high else "low",
                max_tokens=rng.randint(8, 48),
                slo_ms=slo_ms[0] if high else slo_ms[1],
            )
        )
    return items


@dataclass
class Outcome:
    ok: bool
    e2e_ms: float
    ttft_ms: float
    item: TraceItem


async def replay(
    url: str, embed_url: str, trace: list[TraceItem], keys: dict[str, str], model: str = "sim"
) -> list[Outcome]:
    """Send every request at its trace time (chat streamed, to measure TTFT)."""
    timeout = aiohttp.ClientTimeout(total=120)
    # No pool cap: each trace request is its own user (aiohttp caps a session at 100).
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        start = time.perf_counter()

        async def one(item: TraceItem) -> Outcome:
            await asyncio.sleep(max(0.0, item.at - (time.perf_counter() - start)))
            sent = time.perf_counter()
            headers = {"x-sage-priority": item.priority, "x-sage-slo-e2e-ms": str(item.slo_ms)}
            if keys:
                headers["authorization"] = f"Bearer {keys[item.tenant]}"
            if item.kind == "embedding":
                texts = [f"{item.tenant} passage {i}" for i in range(4)]
                payload = {"model": "sim-embed", "input": texts}
                try:
                    async with session.post(embed_url, json=payload, headers=headers) as resp:
                        await resp.read()
                        ok = resp.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                e2e = (time.perf_counter() - sent) * 1e3
                return Outcome(ok, e2e, e2e if ok else 0.0, item)
            body = {
                "model": model,
                "stream": True,
                "max_tokens": item.max_tokens,
                "messages": [{"role": "user", "content": f"{item.tenant} request"}],
            }
            ttft = 0.0
            try:
                async with session.post(url, json=body, headers=headers) as resp:
                    if resp.status != 200:
                        await resp.read()
                        return Outcome(False, (time.perf_counter() - sent) * 1e3, 0.0, item)
                    async for _ in resp.content.iter_any():
                        if not ttft:
                            ttft = (time.perf_counter() - sent) * 1e3
            except (aiohttp.ClientError, TimeoutError):
                return Outcome(False, (time.perf_counter() - sent) * 1e3, 0.0, item)
            return Outcome(True, (time.perf_counter() - sent) * 1e3, ttft, item)

        return list(await asyncio.gather(*(one(i) for i in trace)))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass(frozen=True)
class Score:
    """One configuration's run over one trace."""

    slo_met: float  # % of all requests (chat and embedding) within their SLO
    high_met: float  # % of high-priority chat requests
    light_met: float  # % of the light tenant's chat requests
    ttft_p50: float
    ttft_p99: float
    embeds_met: float | None
    goodput: float  # SLO-meeting requests per second
    failed: int  # chat requests that got no reply


def score(outcomes: list[Outcome], duration_s: float) -> Score:
    met = [o for o in outcomes if o.ok and o.e2e_ms <= o.item.slo_ms]
    embeds = [o for o in outcomes if o.item.kind == "embedding"]
    embeds_met = [o for o in embeds if o.ok and o.e2e_ms <= o.item.slo_ms]
    chats = [o for o in outcomes if o.item.kind == "chat"]
    high = [o for o in chats if o.item.priority == "high"]
    high_met = [o for o in high if o.ok and o.e2e_ms <= o.item.slo_ms]
    light = [o for o in chats if o.item.tenant == "light"]
    light_met = [o for o in light if o.ok and o.e2e_ms <= o.item.slo_ms]
    ttfts = [o.ttft_ms for o in chats if o.ok]
    return Score(
        slo_met=100 * len(met) / max(1, len(outcomes)),
        high_met=100 * len(high_met) / max(1, len(high)),
        light_met=100 * len(light_met) / max(1, len(light)),
        ttft_p50=pct(ttfts, 0.5),
        ttft_p99=pct(ttfts, 0.99),
        embeds_met=100 * len(embeds_met) / len(embeds) if embeds else None,
        goodput=len(met) / duration_s,
        failed=sum(not o.ok for o in chats),
    )


def summarise(name: str, outcomes: list[Outcome], duration_s: float) -> str:
    """One table row for one run."""
    s = score(outcomes, duration_s)
    embeds_cell = f"{s.embeds_met:.1f}%" if s.embeds_met is not None else "—"
    return (
        f"| {name} | {s.slo_met:.1f}% | {s.high_met:.1f}% | {s.light_met:.1f}% | "
        f"{s.ttft_p50:.0f} | {s.ttft_p99:.0f} | {embeds_cell} | {s.goodput:.1f} | {s.failed} |"
    )


SEEDS_HEADER = (
    "| configuration | SLO met, mean | spread (min–max) | per seed | high-priority chat met | "
    "light tenant chat met | TTFT p50 ms | TTFT p99 ms | goodput req/s | failed chat |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def seeds_row(name: str, scores: list[Score]) -> str:
    """One configuration over several seeds: means, and the spread of SLO met."""
    met = [s.slo_met for s in scores]

    def mean(values: list[float]) -> float:
        return statistics.fmean(values)

    return (
        f"| {name} | **{mean(met):.1f}%** | {min(met):.1f}–{max(met):.1f} | "
        f"{' / '.join(f'{m:.1f}' for m in met)} | {mean([s.high_met for s in scores]):.1f}% | "
        f"{mean([s.light_met for s in scores]):.1f}% | "
        f"{mean([s.ttft_p50 for s in scores]):.0f} | {mean([s.ttft_p99 for s in scores]):.0f} | "
        f"{mean([s.goodput for s in scores]):.1f} | {sum(s.failed for s in scores)} |"
    )


def verdict(means: dict[str, float], scenario: str) -> list[str]:
    """The targets of the default-policy issue, checked on these means."""
    vr = {k.removeprefix("vllm-router: "): v for k, v in means.items() if k.startswith("vllm-")}
    ours = {k.removeprefix("ours: "): v for k, v in means.items() if k.startswith("ours: ")}
    lines: list[str] = []
    if vr and "defaults" in ours:
        best = max(vr.values())
        need = best + (15 if scenario == "overload" else 0)
        lines.append(
            f"defaults {ours['defaults']:.1f} vs vllm-router best {best:.1f} "
            f"({ours['defaults'] - best:+.1f} points; target ≥ {need:.1f}): "
            + ("met" if ours["defaults"] >= need else "NOT met")
        )
    pairs = (
        ("round_robin", "round_robin"),
        ("power_of_two", "power_of_two"),
        ("prefix_aware", "cache_aware"),
    )
    for routing, peer in pairs:
        mine = {k: v for k, v in ours.items() if k.endswith(f"+ {routing}")}
        if peer in vr and mine:
            worst = min(mine, key=lambda k: mine[k])
            lines.append(
                f"ours {worst} (lowest with {routing}) {mine[worst]:.1f} vs vllm-router "
                f"{peer} {vr[peer]:.1f}: " + ("met" if mine[worst] >= vr[peer] else "NOT met")
            )
    return lines


def start_ours(
    env: dict[str, str],
    engines: list[str],
    embed_engine: str,
    policy: str,
    routing: str,
    keys: dict[str, str],
    model: str = "sim",
    slots: int = SLOTS,
) -> tuple[list[subprocess.Popen[bytes]], str]:
    """Scheduler, embedding service and edge with `policy` + `routing` (empty: the
    default) and at most `slots` in flight per engine (-1: the default, each engine's
    measured concurrency), the chat engines (`model`) and the embedding engine (if any)
    registered; the gateway's /v1 URL."""
    ports = {n: free_port() for n in ("sched", "edge", "emb", "life", "gpu")}
    run_env = {
        **env,
        "SAGE_SCHEDULER_PORT": str(ports["sched"]),
        "SAGE_GATEWAY_PORT": str(ports["edge"]),
        "SAGE_EMBEDDING_SERVICE_PORT": str(ports["emb"]),
        "SAGE_LIFECYCLE_PORT": str(ports["life"]),
        "SAGE_GPU_MANAGER_PORT": str(ports["gpu"]),
        "SAGE_API_KEYS": ",".join(f"{k}:{t}" for t, k in keys.items()),
        "SAGE_INTERNAL_TOKEN": new_secret(),  # the stack's gRPC credential
    }
    for name in ("POLICY", "ROUTING", "MAX_INFLIGHT_PER_ENGINE"):
        run_env.pop(f"SAGE_SCHEDULER_{name}", None)  # the defaults unless set below
    if policy:
        run_env["SAGE_SCHEDULER_POLICY"] = policy
    if routing:
        run_env["SAGE_SCHEDULER_ROUTING"] = routing
    if slots >= 0:
        run_env["SAGE_SCHEDULER_MAX_INFLIGHT_PER_ENGINE"] = str(slots)
    procs = [
        subprocess.Popen([sys.executable, "-m", f"sage.services.{s}"], env=run_env)
        for s in ("scheduler", "embedding", "edge")
    ]
    with create_sync_channel(
        f"127.0.0.1:{ports['sched']}", internal_token=run_env["SAGE_INTERNAL_TOKEN"]
    ) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        for i, url in enumerate(engines):
            stub.RegisterEngine(
                scheduler_pb2.RegisterEngineRequest(
                    engine=common_pb2.Engine(
                        engine_id=f"{model}-{i}",
                        model=model,
                        kind=common_pb2.ENGINE_KIND_LLM,
                        base_url=url,
                    )
                ),
                timeout=10,
            )
        if embed_engine:
            stub.RegisterEngine(
                scheduler_pb2.RegisterEngineRequest(
                    engine=common_pb2.Engine(
                        engine_id="sim-embed",
                        model="sim-embed",
                        kind=common_pb2.ENGINE_KIND_EMBEDDING,
                        base_url=embed_engine,
                    )
                ),
                timeout=10,
            )
    gateway = f"http://127.0.0.1:{ports['edge']}"
    wait_http(gateway + "/health")
    return procs, gateway + "/v1"


def start_sim(
    env: dict[str, str], model: str, tpot_ms: float, slots: int, embedding_dim: int = 0
) -> tuple[str, Popen[bytes]]:
    port = free_port()
    extra = ["--embedding-dim", str(embedding_dim)] if embedding_dim else []
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sage.engines.sim",
            "--model",
            model,
            "--port",
            str(port),
            "--ttft-ms",
            "40",
            "--tpot-ms",
            str(tpot_ms),
            "--max-num-seqs",
            str(slots),
            "--batch-slowdown",
            "0.1",
            "--log-level",
            "WARNING",
            *extra,
        ],
        env=env,
    )
    return f"http://127.0.0.1:{port}", proc


CONFIGS = (
    ("", ""),  # defaults
    ("fifo", "round_robin"),
    ("fifo", "least_loaded"),
    ("fifo", "power_of_two"),
    ("fifo", "prefix_aware"),
    ("priority", "least_loaded"),
    ("fair", "least_loaded"),
    ("slo_aware", "least_loaded"),
    ("slo_aware_shed", "least_loaded"),
    ("cost_optimized", "least_loaded"),
    ("adaptive", "least_loaded"),
    ("hybrid", "least_loaded"),
)
VLLM_ROUTER_POLICIES = ("round_robin", "power_of_two", "cache_aware")


async def warm_up(engines: list[str], per_engine: int = 8) -> None:
    """A few chats straight to every engine, all at once."""
    body = {"model": "sim", "max_tokens": 8, "messages": [{"role": "user", "content": "warm"}]}
    async with aiohttp.ClientSession() as session:

        async def one(url: str) -> None:
            async with session.post(url + "/v1/chat/completions", json=body) as resp:
                await resp.read()

        await asyncio.gather(*(one(url) for url in engines for _ in range(per_engine)))


def parse_configs(text: str) -> list[tuple[str, str]]:
    """`defaults,fifo+round_robin,...` -> [("", ""), ("fifo", "round_robin"), ...]."""
    if not text:
        return list(CONFIGS)
    out: list[tuple[str, str]] = []
    for item in text.split(","):
        if item == "defaults":
            out.append(("", ""))
        else:
            policy, _, routing = item.partition("+")
            out.append((policy, routing))
    return out


def config_name(policy: str, routing: str) -> str:
    return f"ours: {policy} + {routing}" if policy or routing else "ours: defaults"


def run_vllm_router(
    binary: str, policy: str, engines: list[str], embed_engine: str, trace: list[TraceItem]
) -> list[Outcome]:
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--worker-urls",
            *engines,
            "--policy",
            policy,
            "--port",
            str(port),
            "--prometheus-port",
            str(free_port()),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, timeout=60)
        return asyncio.run(
            replay(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                embed_engine + "/v1/embeddings",
                trace,
                {},
            )
        )
    finally:
        stop_process(proc)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--scenarios", default="bursty,overload")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), help="one scenario only")
    parser.add_argument("--seeds", default="7,23,41")
    parser.add_argument("--seed", type=int, help="one seed only")
    parser.add_argument("--vllm-router", default=shutil.which("vllm-router") or "")
    parser.add_argument(
        "--configs",
        default="",
        help="comma-separated policy+routing pairs or `defaults` (default: all), "
        "e.g. defaults,fifo+round_robin",
    )
    parser.add_argument(
        "--inflight",
        type=int,
        default=-1,
        help="per-engine cap for the named configurations (-1: the default, measured)",
    )
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables")
    args = parser.parse_args()
    configs = parse_configs(args.configs)
    scenarios = [args.scenario] if args.scenario else args.scenarios.split(",")
    seeds = [args.seed] if args.seed is not None else [int(x) for x in args.seeds.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="sage-slo-"))
    env = {**os.environ, "SAGE_HOME": str(tmp), "SAGE_LOG_LEVEL": "WARNING"}
    started = [start_sim(env, "sim", tpot, SLOTS) for tpot in ENGINE_TPOT_MS]
    engines = [url for url, _ in started]
    embed_engine, embed_proc = start_sim(env, "sim-embed", 1, 32, embedding_dim=384)
    engine_procs = [proc for _, proc in started] + [embed_proc]
    keys = {"heavy": "key-heavy", "light": "key-light"}
    tables: list[str] = []
    try:
        for url, proc in [*started, (embed_engine, embed_proc)]:
            wait_http(url + "/health", proc)
        asyncio.run(warm_up(engines))  # the first configuration must not pay for cold engines
        for scenario in scenarios:
            scores: dict[str, list[Score]] = {}
            described = ""
            for seed in seeds:
                trace = make_trace(args.requests, seed, scenario)
                duration = trace[-1].at
                chats = sum(i.kind == "chat" for i in trace)
                described += (
                    f" seed {seed}: {chats} chat + {len(trace) - chats} embedding"
                    f" over {duration:.1f} s;"
                )
                for policy, routing in configs:
                    named = bool(policy or routing)
                    procs, base = start_ours(
                        env,
                        engines,
                        embed_engine,
                        policy,
                        routing,
                        keys,
                        slots=args.inflight if named else -1,
                    )
                    try:
                        outcomes = asyncio.run(
                            replay(base + "/chat/completions", base + "/embeddings", trace, keys)
                        )
                    finally:
                        for p in procs:
                            stop_process(p)
                    name = config_name(policy, routing)
                    scores.setdefault(name, []).append(score(outcomes, duration))
                    print(scenario, seed, summarise(name, outcomes, duration), flush=True)
                for policy in VLLM_ROUTER_POLICIES if args.vllm_router else ():
                    outcomes = run_vllm_router(
                        args.vllm_router, policy, engines, embed_engine, trace
                    )
                    name = f"vllm-router: {policy}"
                    scores.setdefault(name, []).append(score(outcomes, duration))
                    print(scenario, seed, summarise(name, outcomes, duration), flush=True)
            means = {k: statistics.fmean(s.slo_met for s in v) for k, v in scores.items()}
            cap = (
                f"at most {args.inflight} in flight per engine"
                if args.inflight >= 0
                else ("each engine's measured concurrency")
            )
            tables.append(
                "\n".join(
                    [
                        f"scenario {scenario}, {args.requests} requests per seed;{described} "
                        f"engines tpot {ENGINE_TPOT_MS} ms, {SLOTS} slots each; SLO 1.5 s "
                        f"(high) / 6 s (low) / 0.5 s (embedding); admission cap of the named "
                        f"configurations: {cap}",
                        "",
                        SEEDS_HEADER,
                        *(seeds_row(k, v) for k, v in scores.items()),
                        "",
                        *(f"- {line}" for line in verdict(means, scenario)),
                    ]
                )
            )
            print("\n" + tables[-1] + "\n", flush=True)
    finally:
        for proc in engine_procs:
            stop_process(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    text = "\n\n".join(tables)
    print("\n" + text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
