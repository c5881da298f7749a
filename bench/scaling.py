"""Scaling: gateway overhead and scheduler CPU per request vs registered engines and vs
queue depth, and the memory (RSS) of every service idle and under load.

1. Engines: one zero-latency simulator registered N times under distinct engine ids
   (N = 1 → 1024; one process stands in for N so the machine measures the scheduler's
   per-engine bookkeeping, not 1024 engine processes), wrk at --connections through the
   edge, for each routing policy. Reported: req/s, p50/p99, scheduler and edge CPU ms per
   request, and the scheduler's CPU while idle (ms per second, over --idle seconds before
   the load: its background work, mostly scraping every engine's /metrics, which the
   per-request figure also carries).
2. Queue depth: SAGE_SCHEDULER_MAX_INFLIGHT_PER_ENGINE=4 in front of one engine with a
   --ttft-ms delay, so (connections - 4) requests wait in the scheduler's queue; swept by
   connection count. Reported: the same columns.
3. RSS of scheduler, edge, lifecycle, gpu_manager and embedding services: idle after
   start, and the peak sampled while part 1 ran at its largest N.
Every load point is wrk bounded by --duration. Usage:
  python bench/scaling.py [--duration 4] [--engines 1 4 16 64 256 1024]
      [--depths 8 64 256 512 | --depths] (no depths: part 2 is skipped)
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
from _stack import Stack, chat_lua, require_wrk, run_wrk, save_plot, stack

from sage.common.grpc import create_sync_channel
from sage.rpc.common.v1 import common_pb2
from sage.rpc.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

SERVICES = ("gpu_manager", "lifecycle", "embedding", "scheduler", "edge")
BODY = json.dumps(
    {"model": "sim", "max_tokens": 16, "messages": [{"role": "user", "content": "hello"}]}
)


@contextmanager
def peak_rss(st: Stack, names: tuple[str, ...]) -> Iterator[dict[str, float]]:
    """Samples RSS of `names` every 100 ms while the block runs; yields name → peak MiB."""
    peaks = dict.fromkeys(names, 0.0)
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.1):
            for name in names:
                peaks[name] = max(peaks[name], st.rss_mib(name))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peaks
    finally:
        stop.set()
        thread.join()


def register_many(st: Stack, engine_ids: list[str], base_url: str) -> None:
    """Register `engine_ids` at `base_url` over one channel (a channel per engine made
    registering 1024 take minutes)."""
    if not engine_ids:
        return
    addr = f"127.0.0.1:{st.env['SAGE_SCHEDULER_PORT']}"
    with create_sync_channel(addr, internal_token=st.env["SAGE_INTERNAL_TOKEN"]) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        for engine_id in engine_ids:
            stub.RegisterEngine(
                scheduler_pb2.RegisterEngineRequest(
                    engine=common_pb2.Engine(
                        engine_id=engine_id,
                        model="sim",
                        kind=common_pb2.ENGINE_KIND_LLM,
                        base_url=base_url,
                    )
                ),
                timeout=10,
            )


def idle_cpu(st: Stack, seconds: float) -> float:
    """The scheduler's CPU ms per second while no request runs."""
    if seconds <= 0:
        return 0.0
    start = st.cpu_s("scheduler")
    time.sleep(seconds)
    return (st.cpu_s("scheduler") - start) * 1000 / seconds


def measure(st: Stack, script: Path, duration: float, conns: int) -> dict[str, float]:
    """One wrk run through the edge plus the scheduler's and edge's CPU per request."""
    before = {n: st.cpu_s(n) for n in ("scheduler", "edge", "engine")}
    r = run_wrk(st.urls["edge"] + "/v1/chat/completions", script, duration, conns)
    n = max(r["requests"], 1.0)
    for name in before:
        r[f"{name}_cpu_ms"] = (st.cpu_s(name) - before[name]) * 1000 / n
    return r


def row(label: str, r: dict[str, float]) -> str:
    return (
        f"| {label} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
        f"| {r['scheduler_cpu_ms']:.3f} | {r['edge_cpu_ms']:.3f} "
        f"| {r.get('scheduler_idle_ms_s', 0.0):.1f} | {r['errors']:.0f} |"
    )


