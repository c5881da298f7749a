"""`sage llm serve --background`, `status`, `restart`, `stop [--force]` as real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from sage.llm.supervisor import is_running, stack_processes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


class Home:
    """A SAGE_HOME with its own ports, and a way to run `sage llm ...` in it."""

    def __init__(self, root: Path, port_factory: Callable[[], int]) -> None:
        self.root = root
        self.gateway = port_factory()
        self.llm_port = port_factory()
        self.env = {
            **os.environ,
            "SAGE_HOME": str(root),
            "SAGE_SCHEDULER_PORT": str(port_factory()),
            "SAGE_LIFECYCLE_PORT": str(port_factory()),
            "SAGE_GPU_MANAGER_PORT": str(port_factory()),
            "SAGE_EMBEDDING_SERVICE_PORT": str(port_factory()),
            "SAGE_DISABLE_NVML": "1",
        }
        for name in ("SAGE_UNIFIED_BASE_URL", "SAGE_ADMIN_API_KEY", "SAGE_GATEWAY_PORT"):
            self.env.pop(name, None)
        self.base_url = f"http://127.0.0.1:{self.gateway}/v1"

    def sage(self, *argv: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """Run `python -m sage.llm.cli llm ARGV...`."""
        return subprocess.run(
            [sys.executable, "-m", "sage.llm.cli", "llm", *argv],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def serve_background(self, *extra: str) -> subprocess.CompletedProcess[str]:
        """Start the sim stack (no embedding engine) in the background."""
        return self.sage(
            "serve", "--background", "--model", "sim", "--no-embedding",
            "--gateway-port", str(self.gateway), "--port", str(self.llm_port), *extra,
        )  # fmt: skip

    def daemon(self) -> dict[str, Any] | None:
        """daemon.json, if present."""
        path = self.root / "llm" / "daemon.json"
        return json.loads(path.read_text()) if path.exists() else None

    def chat(self) -> httpx.Response:
        """One chat request through the gateway."""
        body = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        return httpx.post(f"{self.base_url}/chat/completions", json=body, timeout=30)


def _all_gone(procs: list[psutil.Process], timeout: float = 15) -> list[int]:
    """Pids still running after `timeout` (zombies count as gone: PID 1 may not reap)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p.pid for p in procs if is_running(p.pid)]
        if not alive:
            return []
        time.sleep(0.2)
    return alive


@pytest.fixture
def home(tmp_path: Path, port_factory: Callable[[], int]) -> Iterator[Home]:
    """A home whose stack, whatever state a test leaves it in, is killed at the end."""
    created = Home(tmp_path / "sage", port_factory)
    seen: list[psutil.Process] = []
    yield created
    doc = created.daemon()
    if doc is not None:
        seen += stack_processes(doc)
    for proc in seen:
        try:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        except psutil.Error:
            pass


def test_background_serve_status_restart_stop(home: Home) -> None:
    started = time.monotonic()
    out = home.serve_background("--policy", "fair")
    assert out.returncode == 0, out.stdout + out.stderr
    assert time.monotonic() - started < 90
    assert f"SAGE gateway listening on {home.base_url}" in out.stdout
    # Up as soon as serve returns: health, a chat, and a supervisor that is not ours.
    assert httpx.get(f"http://127.0.0.1:{home.gateway}/health").status_code == 200
    assert home.chat().status_code == 200
    status = home.sage("status", "--json")
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["gateway_url"] == home.base_url
    assert doc["serve_argv"][:2] == ["--model", "sim"] and "--no-embedding" in doc["serve_argv"]
    assert os.getsid(doc["pid"]) != os.getsid(0)  # detached into its own session
    assert psutil.Process(doc["pid"]).ppid() != os.getpid()
    scheduler = psutil.Process(doc["services"]["scheduler"]["pid"])
    assert scheduler.environ()["SAGE_SCHEDULER_POLICY"] == "fair"
    assert (home.root / "llm" / "logs" / "serve.log").read_text().count("gateway listening") == 1
    first = stack_processes(doc)
    assert len(first) >= 6  # supervisor, five services, the engine

    again = home.serve_background()
    assert again.returncode == 2 and "already running" in again.stderr

    restarted = home.sage("restart", "--timeout", "60")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert "stopped" in restarted.stdout and f"listening on {home.base_url}" in restarted.stdout
    assert _all_gone(first) == []
    doc2 = home.daemon()
    assert doc2 is not None and doc2["pid"] != doc["pid"]
    assert doc2["gateway_url"] == home.base_url and doc2["serve_argv"] == doc["serve_argv"]
    assert doc2["services"]["scheduler"]["port"] == doc["services"]["scheduler"]["port"]
    assert home.chat().status_code == 200

    second = stack_processes(doc2)
    stopped = home.sage("stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped
    assert _all_gone(second) == []
    assert home.daemon() is None
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{home.gateway}/health")
    assert home.sage("status").returncode == 1


def test_stop_force_kills_a_stuck_stack(home: Home) -> None:
    """A supervisor that cannot handle SIGTERM (here: SIGSTOPped) is killed with its tree."""
    out = home.serve_background()
    assert out.returncode == 0, out.stdout + out.stderr
    doc = home.daemon()
    assert doc is not None
    tree = stack_processes(doc)
    os.kill(doc["pid"], signal.SIGSTOP)

    polite = home.sage("stop", "--timeout", "1")
    assert polite.returncode == 0 and "still shutting down" in polite.stdout
    assert home.chat().status_code == 200  # nothing was stopped

    forced = home.sage("stop", "--force", "--timeout", "1")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert "forced: killed" in forced.stdout
    assert _all_gone(tree) == []
    assert home.daemon() is None
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{home.gateway}/health")


def test_background_start_failure_is_reported(home: Home) -> None:
    """A stack that cannot start (its gateway port is taken) fails fast with serve's error."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", home.gateway))
        busy.listen()
        out = home.serve_background()
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"port {home.gateway}" in out.stderr and "serve exited with code 2" in out.stderr
    assert home.daemon() is None
