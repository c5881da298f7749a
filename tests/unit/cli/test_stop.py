"""`sage llm stop [--force]` on a supervisor that ignores SIGTERM (real processes)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from sage.llm import supervisor
from sage.llm.cli import main

# A "supervisor" that ignores SIGTERM and has a child (a "service") that ignores it too.
STUCK = textwrap.dedent(
    """
    import signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(600)")], stdout=subprocess.PIPE, text=True)
    child.stdout.readline()
    print(child.pid, flush=True)
    time.sleep(600)
    """
)


@pytest.fixture
def stuck_stack(sage_home: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc = subprocess.Popen([sys.executable, "-c", STUCK], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    doc = {
        "pid": proc.pid,
        "started_at": time.time(),
        "gateway_url": "http://127.0.0.1:9/v1",
        "services": {"edge": {"pid": child, "port": 9, "addr": "127.0.0.1:9"}},
        "engines": [],
    }
    (sage_home / "llm").mkdir(parents=True)
    (sage_home / "llm" / "daemon.json").write_text(json.dumps(doc))
    yield proc, child
    for pid in (proc.pid, child):
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()
    proc.wait(timeout=10)


def test_stop_without_force_leaves_a_stuck_stack(
    stuck_stack: tuple[subprocess.Popen[str], int], capsys: pytest.CaptureFixture[str]
) -> None:
    proc, child = stuck_stack
    assert main(["llm", "stop", "--timeout", "0.5"]) == 0
    assert "still shutting down" in capsys.readouterr().out
    assert proc.poll() is None and supervisor.is_running(child)


def test_stop_force_kills_the_tree(
    stuck_stack: tuple[subprocess.Popen[str], int],
    sage_home: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    proc, child = stuck_stack
    started = time.monotonic()
    assert main(["llm", "stop", "--force", "--timeout", "0.5"]) == 0
    assert time.monotonic() - started < 10
    assert "forced: killed 2 process(es)" in capsys.readouterr().out
    assert proc.wait(timeout=10) == -9
    assert not supervisor.is_running(child)
    assert not (sage_home / "llm" / "daemon.json").exists()
    assert main(["llm", "status"]) == 1


def test_a_reused_pid_is_not_killed(sage_home: Path) -> None:
    """A pid in daemon.json that now belongs to a newer process is left alone."""
    doc = {"pid": 0, "started_at": time.time() - 3600, "services": {}, "engines": []}
    newer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        doc["engines"] = [{"pid": newer.pid}]
        assert supervisor.stack_processes(doc) == []
    finally:
        newer.kill()
        newer.wait()
