"""Gateway overhead: the same chat load sent straight to a simulator engine and through
edge → scheduler (gRPC) → engine, in one run, reported as ratios.

The engine is the zero-latency simulator, so the figures measure the control plane's own
cost per request (the worst case for an overhead ratio). Load comes from `wrk`, bounded by
duration. Usage: python bench/gateway_overhead.py [--duration 10] [--connections 32]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc

from sage.common.grpc import create_sync_channel
from sage.common.security import new_secret
from sage.common.utils.processes import free_port, wait_http
from sage.rpc.common.v1 import common_pb2
from sage.rpc.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[%s]==]
"""


def run_wrk(url: str, script: Path, duration: int, connections: int) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
        timeout=duration + 30,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def pct(p: str) -> float:
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        assert m, out
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    # Lua long brackets: no escape processing, so the UTF-8 body goes out byte for byte.
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50_ms": pct("50"),
        "p99_ms": pct("99"),
        "non2xx": float(errors.group(1)) if errors else 0.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is required (apt-get install wrk)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="sage-bench-"))
    engine_port, sched_port, edge_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "SAGE_HOME": str(tmp),
        "SAGE_SCHEDULER_PORT": str(sched_port),
        "SAGE_GATEWAY_PORT": str(edge_port),
        "SAGE_LIFECYCLE_PORT": str(free_port()),
        "SAGE_LOG_LEVEL": "WARNING",
        "SAGE_INTERNAL_TOKEN": new_secret(),  # the stack's gRPC credential
    }
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sage.engines.sim",
                "--model",
                "sim",
                "--port",
                str(engine_port),
                "--log-level",
                "warning",
            ],
            env=env,
        ),
        subprocess.Popen([sys.executable, "-m", "sage.services.scheduler"], env=env),
        subprocess.Popen([sys.executable, "-m", "sage.services.edge"], env=env),
    ]
    try:
        engine = f"http://127.0.0.1:{engine_port}"
        wait_http(engine + "/health")
        with create_sync_channel(
            f"127.0.0.1:{sched_port}", internal_token=env["SAGE_INTERNAL_TOKEN"]
        ) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            scheduler_pb2_grpc.SchedulerServiceStub(channel).RegisterEngine(
                scheduler_pb2.RegisterEngineRequest(
                    engine=common_pb2.Engine(
                        engine_id="sim-0",
                        model="sim",
                        kind=common_pb2.ENGINE_KIND_LLM,
                        base_url=engine,
                    )
                ),
                timeout=10,
            )
        gateway = f"http://127.0.0.1:{edge_port}"
        wait_http(gateway + "/health")
        body = json.dumps(
            {
                "model": "sim",
                "max_tokens": args.max_tokens,
                "messages": [{"role": "user", "content": "写一份日报"}],
            },
            ensure_ascii=False,
        )
        script = tmp / "post.lua"
        script.write_text(LUA % body)
        # warm-up both paths, then measure direct and gateway back to back
        run_wrk(engine + "/v1/chat/completions", script, 2, args.connections)
        run_wrk(gateway + "/v1/chat/completions", script, 2, args.connections)
        direct = run_wrk(engine + "/v1/chat/completions", script, args.duration, args.connections)
        via = run_wrk(gateway + "/v1/chat/completions", script, args.duration, args.connections)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(15)
        shutil.rmtree(tmp, ignore_errors=True)
    print("| path | req/s | p50 ms | p99 ms | non-2xx |\n|---|---|---|---|---|")
    for name, r in (("direct to engine", direct), ("edge → scheduler → engine", via)):
        print(
            f"| {name} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
            f"| {r['non2xx']:.0f} |"
        )
    print(
        f"\nthroughput ratio gateway/direct: {via['rps'] / direct['rps']:.2f}; "
        f"added p50: {via['p50_ms'] - direct['p50_ms']:.2f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