HEADER = (
    "| {what} | req/s | p50 ms | p99 ms | scheduler CPU ms/req | edge CPU ms/req "
    "| scheduler idle CPU ms/s | errors |\n"
    "|---|---|---|---|---|---|---|---|"
)


def queue_depth(args: argparse.Namespace, lines: list[str]) -> list[tuple[float, float]]:
    """Part 2: one engine capped at 4 in flight, the rest of the connections queued."""
    depth_series: list[tuple[float, float]] = []
    with stack({"SAGE_SCHEDULER_MAX_INFLIGHT_PER_ENGINE": "4"}) as st:
        engine = st.sim("engine", "--ttft-ms", str(args.ttft_ms))
        st.plane()
        st.register("sim-0", engine)
        script = st.tmp / "chat.lua"
        script.write_text(chat_lua(BODY))
        lines += [
            "",
            f"queue depth (1 engine, ttft {args.ttft_ms:g} ms, 4 in flight, rest queued):",
            HEADER.format(what="connections (queued ≈ conns − 4)"),
        ]
        run_wrk(st.urls["edge"] + "/v1/chat/completions", script, 1, 4)
        for depth in args.depths:
            r = measure(st, script, args.duration, depth)
            lines.append(row(str(depth), r))
            print(lines[-1], flush=True)
            depth_series.append((depth, r["scheduler_cpu_ms"]))
    return depth_series


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=4)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--engines", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024])
    parser.add_argument("--idle", type=float, default=2.0, help="idle seconds per engine point")
    parser.add_argument("--routings", nargs="+", default=["round_robin", "least_loaded"])
    parser.add_argument("--depths", type=int, nargs="*", default=[8, 64, 256, 512])
    parser.add_argument("--ttft-ms", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    require_wrk()
    lines: list[str] = []
    series: dict[str, list[tuple[float, float]]] = {}
    idle: dict[str, float] = {}
    loaded: dict[str, float] = {}
    for routing in args.routings:
        with stack({"SAGE_SCHEDULER_ROUTING": routing}) as st:
            engine = st.sim("engine")
            st.plane(SERVICES)
            script = st.tmp / "chat.lua"
            script.write_text(chat_lua(BODY))
            if not idle:
                idle = {n: st.rss_mib(n) for n in SERVICES}
            lines += ["", f"routing {routing}:", HEADER.format(what="engines")]
            registered = 0
            run_wrk(st.urls["edge"] + "/v1/chat/completions", script, 1, 4)  # warm-up
            for count in sorted(args.engines):
                register_many(st, [f"sim-{i}" for i in range(registered, count)], engine)
                registered = max(registered, count)
                idle_ms_s = idle_cpu(st, args.idle)
                if count == max(args.engines) and not loaded:
                    with peak_rss(st, SERVICES) as peaks:
                        r = measure(st, script, args.duration, args.connections)
                    loaded = dict(peaks)
                else:
                    r = measure(st, script, args.duration, args.connections)
                r["scheduler_idle_ms_s"] = idle_ms_s
                lines.append(row(str(count), r))
                print(lines[-1], flush=True)
                series.setdefault(f"scheduler CPU, {routing}", []).append(
                    (count, r["scheduler_cpu_ms"])
                )
    depth_series = queue_depth(args, lines) if args.depths else []
    lines += [
        "",
        "| service | RSS idle MiB | RSS peak under load MiB |",
        "|---|---|---|",
        *(f"| {n} | {idle.get(n, 0):.0f} | {loaded.get(n, 0):.0f} |" for n in SERVICES),
    ]
    text = "\n".join(lines)
    print(text)
    save_plot(
        args.out / "scaling.png",
        "Scheduler CPU per request vs registered engines / queued requests",
        "registered engines, or concurrent connections (queue depth)",
        "scheduler CPU ms per request",
        {**series, "scheduler CPU vs connections (queue)": depth_series},
        logx=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
