"""Small helpers for starting local servers: free ports, readiness polling, clean stops.

Used by the CLI supervisor, the benchmarks and the tests, so all wait and stop alike.
"""

from __future__ import annotations

import contextlib
import random
import socket
import subprocess
import time
from typing import Any

import httpx
import psutil


def _ephemeral_floor() -> int:
    """Lowest port the kernel hands to outgoing connections (Linux; 32768 elsewhere)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now.

    Picked below the kernel's ephemeral range when possible: a port taken from that range
    (bind to 0) can be handed to some outgoing connection before the caller binds it,
    which made busy test runs fail with "address already in use".
    """
    floor = _ephemeral_floor()
    if floor > 20_000:
        for _ in range(50):
            port = random.randrange(20_000, floor)
            with socket.socket() as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30.0) -> None:
    """Poll `url` until it answers 200; fail early if `proc` exits, or after `timeout`."""
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
    raise TimeoutError(f"{url} not ready after {timeout:g}s")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    """SIGTERM, wait, SIGKILL if it will not go; returns the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


def stop_process_tree(proc: subprocess.Popen[Any], timeout: float = 30.0) -> int:
    """Stop `proc` and every process below it: SIGTERM first (so `sage llm serve` stops
    its services and engines in order), then SIGKILL whatever is left, children included
    (a SIGKILLed supervisor would leave them orphaned). Returns proc's exit code."""
    try:
        below = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        below = []
    stop_process(proc, timeout)
    _, alive = psutil.wait_procs(below, timeout=5)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(alive, timeout=5)
    return int(proc.returncode)
