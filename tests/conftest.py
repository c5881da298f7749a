"""Shared fixtures: free ports, real engine subprocesses, real gRPC servers on port 0."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from sage.common.config.settings import SageSettings


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30.0) -> None:
    """Poll until `url` answers 200, failing early if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} was ready")
        try:
            if httpx.get(url, timeout=1.0, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout}s")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    """SIGTERM, wait, SIGKILL if needed; returns the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@pytest.fixture
def settings(tmp_path: Path) -> SageSettings:
    """Settings isolated to a temp SAGE_HOME, with NVML off on hosts without a GPU."""
    return SageSettings(
        home=tmp_path / "sage",
        rpc_timeout_s=10.0,
        request_timeout_s=30.0,
        disable_nvml=not Path("/dev/nvidia0").exists(),
    )


SimFactory = Callable[..., str]


class _SimLauncher:
    """Starts `python -m sage.engines.sim` subprocesses and stops them all at the end."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def __call__(self, *args: str, model: str = "sim") -> str:
        port = free_port()
        with open(self.log_dir / f"sim-{port}.log", "wb") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "sage.engines.sim",
                    "--model",
                    model,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    *args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/health", proc)
        return base

    def stop(self) -> None:
        for proc in self.procs:
            stop_process(proc)


@pytest.fixture
def sim_engine(tmp_path: Path) -> Iterator[SimFactory]:
    """Start simulator engines for one test; returns their base URLs."""
    launcher = _SimLauncher(tmp_path)
    yield launcher
    launcher.stop()


@pytest.fixture(scope="module")
def module_sim_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimFactory]:
    """Like sim_engine, but the engines live for the whole test module (cheaper)."""
    launcher = _SimLauncher(tmp_path_factory.mktemp("sims"))
    yield launcher
    launcher.stop()


@pytest.fixture
def no_leaked_children() -> Iterator[None]:
    """Fail the test if it leaves child processes of the test runner behind."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        extra = [
            p
            for p in psutil.Process().children(recursive=True)
            if p.pid not in before and p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        ]
        if not extra:
            return
        time.sleep(0.2)
    raise AssertionError(f"child processes left behind: {[p.cmdline() for p in extra]}")


@pytest.fixture
def port_factory() -> Callable[[], int]:
    """Hands out free TCP ports on 127.0.0.1."""
    return free_port
