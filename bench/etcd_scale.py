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

Part 2 (--scheduler): the services themselves. For each N, a fresh scheduler process and
edge in etcd mode (SAGE_ETCD_ENDPOINTS, a prefix of its own) and one zero-latency sim that
every engine key points at (one process stands in for N engines, as in bench/scaling.py):
N engine keys across nodes put while the scheduler watches, then seconds until GetStatus
shows all N (and the scheduler's CPU for it); a second replica started then (its cold start:
process start + listing N); the scheduler's, edge's and sim's idle CPU (ms/s, mostly the
load scraper reading engines' /metrics, at most SAGE_SCHEDULER_SCRAPE_BUDGET engines a
second); put-to-routed: a new engine key for a model only it serves, timed from just before
the put until a chat for that model through the edge answers 200 (polled over one
keep-alive connection: the figure includes one edge round trip); then wrk through the edge
(req/s, p50/p99, scheduler and edge CPU per request).

Part 3 (--registry): one engine change in EngineRegistry at N engines, in process.

A 3-member cluster on loopback by default (--members). Usage:
  python bench/etcd_scale.py [--engines 1000 5000 10000] [--per-node 32] [--updates 300]
  python bench/etcd_scale.py --scheduler [--members 1] [--idle 5] [--duration 5]
      [--connections 16] [--routing least_loaded] [--env NAME=VALUE ...]
  python bench/etcd_scale.py --registry [--engines ...] [--updates 300]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
from _stack import PY, Stack, chat_lua, require_wrk, run_wrk, stack

from sage.common.etcd import ClusterKeys, EtcdClient, PrefixMirror
from sage.common.etcd.testing import EtcdMembers, etcd_binary
from sage.common.grpc import create_sync_channel
from sage.common.utils.processes import free_port
from sage.rpc.common.v1 import common_pb2
from sage.rpc.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc


