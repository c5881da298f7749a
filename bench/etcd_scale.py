"""etcd mode at scale: 1k–10k engines across simulated nodes, as a scheduler replica sees them.

For each engine count N (nodes of --per-node engines each, every node under a lease of
its own, as node agents register):
1. register: N engine keys (common_pb2.Engine, the value lifecycle writes) + the node
   reports, --concurrency puts in flight; engines registered per second;
2. cold start of a replica: a PrefixMirror (what a scheduler runs) lists engines/ and
   decodes every Engine: seconds and the mirror's CPU;
3. update latency: --updates single-engine changes (an engine's state flipping, as a drain
   does), one at a time, each timed from just before the put to the mirror's callback:
   p50/p99/max, plus the mirror's CPU per update;
4. a node dies: its lease revoked (what its TTL running out does); time until the mirror
   has seen every one of its engines go;
5. etcd's own CPU seconds and RSS over the whole run (the member process).

A 3-member cluster on loopback by default (--members). Usage:
  python bench/etcd_scale.py [--engines 1000 5000 10000] [--per-node 32] [--updates 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

from sage.common.etcd import ClusterKeys, EtcdClient, PrefixMirror
from sage.common.etcd.testing import EtcdMembers, etcd_binary
from sage.rpc.common.v1 import common_pb2


def engine_value(engine_id: str, node_id: str, state: common_pb2.EngineState.ValueType) -> bytes:
    """A realistic Engine record (the size lifecycle writes)."""
    number = int(engine_id.rsplit("-", 1)[1])
    return common_pb2.Engine(
        engine_id=engine_id,
        model=f"org/model-{number % 8}",
        kind=common_pb2.ENGINE_KIND_LLM,
        base_url=f"http://10.0.{number // 250 % 250}.{number % 250}:{8000 + number % 1000}",
        backend="vllm",
        node_id=node_id,
        state=state,
        gpu_indexes=[number % 8],
        pid=10_000 + number,
        port=8000 + number % 1000,
        labels={"preset": "bench"},
        started_at=1.7e9,
    ).SerializeToString()


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def one_size(
    client: EtcdClient, keys: ClusterKeys, n: int, per_node: int, updates: int, conc: int
) -> dict[str, float]:
    """Steps 1–4 for N engines; keys are deleted afterwards."""
    nodes = max(1, n // per_node)
    leases = [await client.grant(60) for _ in range(nodes)]
    ready = common_pb2.ENGINE_STATE_READY
    draining = common_pb2.ENGINE_STATE_DRAINING
    sem = asyncio.Semaphore(conc)

    async def put(key: str, value: bytes, lease: int) -> None:
        async with sem:
            await client.put(key, value, lease=lease)

    t0 = time.perf_counter()
    jobs = []
    for node in range(nodes):
        node_id = f"node-{node:04d}"
        report = common_pb2.NodeReport(node_id=node_id, lifecycle_addr=f"{node_id}:50053")
        jobs.append(put(keys.node(node_id), report.SerializeToString(), leases[node]))
    for i in range(n):
        node = i % nodes
        engine_id = f"e-{i:05d}"
        jobs.append(
            put(
                keys.engine(engine_id),
                engine_value(engine_id, f"node-{node:04d}", ready),
                leases[node],
            )
        )
    await asyncio.gather(*jobs)
    register_s = time.perf_counter() - t0

    seen: dict[str, float] = {}
    gone: set[str] = set()
    changed = asyncio.Event()

    def on_put(name: str, value: bytes) -> None:
        common_pb2.Engine.FromString(value)  # what the scheduler does with it
        seen[name] = time.perf_counter()
        changed.set()

    def on_delete(name: str, _value: bytes) -> None:
        gone.add(name)
        changed.set()

    mirror = PrefixMirror(client, keys.engines, on_put=on_put, on_delete=on_delete)
    cpu0, t0 = time.process_time(), time.perf_counter()
    await mirror.start()
    list_s, list_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    assert len(mirror.items) == n, (len(mirror.items), n)

    lat: list[float] = []
    cpu0 = time.process_time()
    for u in range(updates):
        i = (u * 7919) % n
        engine_id, node = f"e-{i:05d}", i % nodes
        value = engine_value(engine_id, f"node-{node:04d}", draining if u % 2 == 0 else ready)
        start = time.perf_counter()
        await client.put(keys.engine(engine_id), value, lease=leases[node])
        while seen.get(engine_id, 0.0) < start:
            changed.clear()
            await changed.wait()
        lat.append((seen[engine_id] - start) * 1000)
    update_cpu_ms = (time.process_time() - cpu0) * 1000 / max(1, updates)

    victim = nodes - 1
    victims = {f"e-{i:05d}" for i in range(n) if i % nodes == victim}
    t0 = time.perf_counter()
    await client.revoke(leases[victim])
    while not victims <= gone:
        changed.clear()
        await changed.wait()
    expire_ms = (time.perf_counter() - t0) * 1000

    await mirror.close()
    for lease in leases[:victim]:
        await client.revoke(lease)
    return {
        "engines": n,
        "nodes": nodes,
        "register_s": round(register_s, 2),
        "register_per_s": round(n / register_s),
        "cold_list_s": round(list_s, 3),
        "cold_list_cpu_s": round(list_cpu, 3),
        "update_p50_ms": round(statistics.median(lat), 2),
        "update_p99_ms": round(pct(lat, 99), 2),
        "update_max_ms": round(max(lat), 2),
        "update_cpu_ms": round(update_cpu_ms, 3),
        "node_loss_ms": round(expire_ms, 1),
        "node_loss_engines": len(victims),
    }


async def run(args: argparse.Namespace) -> list[dict[str, float]]:
    """Every size against one cluster."""
    with tempfile.TemporaryDirectory(prefix="sage-etcd-bench-") as tmp:
        members = EtcdMembers(Path(tmp), hosts=["127.0.0.1"] * args.members)
        members.start()
        try:
            members.wait_healthy()
            procs = [psutil.Process(m.proc.pid) for m in members.members if m.proc is not None]
            client = EtcdClient(members.endpoints)
            keys = ClusterKeys("/bench")
            rows = []
            for n in args.engines:
                cpu0 = sum(p.cpu_times().user + p.cpu_times().system for p in procs)
                row = await one_size(client, keys, n, args.per_node, args.updates, args.concurrency)
                cpu1 = sum(p.cpu_times().user + p.cpu_times().system for p in procs)
                row["etcd_cpu_s"] = round(cpu1 - cpu0, 2)
                row["etcd_rss_mib"] = round(sum(p.memory_info().rss for p in procs) / 2**20)
                print(json.dumps(row), flush=True)
                rows.append(row)
            await client.close()
            return rows
        finally:
            members.stop()


def main() -> int:
    """Parse, run, print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument("--per-node", type=int, default=32)
    parser.add_argument("--updates", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--members", type=int, default=3)
    args = parser.parse_args()
    if etcd_binary() is None:
        print("etcd is not installed (scripts/install_system_tools.sh)", file=sys.stderr)
        return 2
    rows = asyncio.run(run(args))
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
