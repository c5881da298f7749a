"""`sage llm serve` as a real subprocess: the seed's client call, the OpenAI SDK, clean stop."""

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
import openai
import psutil
import pytest

from sage.common.utils.processes import stop_process_tree
from sage.engines.sim import chat_prompt_text, expected_text
from sage.llm import UnifiedInferenceClient

pytestmark = pytest.mark.e2e

SEED_MESSAGES: list[Any] = [{"role": "user", "content": "写一份日报"}]


class Stack:
    """A running `sage llm serve` and what it started."""

    def __init__(
        self, proc: subprocess.Popen[str], base_url: str, home: Path, env: dict[str, str]
    ) -> None:
        self.proc = proc
        self.base_url = base_url
        self.home = home
        self.env = env
        self.output: list[str] = []


def _start(tmp_path: Path, port_factory: Callable[[], int], *extra: str) -> Stack:
    home = tmp_path / "sage"
    gateway = port_factory()
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
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sage.llm.cli",
            "llm",
            "serve",
            "--model",
            "sim",
            "--gateway-port",
            str(gateway),
            "--port",
            str(port_factory()),
            "--embedding-port",
            str(port_factory()),
            *extra,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    stack = Stack(proc, f"http://127.0.0.1:{gateway}/v1", home, env)
    deadline = time.monotonic() + 90
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            stop_process_tree(proc)
            raise AssertionError("serve exited early:\n" + "".join(stack.output))
        stack.output.append(line)
        if "gateway listening" in line:
            return stack
    stop_process_tree(proc)  # a half-started stack must not outlive the test
    raise AssertionError("serve did not come up:\n" + "".join(stack.output))


@pytest.fixture
def stack(tmp_path: Path, port_factory: Callable[[], int]) -> Iterator[Stack]:
    s = _start(tmp_path, port_factory)
    yield s
    stop_process_tree(s.proc)


def _tree(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def test_serve_chat_stream_and_clean_stop(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    # daemon.json records the gateway and every service.
    daemon = json.loads((stack.home / "llm" / "daemon.json").read_text())
    assert daemon["gateway_url"] == stack.base_url
    assert set(daemon["services"]) == {"gpu_manager", "embedding", "scheduler", "lifecycle", "edge"}
    assert [e["kind"] for e in daemon["engines"]] == ["llm", "embedding"]
    # With the engines extra installed, embeddings default to the bundled MiniLM.
    assert daemon["engines"][1]["model"] == "sentence-transformers/all-MiniLM-L6-v2"

    # The seed's call, with the URL from SAGE_UNIFIED_BASE_URL (the documented precedence).
    monkeypatch.setenv("SAGE_UNIFIED_BASE_URL", stack.base_url)
    # ... on the stack's machine: the client finds the admin key serve wrote there.
    monkeypatch.setenv("SAGE_HOME", str(stack.home))
    monkeypatch.delenv("SAGE_ADMIN_API_KEY", raising=False)
    client = UnifiedInferenceClient.create()
    assert client.base_url == stack.base_url
    resp = client.chat([{"role": "user", "content": "写一份日报"}])
    want = expected_text(chat_prompt_text(SEED_MESSAGES), 16)
    assert resp == want and resp
    explicit = UnifiedInferenceClient.create(control_plane_url=stack.base_url)
    assert explicit.chat(SEED_MESSAGES, max_tokens=3) == expected_text(
        chat_prompt_text(SEED_MESSAGES), 3
    )
    bound = UnifiedInferenceClient.create_for_model("sim", control_plane_url=stack.base_url)
    assert bound.model == "sim" and bound.chat(SEED_MESSAGES)
    status = client.get_status()
    assert status["llm_available"] and status["embedding_available"]
    vectors = client.embed(["Hello", "World"])
    assert len(vectors) == 2 and len(vectors[0]) == 384

    # The OpenAI SDK, streaming: role first, content deltas, finish reason, usage.
    sdk = openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0)
    chunks = list(
        sdk.chat.completions.create(
            model="sim",
            messages=SEED_MESSAGES,
            stream=True,
            max_tokens=8,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(content) == expected_text(chat_prompt_text(SEED_MESSAGES), 8)
    assert sum(1 for piece in content if piece) == 8
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    with pytest.raises(openai.NotFoundError) as info:
        sdk.chat.completions.create(model="missing", messages=SEED_MESSAGES)  # type: ignore[arg-type]
    assert info.value.body is not None and "missing" in str(info.value.body)

    # Ctrl-C stops everything; nothing it started survives.
    children = _tree(stack.proc.pid)
    assert len(children) >= 7  # five services + two engines
    stack.proc.send_signal(signal.SIGINT)
    stack.proc.wait(timeout=60)
    assert stack.proc.returncode in (0, 130)
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == [], [p.info for p in alive]
    assert not (stack.home / "llm" / "daemon.json").exists()
    with pytest.raises(httpx.ConnectError):
        httpx.get(stack.base_url + "/models", trust_env=False)


def test_serve_refuses_a_busy_port(tmp_path: Path, port_factory: Callable[[], int]) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {
            **os.environ,
            "SAGE_HOME": str(tmp_path),
            "SAGE_DISABLE_NVML": "1",
            "SAGE_SCHEDULER_PORT": str(port_factory()),
            "SAGE_LIFECYCLE_PORT": str(port_factory()),
            "SAGE_GPU_MANAGER_PORT": str(port_factory()),
            "SAGE_EMBEDDING_SERVICE_PORT": str(port_factory()),
        }
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "sage.llm.cli",
                "llm",
                "serve",
                "--gateway-port",
                str(port),
                "--port",
                str(port_factory()),
                "--no-embedding",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 2
    assert f"port {port}" in out.stdout and "edge" in out.stdout


def test_sage_llm_status_reads_daemon_file(stack: Stack) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sage.llm.cli", "llm", "status", "--json"],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)
    assert doc["gateway_url"] == stack.base_url
    stop = subprocess.run(
        [sys.executable, "-m", "sage.llm.cli", "llm", "stop"],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert stop.returncode == 0 and "stopped" in stop.stdout
    stack.proc.wait(timeout=30)


def test_crashed_service_stops_the_stack_without_orphans(
    tmp_path: Path, port_factory: Callable[[], int]
) -> None:
    """If lifecycle dies hard, serve reports it, exits non-zero, and its engines die too."""
    stack = _start(tmp_path, port_factory, "--no-embedding")
    try:
        daemon = json.loads((stack.home / "llm" / "daemon.json").read_text())
        engine_pids = [e["pid"] for e in daemon["engines"]]
        everything = _tree(stack.proc.pid)
        assert engine_pids and all(psutil.pid_exists(p) for p in engine_pids)
        os.kill(daemon["services"]["lifecycle"]["pid"], signal.SIGKILL)
        out, _ = stack.proc.communicate(timeout=60)
        assert stack.proc.returncode == 1
        assert "lifecycle exited unexpectedly" in out
        _, alive = psutil.wait_procs(everything, timeout=10)
        assert alive == [], [p.pid for p in alive]
    finally:
        stop_process_tree(stack.proc)
