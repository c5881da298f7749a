"""Router overhead: one zero-latency engine, reached directly and through each router.

Paths, all in front of the same simulator engine, in one run on one machine:
  direct        wrk → engine
  ours          wrk → edge (HTTP) → scheduler (gRPC) → engine (HTTP)
  vllm-router   wrk → vllm-router (Rust, `--policy round_robin`) → engine
  litellm       wrk → LiteLLM proxy → engine
Each path is measured non-streamed and streamed (SSE; wrk times the whole stream) over a
sweep of connection counts. Reported: req/s, p50/p99, and the p50 each router adds over
direct at the same concurrency. A peer whose binary is missing is skipped with a reason.
Load is wrk bounded by --duration per point. Writes a markdown table to stdout (and
--markdown FILE) and PNG plots to --out.

`--hops N` measures instead where one request's time goes: one request at a time from
this process (N per path and round, 5 rounds interleaved), each hop reached on its own —
the engine (HTTP), the scheduler (a raw Multiplex call, no edge), the edge (HTTP) — with
each process's CPU per request, beside a bare grpc-aio stream echo (the floor of one gRPC
hop in Python on this machine).

Usage: python bench/router_overhead.py [--duration 5] [--concurrency 1 16 64]
       [--vllm-router-bin PATH] [--litellm-bin PATH] [--out bench/out] [--profile]
       [--hops N]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from _stack import PY, Stack, chat_lua, require_wrk, run_wrk, save_plot, stack

from sage.common.grpc import create_channel
from sage.common.grpc.client import token_metadata
from sage.common.http.http1 import Http1Pool
from sage.common.utils.processes import free_port, wait_http
from sage.rpc.scheduler.v1 import scheduler_pb2 as spb
from sage.rpc.scheduler.v1 import scheduler_pb2_grpc as sgrpc

LITELLM_KEY = "sk-bench-0000"
LITELLM_CONFIG = """model_list:
  - model_name: sim
    litellm_params:
      model: openai/sim
      api_base: {engine}/v1
      api_key: none
litellm_settings:
  telemetry: false
  drop_params: true
"""


def start_vllm_router(
    st: Stack, binary: str, *engines: str, policy: str = "round_robin", name: str = "vllm-router"
) -> str:
    """vllm-router in front of `engines`; round_robin by default (its own default,
    cache_aware, hashes prompts)."""
    port = free_port()
    proc = st.start(
        name,
        [
            binary,
            "--worker-urls",
            *engines,
            "--policy",
            policy,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--prometheus-port",
            str(free_port()),
            "--log-level",
            "error",
        ],
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", proc, timeout=60)
    return url


def start_litellm(st: Stack, binary: str, engine: str) -> str:
    """LiteLLM proxy, offline: local cost map, no telemetry, a master key, one worker."""
    port = free_port()
    config = st.tmp / "litellm.yaml"
    config.write_text(LITELLM_CONFIG.format(engine=engine))
    env = {
        **st.env,
        "LITELLM_MASTER_KEY": LITELLM_KEY,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_TELEMETRY_DISABLED": "true",
        "LITELLM_LOG": "ERROR",
        "DISABLE_SCHEMA_UPDATE": "true",
    }
    proc = st.start(
        "litellm",
        [
            binary,
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
        ],
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health/liveliness", proc, timeout=180)
    return url


def peer_bin(given: str, name: str) -> str:
    """The peer's executable, or '' with the reason printed."""
    path = given or shutil.which(name) or ""
    if not path or not Path(path).exists():
        print(
            f"skipping {name}: no binary (pass --{name}-bin PATH)"
            if name != "litellm"
            else "skipping litellm: no binary (pass --litellm-bin PATH)"
        )
        return ""
    return path