def engine_value(
    engine_id: str,
    node_id: str,
    state: common_pb2.EngineState.ValueType,
    *,
    base_url: str = "",
    model: str = "",
    backend: str = "vllm",
) -> bytes:
    """A realistic Engine record (the size lifecycle writes); `base_url`/`model` point it at
    a real engine (part 2), else at a made-up address."""
    number = int(engine_id.rsplit("-", 1)[1])
    return common_pb2.Engine(
        engine_id=engine_id,
        model=model or f"org/model-{number % 8}",
        kind=common_pb2.ENGINE_KIND_LLM,
        base_url=base_url
        or f"http://10.0.{number // 250 % 250}.{number % 250}:{8000 + number % 1000}",
        backend=backend,
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


# -- part 2: a scheduler process and an edge in etcd mode ----------------------------------

CHAT = json.dumps(
    {"model": "sim", "max_tokens": 16, "messages": [{"role": "user", "content": "hello"}]}
)
PROBES = 12  # put-to-routed samples per size (each a model only the probe engine serves)


def sched_status(st: Stack, port: str) -> scheduler_pb2.GetStatusResponse:
    """GetStatus of the scheduler on `port` (a fresh channel: polled a few times a second)."""
    with create_sync_channel(
        f"127.0.0.1:{port}", internal_token=st.env["SAGE_INTERNAL_TOKEN"]
    ) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        reply: scheduler_pb2.GetStatusResponse = stub.GetStatus(
            scheduler_pb2.GetStatusRequest(), timeout=30, wait_for_ready=True
        )
        return reply


def wait_engines(st: Stack, port: str, n: int, timeout: float) -> float:
    """Seconds until the scheduler on `port` has synced and holds `n` engines (polled every
    50 ms); raises TimeoutError past `timeout`."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        reply = sched_status(st, port)
        if reply.synced and reply.engines_total == n:
            return time.perf_counter() - t0
        time.sleep(0.05)
    raise TimeoutError(f"scheduler on {port} did not reach {n} engines in {timeout:g}s")


def poll_routed(edge: str, model: str, timeout: float = 30.0) -> float:
    """perf_counter when a chat for `model` through the edge first answers 200 (404 until
    the scheduler routes it), polled over one keep-alive connection."""
    host, port = edge.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    body = json.dumps(
        {"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]}
    )
    deadline = time.perf_counter() + timeout
    try:
        while time.perf_counter() < deadline:
            conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            reply = conn.getresponse()
            reply.read()
            if reply.status == 200:
                return time.perf_counter()
            time.sleep(0.001)
    finally:
        conn.close()
    raise TimeoutError(f"{model} was not routed within {timeout:g}s")


def cpu_rate(st: Stack, names: tuple[str, ...], seconds: float) -> dict[str, float]:
    """CPU ms per second of each of `names` over `seconds` of no traffic."""
    before = {n: st.cpu_s(n) for n in names}
    time.sleep(seconds)
    return {n: round((st.cpu_s(n) - before[n]) * 1000 / seconds, 1) for n in names}


async def scheduler_size(
    members: EtcdMembers, n: int, args: argparse.Namespace, extra_env: dict[str, str]
) -> dict[str, float]:
    """Part 2 for N engines: a fresh scheduler + edge over a fresh prefix, N engine keys
    put while they run, then cold start, idle CPU, put-to-routed and wrk."""
    prefix = f"/bench2-{n}-{time.monotonic_ns()}"
    env = {
        "SAGE_ETCD_ENDPOINTS": members.endpoints,
        "SAGE_ETCD_PREFIX": prefix,
        "SAGE_ADVERTISE_HOST": "127.0.0.1",
        "SAGE_SCHEDULER_ROUTING": args.routing,
        **extra_env,
    }
    client = EtcdClient(members.endpoints)
    keys = ClusterKeys(prefix)
    row: dict[str, float] = {"engines": n}
    with stack(env) as st:
        probe_names = [f"probe-{i}" for i in range(PROBES)]
        sim = st.sim("engine", "--served-model-name", *probe_names)
        sched_port = st.env["SAGE_SCHEDULER_PORT"]
        t0 = time.perf_counter()
        try:
            st.plane()
        except RuntimeError:
            for name in ("scheduler", "edge"):
                print(f"--- {name}.log", (st.tmp / f"{name}.log").read_text()[-2000:])
            raise
        wait_engines(st, sched_port, 0, 60)
        row["start_empty_s"] = round(time.perf_counter() - t0, 2)

        nodes = max(1, n // args.per_node)
        leases = [await client.grant(3600) for _ in range(nodes)]
        sem = asyncio.Semaphore(args.concurrency)

        async def put(key: str, value: bytes, lease: int) -> None:
            async with sem:
                await client.put(key, value, lease=lease)

        ready = common_pb2.ENGINE_STATE_READY
        await asyncio.gather(
            *(
                put(
                    keys.node(f"node-{i:04d}"),
                    common_pb2.NodeReport(
                        node_id=f"node-{i:04d}", lifecycle_addr="127.0.0.1:1"
                    ).SerializeToString(),
                    leases[i],
                )
                for i in range(nodes)
            )
        )
        cpu0 = st.cpu_s("scheduler")
        t0 = time.perf_counter()
        await asyncio.gather(
            *(
                put(
                    keys.engine(f"e-{i:05d}"),
                    engine_value(
                        f"e-{i:05d}",
                        f"node-{i % nodes:04d}",
                        ready,
                        base_url=sim,
                        model="sim",
                        backend="sim",
                    ),
                    leases[i % nodes],
                )
                for i in range(n)
            )
        )
        row["put_s"] = round(time.perf_counter() - t0, 2)
        synced = await asyncio.to_thread(wait_engines, st, sched_port, n, args.sync_timeout)
        row["live_sync_s"] = round(time.perf_counter() - t0, 2)
        row["live_sync_cpu_s"] = round(st.cpu_s("scheduler") - cpu0, 2)
        del synced

        # A second replica started now lists all N at once (what a restart does).
        cold_port = str(free_port())
        cold_env = {**st.env, "SAGE_SCHEDULER_PORT": cold_port}
        t0 = time.perf_counter()
        st.start("scheduler-cold", [PY, "-m", "sage.services.scheduler"], env=cold_env)
        await asyncio.to_thread(wait_engines, st, cold_port, n, args.sync_timeout)
        row["cold_start_s"] = round(time.perf_counter() - t0, 2)
        st.stop("scheduler-cold")

        await asyncio.sleep(2)  # settle: the first scrapes of every engine are under way
        idle = await asyncio.to_thread(cpu_rate, st, ("scheduler", "edge", "engine"), args.idle)
        row["sched_idle_ms_s"] = idle["scheduler"]
        row["edge_idle_ms_s"] = idle["edge"]
        row["sim_idle_ms_s"] = idle["engine"]

        lat: list[float] = []
        for i, model in enumerate(probe_names):
            engine_id = f"p-{i:05d}"
            value = engine_value(
                engine_id, "node-0000", ready, base_url=sim, model=model, backend="sim"
            )
            start = time.perf_counter()
            await client.put(keys.engine(engine_id), value, lease=leases[0])
            routed = await asyncio.to_thread(poll_routed, st.urls["edge"], model)
            lat.append((routed - start) * 1000)
            await client.delete(keys.engine(engine_id))
            await asyncio.sleep(0.2)
        row["routed_p50_ms"] = round(statistics.median(lat), 1)
        row["routed_max_ms"] = round(max(lat), 1)

        script = st.tmp / "chat.lua"
        script.write_text(chat_lua(CHAT))
        await asyncio.to_thread(run_wrk, st.urls["edge"] + "/v1/chat/completions", script, 1, 4)
        before = {name: st.cpu_s(name) for name in ("scheduler", "edge")}
        r = await asyncio.to_thread(
            run_wrk,
            st.urls["edge"] + "/v1/chat/completions",
            script,
            args.duration,
            args.connections,
        )
        done = max(r["requests"], 1.0)
        row["rps"] = round(r["rps"])
        row["p50_ms"] = round(r["p50_ms"], 2)
        row["p99_ms"] = round(r["p99_ms"], 2)
        row["sched_ms_req"] = round((st.cpu_s("scheduler") - before["scheduler"]) * 1000 / done, 3)
        row["edge_ms_req"] = round((st.cpu_s("edge") - before["edge"]) * 1000 / done, 3)
        row["errors"] = r["errors"]
        row["sched_rss_mib"] = round(st.rss_mib("scheduler"))
        for lease in leases:
            await client.revoke(lease)
    await client.close()
    return row


async def run_scheduler(args: argparse.Namespace) -> list[dict[str, float]]:
    """Part 2 for every size against one etcd cluster."""
    extra = dict(kv.split("=", 1) for kv in args.env)
    with tempfile.TemporaryDirectory(prefix="sage-etcd-bench-") as tmp:
        members = EtcdMembers(Path(tmp), hosts=["127.0.0.1"] * args.members)
        members.start()
        try:
            members.wait_healthy()
            rows = []
            for n in args.engines:
                row = await scheduler_size(members, n, args, extra)
                print(json.dumps(row), flush=True)
                rows.append(row)
            return rows
        finally:
            members.stop()


# -- part 3: one engine change in the scheduler's registry, in process ---------------------


def registry_sizes(sizes: list[int], changes: int) -> list[dict[str, float]]:
    """What one engines/ put costs EngineRegistry at N engines of one model (a state flip,
    an engine added, one removed), timed in process: the part of put-to-routed that grows
    with N."""
    from sage.services.scheduler.registry import (
        EngineKind,
        EngineRecord,
        EngineRegistry,
        EngineState,
    )

    def record(i: int, state: EngineState = EngineState.READY) -> EngineRecord:
        return EngineRecord(f"e-{i:05d}", "sim", EngineKind.LLM, "http://127.0.0.1:9", state=state)

    rows = []
    for n in sizes:
        registry = EngineRegistry()
        registry.register_many(record(i) for i in range(n))
        flips, adds, removes = [], [], []
        for u in range(changes):
            state = EngineState.DRAINING if u % 2 == 0 else EngineState.READY
            t0 = time.perf_counter()
            registry.register(record((u * 7919) % n, state))
            t1 = time.perf_counter()
            registry.register(record(n + u))
            t2 = time.perf_counter()
            registry.deregister(f"e-{n + u:05d}")
            t3 = time.perf_counter()
            flips.append((t1 - t0) * 1000)
            adds.append((t2 - t1) * 1000)
            removes.append((t3 - t2) * 1000)
        rows.append(
            {
                "engines": n,
                "flip_p50_ms": round(statistics.median(flips), 3),
                "add_p50_ms": round(statistics.median(adds), 3),
                "remove_p50_ms": round(statistics.median(removes), 3),
                "flip_p99_ms": round(pct(flips, 99), 3),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> int:
    """Parse, run, print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument("--per-node", type=int, default=32)
    parser.add_argument("--updates", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument(
        "--scheduler", action="store_true", help="part 2: a scheduler + edge in etcd mode"
    )
    parser.add_argument("--routing", default="least_loaded", help="part 2's routing")
    parser.add_argument("--idle", type=float, default=5.0, help="part 2's idle seconds")
    parser.add_argument("--duration", type=float, default=5.0, help="part 2's wrk seconds")
    parser.add_argument("--connections", type=int, default=16, help="part 2's wrk connections")
    parser.add_argument("--sync-timeout", type=float, default=180.0)
    parser.add_argument(
        "--env", nargs="*", default=[], metavar="NAME=VALUE", help="part 2: more service env"
    )
    parser.add_argument(
        "--registry", action="store_true", help="part 3: one change in the registry, in process"
    )
    args = parser.parse_args()
    if args.registry:
        print_table(registry_sizes(args.engines, args.updates))
        return 0
    if etcd_binary() is None:
        print("etcd is not installed (scripts/install_system_tools.sh)", file=sys.stderr)
        return 2
    if args.scheduler:
        require_wrk()
    print_table(asyncio.run(run_scheduler(args) if args.scheduler else run(args)))
    return 0


def print_table(rows: list[dict[str, float]]) -> None:
    """Rows as a markdown table."""
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")


if __name__ == "__main__":
    sys.exit(main())
