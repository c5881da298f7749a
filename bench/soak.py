"""Soak test (issue 11): minutes of mixed chat + embedding load through the edge while the
autoscaler starts and stops engines; RSS and open file descriptors of every service must
not grow after warm-up.

    python bench/soak.py                 # 5 minutes
    python bench/soak.py --minutes 3 --sample-s 5

The five services run as separate processes wired like `sage llm serve` (own SAGE_HOME and
loopback ports); lifecycle starts simulator engines. Chat comes in bursts (busy / quiet
phases) so the autoscaler scales `sim` up and back down; embeddings flow steadily. Every
`--sample-s` seconds each service's RSS and /proc/<pid>/fd count is sampled. After the run
a table is printed; exit 1 when a service grew past the thresholds (mean of the last three
samples vs the first three after warm-up) or requests failed. Not run in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sage.common.utils.processes import free_port, stop_process, wait_http

SERVICES = ("gpu_manager", "embedding", "scheduler", "lifecycle", "edge")
PORT_ENV = {
    "gpu_manager": "SAGE_GPU_MANAGER_PORT",
    "embedding": "SAGE_EMBEDDING_SERVICE_PORT",
    "scheduler": "SAGE_SCHEDULER_PORT",
    "lifecycle": "SAGE_LIFECYCLE_PORT",
    "edge": "SAGE_GATEWAY_PORT",
}


@dataclass
class Sample:
    """One reading of one service."""

    at_s: float
    rss_mib: float
    fds: int


@dataclass
class Run:
    """Processes, samples and request outcomes of one soak run."""

    home: Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    outcomes: Counter[str] = field(default_factory=Counter)
    engines_seen: set[str] = field(default_factory=set)
    engine_counts: list[int] = field(default_factory=list)

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.env['SAGE_GATEWAY_PORT']}"

    def start(self, name: str) -> None:
        with open(self.home / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", f"sage.services.{name}"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        if name == "edge":
            wait_http(self.gateway + "/openapi.json", self.procs[name], 60)
            return
        addr = f"127.0.0.1:{self.env[PORT_ENV[name]]}"
        deadline = time.monotonic() + 60
        with grpc.insecure_channel(addr) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.procs[name].poll() is not None:
                    raise RuntimeError(f"{name} exited; see {self.home / (name + '.log')}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise RuntimeError(f"{name} not ready within 60 s")

    def sample(self, at_s: float) -> None:
        for name, proc in self.procs.items():
            try:
                p = psutil.Process(proc.pid)
                reading = Sample(at_s, p.memory_info().rss / 2**20, p.num_fds())
            except psutil.Error:
                continue
            self.samples.setdefault(name, []).append(reading)

    def stop(self) -> None:
        for name in reversed(SERVICES):
            proc = self.procs.get(name)
            if proc is not None:
                stop_process(proc, timeout=30)


async def _chat(client: httpx.AsyncClient, run: Run, stream: bool) -> None:
    body = {
        "model": "sim",
        "messages": [{"role": "user", "content": "soak"}],
        "max_tokens": 8,
        "stream": stream,
    }
    kind = "chat_stream" if stream else "chat"
    try:
        if stream:
            async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
                lines = [line async for line in resp.aiter_lines() if line.startswith("data: ")]
                ok = resp.status_code == 200 and lines[-1:] == ["data: [DONE]"]
                ok = ok and not any('"error"' in line for line in lines)
        else:
            resp = await client.post("/v1/chat/completions", json=body)
            ok = resp.status_code == 200
        run.outcomes[f"{kind} {'ok' if ok else 'failed'}"] += 1
    except httpx.HTTPError as exc:
        run.outcomes[f"{kind} {type(exc).__name__}"] += 1


async def _embed(client: httpx.AsyncClient, run: Run) -> None:
    try:
        resp = await client.post(
            "/v1/embeddings", json={"model": "sim-embed", "input": ["soak a", "soak b"]}
        )
        run.outcomes[f"embed {'ok' if resp.status_code == 200 else 'failed'}"] += 1
    except httpx.HTTPError as exc:
        run.outcomes[f"embed {type(exc).__name__}"] += 1


async def _drive(
    run: Run, duration_s: float, sample_s: float, busy_s: float, quiet_s: float
) -> None:
    """The load (bursty chat, steady embeddings) plus the sampler, for `duration_s`."""
    began = time.monotonic()
    end = began + duration_s
    busy = asyncio.Event()

    async def chat_worker(i: int) -> None:
        async with httpx.AsyncClient(base_url=run.gateway, timeout=30, trust_env=False) as c:
            while time.monotonic() < end:
                if not busy.is_set():
                    await asyncio.sleep(0.2)
                    continue
                await _chat(c, run, stream=i % 2 == 1)

    async def embed_worker() -> None:
        async with httpx.AsyncClient(base_url=run.gateway, timeout=30, trust_env=False) as c:
            while time.monotonic() < end:
                await _embed(c, run)
                await asyncio.sleep(0.05)

    async def phases() -> None:
        while time.monotonic() < end:
            busy.set()
            await asyncio.sleep(busy_s)
            busy.clear()
            await asyncio.sleep(quiet_s)

    async def sampler() -> None:
        async with httpx.AsyncClient(base_url=run.gateway, timeout=10, trust_env=False) as c:
            while time.monotonic() < end:
                run.sample(time.monotonic() - began)
                try:
                    listed = (await c.get("/v1/management/engines")).json()["engines"]
                    live = [
                        e for e in listed if e["status"] == "RUNNING" and e["model_id"] == "sim"
                    ]
                    run.engines_seen.update(e["engine_id"] for e in listed)
                    run.engine_counts.append(len(live))
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                await asyncio.sleep(sample_s)

    tasks = [chat_worker(i) for i in range(8)] + [embed_worker(), phases(), sampler()]
    # Bounded: every loop checks `end`; the extra minute covers requests in flight.
    await asyncio.wait_for(
        asyncio.gather(*(asyncio.ensure_future(t) for t in tasks), return_exceptions=False),
        duration_s + 60,
    )


def _report(run: Run, warmup_s: float, rss_limit_mib: float, fd_limit: int) -> bool:
    """Print the table; True when no service grew past the limits."""
    ok = True
    print(
        f"\n{'service':<12} {'RSS MiB start':>13} {'end':>7} {'growth':>7}   "
        f"{'fds start':>9} {'end':>5} {'growth':>6}  verdict"
    )
    for name in SERVICES:
        after = [s for s in run.samples.get(name, []) if s.at_s >= warmup_s]
        if len(after) < 6:
            print(f"{name:<12} too few samples after warm-up ({len(after)})")
            ok = False
            continue
        rss0 = statistics.mean(s.rss_mib for s in after[:3])
        rss1 = statistics.mean(s.rss_mib for s in after[-3:])
        fd0 = statistics.mean(s.fds for s in after[:3])
        fd1 = statistics.mean(s.fds for s in after[-3:])
        grew = rss1 - rss0 > rss_limit_mib or fd1 - fd0 > fd_limit
        ok = ok and not grew
        print(
            f"{name:<12} {rss0:>13.1f} {rss1:>7.1f} {rss1 - rss0:>+7.1f}   "
            f"{fd0:>9.1f} {fd1:>5.1f} {fd1 - fd0:>+6.1f}  {'GREW' if grew else 'ok'}"
        )
    print("\nrequests:", ", ".join(f"{k}: {v}" for k, v in sorted(run.outcomes.items())))
    counts = run.engine_counts
    changes = sum(1 for a, b in itertools.pairwise(counts) if a != b)
    print(
        f"sim engines: {min(counts, default=0)}..{max(counts, default=0)} running, "
        f"{changes} changes seen, {len(run.engines_seen)} engine ids over the run"
    )
    total = sum(run.outcomes.values())
    failed = sum(v for k, v in run.outcomes.items() if not k.endswith(" ok"))
    if total == 0 or failed > 0.01 * total:
        print(f"FAIL: {failed} of {total} requests failed")
        ok = False
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="load duration (default 5)")
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples")
    parser.add_argument(
        "--warmup-fraction", type=float, default=0.3, help="part of the run ignored for growth"
    )
    parser.add_argument("--rss-limit-mib", type=float, default=25.0, help="allowed RSS growth")
    parser.add_argument("--fd-limit", type=int, default=10, help="allowed open-fd growth")
    parser.add_argument("--busy-s", type=float, default=25.0, help="chat burst length")
    parser.add_argument("--quiet-s", type=float, default=20.0, help="pause between bursts")
    args = parser.parse_args(argv)
    duration = args.minutes * 60

    home = Path(tempfile.mkdtemp(prefix="sage-soak-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGE_")}
    env.update({var: str(free_port()) for var in PORT_ENV.values()})
    env.update(
        {
            "SAGE_HOME": str(home),
            "SAGE_HOST": "127.0.0.1",
            "SAGE_DISABLE_NVML": "1",
            "SAGE_LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
            # One request per engine at a time, so bursts queue and the autoscaler acts.
            "SAGE_SCHEDULER_MAX_INFLIGHT_PER_ENGINE": "1",
            "SAGE_AUTOSCALE": "sim:1:3",
            "SAGE_AUTOSCALE_INTERVAL_S": "1",
            "SAGE_AUTOSCALE_QUEUE_THRESHOLD": "2",
            "SAGE_AUTOSCALE_UP_AFTER_S": "2",
            "SAGE_AUTOSCALE_IDLE_S": "8",
            "SAGE_AUTOSCALE_COOLDOWN_S": "4",
        }
    )
    run = Run(home, env)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        for name in SERVICES:
            run.start(name)
        with httpx.Client(base_url=run.gateway, timeout=120, trust_env=False) as client:
            for body in (
                # The first replica is slow, so bursts queue behind it; the autoscaler's
                # copies start with the simulator's defaults.
                {
                    "model": "sim",
                    "backend": "sim",
                    "extra_args": ["--ttft-ms", "20", "--tpot-ms", "5"],
                },
                {"model": "sim-embed", "kind": "embedding", "backend": "sim"},
            ):
                resp = client.post("/v1/management/engines", json=body)
                resp.raise_for_status()
        print(f"soak: {args.minutes:g} min, services logging to {home}", flush=True)
        asyncio.run(_drive(run, duration, args.sample_s, args.busy_s, args.quiet_s))
        good = _report(run, duration * args.warmup_fraction, args.rss_limit_mib, args.fd_limit)
    finally:
        run.stop()
    leftover = [p.pid for p in psutil.Process().children(recursive=True) if p.status() != "zombie"]
    if leftover:
        print(f"FAIL: processes left behind: {leftover}")
        good = False
    elif good:
        shutil.rmtree(home, ignore_errors=True)
    print("PASS" if good else "FAIL")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
