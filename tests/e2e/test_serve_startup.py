"""`sage llm serve` as a user meets it while it starts and across runs: `sage llm status`
shows the starting stack from the moment serve begins, and a new serve lists only its own
engines (those of earlier runs go to the history log)."""

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
import pytest

from sage.common.utils.processes import stop_process_tree

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]


class Serve:
    """One `sage llm serve` subprocess (sim engine, no embedding engine) and its output."""

    def __init__(
        self, home: Path, env: dict[str, str], gateway: int, port: int, *extra: str
    ) -> None:
        self.home = home
        self.env = env
        self.gateway = gateway
        self.output: list[str] = []
        argv = [sys.executable, "-m", "sage.llm.cli", "llm", "serve", "--model", "sim"]
        argv += ["--no-embedding", "--gateway-port", str(gateway), "--port", str(port), *extra]
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def read_until(self, marker: str, within_s: float = 120) -> None:
        """Read serve's output until a line holds `marker`."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            assert line, "serve exited early:\n" + "".join(self.output)
            self.output.append(line)
            if marker in line:
                return
        raise AssertionError(f"no {marker!r} from serve:\n" + "".join(self.output))

    def sage(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sage.llm.cli", "llm", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.communicate(timeout=60)


@pytest.fixture
def serve(tmp_path: Path, port_factory: Callable[[], int]) -> Iterator[Callable[..., Serve]]:
    """Starts serves on one SAGE_HOME and one set of ports; stops what is left at the end."""
    home = tmp_path / "sage"
    env = {
        **os.environ,
        "SAGE_HOME": str(home),
        "SAGE_SCHEDULER_PORT": str(port_factory()),
        "SAGE_LIFECYCLE_PORT": str(port_factory()),
        "SAGE_GPU_MANAGER_PORT": str(port_factory()),
        "SAGE_EMBEDDING_SERVICE_PORT": str(port_factory()),
        "SAGE_DISABLE_NVML": "1",
    }
    env.pop("SAGE_UNIFIED_BASE_URL", None)
    gateway, port = port_factory(), port_factory()
    started: list[Serve] = []

    def start(*extra: str) -> Serve:
        started.append(Serve(home, env, gateway, port, *extra))
        return started[-1]

    yield start
    for s in started:
        stop_process_tree(s.proc)


def test_status_shows_the_stack_while_it_starts(serve: Callable[..., Serve]) -> None:
    # The engine takes 25 s to listen, as a real one loads its weights (long enough for the
    # checks below on a busy 2-core CI host).
    stack = serve("--extra-arg=--startup-delay-s=25")
    stack.read_until("starting llm engine")
    # The gateway already answers, and status says what is up and what is still starting.
    health = httpx.get(f"http://127.0.0.1:{stack.gateway}/health", trust_env=False, timeout=10)
    assert health.status_code == 200
    shown = stack.sage("status")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "no SAGE stack is running" not in shown.stdout
    lines = shown.stdout.splitlines()
    assert lines[0].startswith(f"starting: http://127.0.0.1:{stack.gateway}/v1"), shown.stdout
    for name in ("gpu_manager", "embedding", "scheduler", "lifecycle", "edge"):
        [line] = [line for line in lines if line.split()[0] == name]
        assert line.endswith(" up"), shown.stdout
    assert any("engine (starting)" in line and "sim" in line for line in lines), shown.stdout
    doc: dict[str, Any] = json.loads(stack.sage("status", "--json").stdout)
    assert doc["phase"] == "starting"
    assert [(e["kind"], e["state"]) for e in doc["engines"]] == [("llm", "starting")]

    stack.read_until("gateway listening")
    shown = stack.sage("status")
    assert shown.stdout.startswith("gateway: "), shown.stdout
    [engine] = [line for line in shown.stdout.splitlines() if "engine " in line]
    assert "(starting)" not in engine and "at http://127.0.0.1:" in engine
    assert json.loads(stack.sage("status", "--json").stdout)["phase"] == "ready"
    stack.stop()
    assert "no SAGE stack is running" in stack.sage("status").stdout


def test_a_new_serve_lists_only_its_own_engines(serve: Callable[..., Serve]) -> None:
    first = serve()
    first.read_until("gateway listening")
    [earlier] = json.loads(first.sage("engine", "list", "--json").stdout)["engines"]
    first.stop()  # its engine ends STOPPED in lifecycle's registry

    second = serve()
    second.read_until("gateway listening")
    assert any("moved to" in line for line in second.output), second.output
    engines = json.loads(second.sage("engine", "list", "--json").stdout)["engines"]
    assert [e["status"] for e in engines] == ["RUNNING"]
    assert engines[0]["engine_id"] != earlier["engine_id"]
    # The earlier run's engine is in the history log, not lost.
    history = (second.home / "llm" / "logs" / "engine-history.jsonl").read_text().splitlines()
    assert [json.loads(line)["engine_id"] for line in history] == [earlier["engine_id"]]
    second.stop()