def profile(st: Stack, url: str, script: Path, seconds: int, out: Path) -> None:
    """py-spy on the edge and scheduler while wrk drives the gateway; top frames printed."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    recs = {}
    for name in ("edge", "scheduler"):
        dest = out / f"profile-{name}.txt"
        recs[name] = (
            subprocess.Popen(
                [
                    spy,
                    "record",
                    "-p",
                    str(st.procs[name].pid),
                    "-d",
                    str(seconds),
                    "-r",
                    "200",
                    "-f",
                    "raw",
                    "-o",
                    str(dest),
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
            dest,
        )
    time.sleep(1)
    run_wrk(url, script, seconds - 1, 16)
    for name, (proc, dest) in recs.items():
        proc.wait(60)
        if not dest.exists():
            print(f"py-spy gave no profile for {name} (needs ptrace rights)")
            continue
        own: dict[str, int] = {}
        inclusive: dict[str, int] = {}
        total = 0
        for line in dest.read_text().splitlines():
            stack_s, _, count = line.rpartition(" ")
            frames = stack_s.split(";")
            own[frames[-1]] = own.get(frames[-1], 0) + int(count)
            for frame in {
                f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0] + ")" for f in frames
            }:
                inclusive[frame] = inclusive.get(frame, 0) + int(count)
            total += int(count)
        print(f"\npy-spy {name}: top self time ({total} samples)")
        for frame, n in sorted(own.items(), key=lambda kv: -kv[1])[:10]:
            print(f"  {100 * n / total:5.1f}%  {frame}")
        print(f"py-spy {name}: inclusive time, functions of ours and of the libraries")
        for frame, n in sorted(inclusive.items(), key=lambda kv: -kv[1])[:25]:
            print(f"  {100 * n / total:5.1f}%  {frame}")


async def _echo_server(port: int) -> None:
    """A bare grpc-aio bidi stream that echoes bytes (the floor of one gRPC hop)."""

    async def echo(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for message in requests:
            yield message

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "e.Echo", {"S": grpc.stream_stream_rpc_method_handler(echo)}
            ),
        )
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def _payload(stream: bool) -> bytes:
    body: dict[str, Any] = {
        "model": "sim",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "写一份日报"}],
    }
    if stream:
        body["stream"] = True
    return json.dumps(body, ensure_ascii=False).encode()


async def _hop_paths(
    st: Stack, engine: str, edge: str, echo_port: int
) -> tuple[dict[str, Callable[[], Awaitable[None]]], Callable[[], Awaitable[None]]]:
    """One request of each path as a coroutine function; and what closes their clients."""
    pool = Http1Pool()
    json_h = {"Content-Type": "application/json"}
    token = st.env["SAGE_INTERNAL_TOKEN"]
    channel = create_channel(
        f"127.0.0.1:{st.env['SAGE_SCHEDULER_PORT']}", internal_token=token, intercept_streams=False
    )
    mux: Any = sgrpc.SchedulerServiceStub(channel).Multiplex(
        None,  # type: ignore[arg-type]
        metadata=token_metadata(token),
    )
    echo_channel = grpc.aio.insecure_channel(f"127.0.0.1:{echo_port}")
    await asyncio.wait_for(echo_channel.channel_ready(), 30)
    echo: Any = echo_channel.stream_stream("/e.Echo/S", None, None)(None)  # type: ignore[arg-type]
    ids = itertools.count(1)
    plain, streamed = _payload(False), _payload(True)

    async def http(base: str, body: bytes) -> None:
        status, _ = await pool.post(base, "/v1/chat/completions", body, json_h, 10)
        assert status == 200, status

    async def http_stream(base: str) -> None:
        stream = await pool.stream(base, "/v1/chat/completions", streamed, json_h, 10)
        assert stream.status == 200, stream.status
        async for _ in stream:
            pass

    async def scheduler(model: str, stream: bool) -> None:
        call = spb.MultiplexCall(id=next(ids), timeout_s=10)
        if stream:
            call.chat_stream.CopyFrom(
                spb.ChatStreamRequest(model=model, body=streamed, coalesce=True)
            )
        else:
            call.chat.CopyFrom(spb.ChatRequest(model=model, body=plain))
        await mux.write(spb.MultiplexRequest(calls=[call]))
        while True:
            reply = (await mux.read()).replies[-1]
            if reply.WhichOneof("result") != "chat_chunk":
                assert reply.WhichOneof("result") == (
                    "error" if model != "sim" else "chat" if not stream else "end"
                ), reply
                return

    async def bare_echo() -> None:
        await echo.write(plain)
        await echo.read()

    async def close() -> None:
        mux.cancel()
        echo.cancel()
        await channel.close(None)
        await echo_channel.close(None)
        await pool.aclose()

    paths: dict[str, Callable[[], Awaitable[None]]] = {
        "grpc-aio echo (floor of one hop)": bare_echo,
        "engine, non-streamed": lambda: http(engine, plain),
        "engine, streamed": lambda: http_stream(engine),
        "scheduler, unknown model (no engine call)": lambda: scheduler("nope", False),
        "scheduler, non-streamed": lambda: scheduler("sim", False),
        "scheduler, streamed": lambda: scheduler("sim", True),
        "edge, non-streamed": lambda: http(edge, plain),
        "edge, streamed": lambda: http_stream(edge),
    }
    return paths, close


def hops(n: int, rounds: int = 5) -> list[str]:
    """Where one request's time goes (see the module doc): a markdown table."""
    procs = ("edge", "scheduler", "engine", "echo")
    with stack() as st:
        engine = st.sim("engine")
        edge = st.plane()
        st.register("sim-0", engine)
        echo_port = free_port()
        st.start("echo", [PY, __file__, "--echo-server", str(echo_port)])

        async def run() -> dict[str, tuple[list[float], dict[str, float]]]:
            paths, close = await _hop_paths(st, engine, edge, echo_port)
            out: dict[str, tuple[list[float], dict[str, float]]] = {
                k: ([], dict.fromkeys(procs, 0.0)) for k in paths
            }
            for f in paths.values():  # warm-up: connections, the Multiplex call
                for _ in range(50):
                    await f()
            for _ in range(rounds):
                for name, f in paths.items():
                    lat, cpu = out[name]
                    before = {p: st.cpu_s(p) for p in procs}
                    for _ in range(n):
                        t0 = time.perf_counter()
                        await f()
                        lat.append(time.perf_counter() - t0)
                    for p in procs:
                        cpu[p] += st.cpu_s(p) - before[p]
            await close()
            return out

        import uvloop

        results = uvloop.run(run())
    lines = [
        "| path (one request at a time) | p50 ms "
        "| CPU ms/request: edge | scheduler | engine | echo |",
        "|---|---|---|---|---|---|",
    ]
    for name, (lat, cpu) in results.items():
        per = " | ".join(f"{1000 * cpu[p] / len(lat):.3f}" for p in procs)
        lines.append(f"| {name} | {1000 * statistics.median(lat):.3f} | {per} |")
    return lines


def main() -> int:
    if sys.argv[1:2] == ["--echo-server"]:
        asyncio.run(_echo_server(int(sys.argv[2])))
        return 0
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--modes", nargs="+", default=["non-stream", "stream"])
    parser.add_argument("--vllm-router-bin", default="")
    parser.add_argument("--litellm-bin", default="")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--profile", action="store_true", help="py-spy the edge and scheduler")
    parser.add_argument("--hops", type=int, default=0, help="per-hop breakdown, N per path+round")
    args = parser.parse_args()
    if args.hops:
        text = "\n".join(hops(args.hops))
        print(text)
        if args.markdown:
            args.markdown.write_text(text + "\n")
        return 0
    require_wrk()
    args.out.mkdir(parents=True, exist_ok=True)
    vr_bin = peer_bin(args.vllm_router_bin, "vllm-router")
    ll_bin = peer_bin(args.litellm_bin, "litellm")
    results: dict[tuple[str, str, int], dict[str, float]] = {}
    with stack() as st:
        engine = st.sim("engine")
        paths = {"direct": engine}
        paths["ours"] = st.plane()
        st.register("sim-0", engine)
        if vr_bin:
            paths["vllm-router"] = start_vllm_router(st, vr_bin, engine)
        if ll_bin:
            try:
                paths["litellm"] = start_litellm(st, ll_bin, engine)
            except (RuntimeError, TimeoutError) as err:
                log = (st.tmp / "litellm.log").read_text(errors="replace")[-2000:]
                print(f"skipping litellm: did not start ({err})\n{log}")
        for mode in args.modes:
            body = {
                "model": "sim",
                "max_tokens": args.max_tokens,
                "messages": [{"role": "user", "content": "写一份日报"}],
            }
            if mode == "stream":
                body["stream"] = True
            script = st.tmp / f"{mode}.lua"
            script.write_text(
                chat_lua(
                    json.dumps(body, ensure_ascii=False), {"Authorization": f"Bearer {LITELLM_KEY}"}
                )
            )
            for name, base in paths.items():
                url = base + "/v1/chat/completions"
                run_wrk(url, script, 1, 4)  # warm-up: connections, JIT-free but caches
                for conns in args.concurrency:
                    r = run_wrk(url, script, args.duration, conns)
                    results[(mode, name, conns)] = r
                    print(
                        f"{mode:10} {name:12} c={conns:<4} {r['rps']:8.0f} req/s  "
                        f"p50 {r['p50_ms']:7.2f}  p99 {r['p99_ms']:7.2f} ms  "
                        f"errors {r['errors']:.0f}",
                        flush=True,
                    )
        if args.profile:
            script = st.tmp / f"{args.modes[-1]}.lua"  # the last mode measured
            # raw py-spy stacks go to bench/out (ignored), not beside RESULTS.md
            profile_dir = Path(__file__).parent / "out"
            profile_dir.mkdir(exist_ok=True)
            profile(st, paths["ours"] + "/v1/chat/completions", script, 8, profile_dir)
    lines = report(results, args)
    text = "\n".join(lines)
    print("\n" + text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    for mode in args.modes:
        names = sorted({n for (m, n, _) in results if m == mode}, key=list(paths).index)
        save_plot(
            args.out / f"router_overhead_{mode.replace('-', '_')}.png",
            f"Router overhead, zero-latency engine, {mode}",
            "concurrent connections (wrk)",
            "requests/s",
            {n: [(c, results[(mode, n, c)]["rps"]) for c in args.concurrency] for n in names},
            logx=True,
            logy=True,
        )
    return 0


def report(
    results: dict[tuple[str, str, int], dict[str, float]], args: argparse.Namespace
) -> list[str]:
    """Markdown: the full sweep, then the headline ratios per mode."""
    lines = [
        "| mode | path | conns | req/s | p50 ms | p99 ms | added p50 ms | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (mode, name, conns), r in results.items():
        direct = results[(mode, "direct", conns)]
        added_ms = "—" if name == "direct" else f"{r['p50_ms'] - direct['p50_ms']:.2f}"
        lines.append(
            f"| {mode} | {name} | {conns} | {r['rps']:.0f} | {r['p50_ms']:.2f} "
            f"| {r['p99_ms']:.2f} | {added_ms} | {r['errors']:.0f} |"
        )
    lines += [
        "",
        "| mode | max req/s ours | vs direct | vs vllm-router | vs litellm | "
        "added p50 @1 conn: ours / vllm-router / litellm (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for mode in args.modes:
        best = {
            n: max(r["rps"] for (m, nn, _), r in results.items() if m == mode and nn == n)
            for (m, n, _) in results
            if m == mode
        }
        ours = best.get("ours", 0.0)

        def ratio(peer: str, ours: float = ours, best: dict[str, float] = best) -> str:
            return f"{ours / best[peer]:.2f}×" if peer in best else "skipped"

        one = min(args.concurrency)

        def added(peer: str, mode: str = mode, one: int = one) -> str:
            if (mode, peer, one) not in results:
                return "—"
            return f"{results[(mode, peer, one)]['p50_ms'] - results[(mode, 'direct', one)]['p50_ms']:.2f}"  # noqa: E501

        lines.append(
            f"| {mode} | {ours:.0f} | {ratio('direct')} | {ratio('vllm-router')} "
            f"| {ratio('litellm')} | {added('ours')} / {added('vllm-router')} / "
            f"{added('litellm')} |"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
