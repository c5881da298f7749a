"""`sage llm engine|preset|logs` as real subprocesses against a real `sage llm serve`.

The CLI finds the gateway the way a user's shell would: through the running stack's
daemon.json under SAGE_HOME (no --url), so the discovery path is tested too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from sage.common.exceptions import ConflictError, EngineNotFoundError, InvalidRequestError
from sage.common.utils.processes import free_port, stop_process, stop_process_tree, wait_http
from sage.llm.management import ManagementClient

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


class Stack:
    """A running `sage llm serve --no-embedding` (sim chat) and its environment."""

    def __init__(self, proc: subprocess.Popen[str], base_url: str, env: dict[str, str]) -> None:
        self.proc = proc
        self.base_url = base_url
        self.env = env
        self.output: list[str] = []

    def sage(self, *argv: str, timeout: float = 120, stdin: str | None = None) -> Result:
        """Run `python -m sage.llm.cli llm ARGV...` against this stack."""
        done = subprocess.run(
            [sys.executable, "-m", "sage.llm.cli", "llm", *argv],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
        )
        return Result(done.returncode, done.stdout, done.stderr)

    def chat(self, model: str) -> httpx.Response:
        """One chat request through the gateway."""
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        return httpx.post(f"{self.base_url}/chat/completions", json=body, timeout=30)


class Result:
    """Exit code and output of one CLI run."""

    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        self.code = code
        self.stdout = stdout
        self.stderr = stderr

    def json(self) -> Any:
        return json.loads(self.stdout)

    def __repr__(self) -> str:
        return f"rc={self.code}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


def _start_stack(home: Path, **extra_env: str) -> Stack:
    gateway = free_port()
    env = {
        **os.environ,
        "SAGE_HOME": str(home),
        "SAGE_SCHEDULER_PORT": str(free_port()),
        "SAGE_LIFECYCLE_PORT": str(free_port()),
        "SAGE_GPU_MANAGER_PORT": str(free_port()),
        "SAGE_EMBEDDING_SERVICE_PORT": str(free_port()),
        "SAGE_DISABLE_NVML": "1",
        # the external engine registered below is serve's own sim, on loopback
        "SAGE_EXTERNAL_ENGINE_ALLOW": "127.0.0.1",
    }
    for name in ("SAGE_UNIFIED_BASE_URL", "SAGE_ADMIN_API_KEY"):
        env.pop(name, None)
    env.update(extra_env)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sage.llm.cli",
            "llm",
            "serve",
            "--model",
            "sim",
            "--no-embedding",
            "--gateway-port",
            str(gateway),
            "--port",
            str(free_port()),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    running = Stack(proc, f"http://127.0.0.1:{gateway}/v1", env)
    assert proc.stdout is not None
    deadline = time.monotonic() + 90
    while True:
        line = proc.stdout.readline()
        if not line or time.monotonic() > deadline:
            stop_process_tree(proc)  # its services and engines too
            raise AssertionError("serve did not come up:\n" + "".join(running.output))
        running.output.append(line)
        if "gateway listening" in line:
            return running


def _stop_stack(stack: Stack) -> None:
    """Stop serve; engines started through the CLI belong to it and must not outlive it."""
    children = psutil.Process(stack.proc.pid).children(recursive=True)
    stack.proc.terminate()
    try:
        stack.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        stack.proc.kill()
        stack.proc.wait()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == [], [p.pid for p in alive]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = _start_stack(tmp_path_factory.mktemp("sage-home"))
    yield running
    _stop_stack(running)


def _engines(stack: Stack) -> dict[str, dict[str, Any]]:
    listed = stack.sage("engine", "list", "--json")
    assert listed.code == 0, listed
    doc = listed.json()
    assert doc["count"] == len(doc["engines"])
    return {e["engine_id"]: e for e in doc["engines"]}


def test_engine_start_list_chat_logs_stop_prune(stack: Stack) -> None:
    started = stack.sage("engine", "start", "sim-e2e", "--backend", "sim", "--json")
    assert started.code == 0, started
    engine = started.json()
    engine_id = engine["engine_id"]
    assert (engine["model_id"], engine["engine_kind"], engine["status"]) == (
        "sim-e2e",
        "llm",
        "RUNNING",
    )
    assert engine["backend"] == "sim" and engine["base_url"]

    listed = _engines(stack)
    assert listed[engine_id]["status"] == "RUNNING"
    plain = stack.sage("engine", "list")
    assert plain.code == 0 and engine_id in plain.stdout and "sim-e2e" in plain.stdout

    # The gateway routes the new model to the new engine.
    reply = stack.chat("sim-e2e")
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"]

    logs = stack.sage("logs", engine_id, "-n", "5")
    assert logs.code == 0, logs
    lines = logs.stdout.splitlines()
    assert 0 < len(lines) <= 5

    stopped = stack.sage("engine", "stop", engine_id)
    assert stopped.code == 0, stopped
    assert "stopped" in stopped.stdout and engine_id in stopped.stdout
    assert stack.chat("sim-e2e").status_code == 404
    after = _engines(stack)
    assert engine_id not in after or after[engine_id]["status"] == "STOPPED"

    pruned = stack.sage("engine", "prune", "--json")
    assert pruned.code == 0, pruned
    if engine_id in after:
        assert engine_id in pruned.json()["pruned"]
    assert engine_id not in _engines(stack)
    assert stack.sage("engine", "prune").stdout.strip() == "nothing to prune"


def _write_preset(path: Path, name: str, engines: str) -> Path:
    path.write_text(f"version: 1\nname: {name}\nengines:\n{engines}")
    return path


def test_preset_apply_is_idempotent(stack: Stack, tmp_path: Path) -> None:
    preset = _write_preset(
        tmp_path / "pair.yaml",
        "e2e-pair",
        "  - {name: first, model: sim-pa, backend: sim}\n"
        "  - {name: second, model: sim-pb, backend: sim}\n",
    )
    refused = stack.sage("preset", "apply", "-f", str(preset))
    assert refused.code == 2 and "--yes" in refused.stderr

    dry = stack.sage("preset", "apply", "-f", str(preset), "--dry-run", "--json")
    assert dry.code == 0, dry
    assert [e["name"] for e in dry.json()["planned"]] == ["first", "second"]

    first = stack.sage("preset", "apply", "-f", str(preset), "--yes", "--json")
    assert first.code == 0, first
    result = first.json()
    assert [s["name"] for s in result["started"]] == ["first", "second"] and not result["kept"]
    ids = [s["engine"]["engine_id"] for s in result["started"]]

    listed = _engines(stack)
    assert [listed[i]["engine_label"] for i in ids] == [
        "preset:e2e-pair/first",
        "preset:e2e-pair/second",
    ]
    assert all(listed[i]["status"] == "RUNNING" for i in ids)
    assert stack.chat("sim-pb").status_code == 200

    again = stack.sage("preset", "apply", "-f", str(preset), "--yes")
    assert again.code == 0, again
    assert "started 0, kept 2" in again.stdout
    assert len([e for e in _engines(stack).values() if e["model_id"] in ("sim-pa", "sim-pb")]) == 2

    for engine_id in ids:
        assert stack.sage("engine", "stop", engine_id).code == 0


def test_failed_preset_rolls_back(stack: Stack, tmp_path: Path) -> None:
    preset = _write_preset(
        tmp_path / "broken.yaml",
        "e2e-broken",
        "  - {name: good, model: sim-rb, backend: sim}\n"
        # A known backend this machine cannot start (no text-embeddings-router installed):
        # the preset reads fine and fails at its second engine.
        "  - {name: bad, model: sim-rb2, backend: tei, kind: embedding}\n",
    )
    applied = stack.sage("preset", "apply", "-f", str(preset), "--yes")
    assert applied.code == 1, applied
    assert "'bad'" in applied.stderr and "backend tei cannot run here" in applied.stderr
    good = [e for e in _engines(stack).values() if e["model_id"] == "sim-rb"]
    assert good and all(e["status"] == "STOPPED" for e in good)
    assert stack.chat("sim-rb").status_code == 404


def test_lora_adapters_from_a_preset_and_the_cli(stack: Stack, tmp_path: Path) -> None:
    preset = _write_preset(
        tmp_path / "lora.yaml",
        "e2e-lora",
        "  - {name: lora, model: sim-lora-e2e, backend: sim, lora: true, max_lora_rank: 8}\n",
    )
    applied = stack.sage("preset", "apply", "-f", str(preset), "--yes")
    assert applied.code == 0, applied
    (engine,) = [e for e in _engines(stack).values() if e["model_id"] == "sim-lora-e2e"]
    assert engine["lora_enabled"]
    # An adapter folder under $SAGE_HOME/models (an allowed model root); the sim reads its rank.
    folder = Path(stack.env["SAGE_HOME"]) / "models" / "e2e-adapter"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')

    loaded = stack.sage("engine", "adapter", "load", engine["engine_id"], "e2e-lora", str(folder))
    assert loaded.code == 0, loaded
    assert "loaded adapter e2e-lora" in loaded.stdout
    listed = stack.sage("engine", "adapter", "list", "--json")
    assert listed.code == 0, listed
    assert listed.json()["adapters"] == [
        {
            "engine_id": engine["engine_id"],
            "name": "e2e-lora",
            "path": str(folder),
            "base_model": "sim-lora-e2e",
        }
    ]
    models = httpx.get(f"{stack.base_url}/models", timeout=30).json()["data"]
    assert {"id": "e2e-lora", "parent": "sim-lora-e2e"}.items() <= next(
        m for m in models if m["id"] == "e2e-lora"
    ).items()
    reply = stack.chat("e2e-lora")
    assert reply.status_code == 200, reply.text

    unloaded = stack.sage("engine", "adapter", "unload", engine["engine_id"], "e2e-lora")
    assert unloaded.code == 0, unloaded
    assert "no LoRA adapters" in stack.sage("engine", "adapter", "list").stdout
    missing = stack.sage("engine", "adapter", "unload", engine["engine_id"], "e2e-lora")
    assert missing.code == 1 and "no LoRA adapter named 'e2e-lora'" in missing.stderr, missing
    assert stack.chat("e2e-lora").status_code == 404
    assert stack.sage("engine", "stop", engine["engine_id"]).code == 0


def test_errors_have_clear_messages_and_exit_codes(stack: Stack, tmp_path: Path) -> None:
    unknown_backend = stack.sage("engine", "start", "sim", "--backend", "no-such-backend")
    assert unknown_backend.code in (1, 2), unknown_backend
    assert "no-such-backend" in unknown_backend.stderr
    assert len(unknown_backend.stderr.strip().splitlines()) == 1

    missing = stack.sage("engine", "stop", "no-such-engine")
    assert missing.code == 1, missing
    assert "not found" in missing.stderr.lower()

    typo = _write_preset(tmp_path / "typo.yaml", "t", "  - {name: a, modle: sim}\n")
    bad_preset = stack.sage("preset", "apply", "-f", str(typo), "--yes")
    assert bad_preset.code == 2 and "modle" in bad_preset.stderr and "line 4" in bad_preset.stderr

    no_stack = dict(stack.env, SAGE_HOME=str(tmp_path / "empty"))
    out = subprocess.run(
        [sys.executable, "-m", "sage.llm.cli", "llm", "engine", "list", "--url",
         f"http://127.0.0.1:{free_port()}"],
        env=no_stack, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "no SAGE gateway" in out.stderr


def test_service_logs_still_work(stack: Stack) -> None:
    logs = stack.sage("logs", "--tail", "3")
    assert logs.code == 0, logs
    assert "edge.log" in logs.stdout
    one = stack.sage("logs", "edge", "-n", "2")
    assert one.code == 0 and one.stdout.count("==>") == 1


def test_admin_key_is_required_and_read_from_the_environment(tmp_path: Path) -> None:
    secured = _start_stack(tmp_path / "home", SAGE_ADMIN_API_KEY="e2e-admin-key")
    try:
        without = dict(secured.env)
        without.pop("SAGE_ADMIN_API_KEY")
        denied = subprocess.run(
            [sys.executable, "-m", "sage.llm.cli", "llm", "engine", "list"],
            env=without, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert denied.returncode == 2, denied
        assert denied.stderr.startswith("error: ")
        allowed = secured.sage("engine", "list", "--json")
        assert allowed.code == 0, allowed
        assert allowed.json()["count"] == 1  # the engine serve started
        flag = subprocess.run(
            [sys.executable, "-m", "sage.llm.cli", "llm", "engine", "list", "--json",
             "--api-key", "e2e-admin-key"],
            env=without, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert flag.returncode == 0, flag
    finally:
        _stop_stack(secured)


def test_python_client_status_backends_gpu_register(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As on the stack's machine: the client finds the admin key serve wrote in SAGE_HOME.
    monkeypatch.setenv("SAGE_HOME", stack.env["SAGE_HOME"])
    monkeypatch.delenv("SAGE_ADMIN_API_KEY", raising=False)
    with ManagementClient(stack.base_url) as client:
        status = client.status()
        assert status["llm_available"] is True
        backends = {b.name: b for b in client.backends()}
        assert backends["sim"].available and "llm" in backends["sim"].kinds
        assert not backends["sim"].uses_gpu
        gpu = client.gpu()
        assert isinstance(gpu, dict) and gpu  # NVML is off here: a report with no GPUs
        # Someone else's engine (lifecycle's own answer only the stack): it is probed first
        # (it must serve the model), and joins the pool of a model lifecycle's engines
        # serve only when asked to.
        port = free_port()
        env = {k: v for k, v in stack.env.items() if k != "SAGE_ENGINE_API_KEY"}
        other = subprocess.Popen(
            [sys.executable, "-m", "sage.engines.sim", "--model", "sim", "--port", str(port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_http(f"http://127.0.0.1:{port}/health", other)
            with pytest.raises(ConflictError):
                client.register_engine("sim", f"http://127.0.0.1:{port}")
            external = client.register_engine(
                "sim", f"http://127.0.0.1:{port}", engine_label="e2e-external",
                join_existing_model=True,
            )  # fmt: skip
            assert (external.status, external.pid) == ("RUNNING", None)
            assert client.get_engine(external.engine_id).engine_label == "e2e-external"
            assert client.stop_engine(external.engine_id).status == "STOPPED"
        finally:
            stop_process(other)
        with pytest.raises(EngineNotFoundError):
            client.get_engine("no-such-engine")
        with pytest.raises(InvalidRequestError) as info:
            client.start_engine("sim", backend="no-such-backend")
        assert info.value.param == "backend"


def test_offline_engine_start_says_what_to_do_in_one_line(tmp_path: Path) -> None:
    """No network (a Hub endpoint nothing answers on, an empty Hub cache): `engine start` of a
    Hub model ends at once with one line naming the ways out, and starts no engine."""
    offline = _start_stack(
        tmp_path / "home",
        HF_ENDPOINT=f"http://127.0.0.1:{free_port()}",
        HF_HUB_CACHE=str(tmp_path / "hub"),
    )
    try:
        model = "Qwen/Qwen2.5-0.5B-Instruct"
        started = offline.sage("engine", "start", model, timeout=60)
        assert started.code == 1, started
        lines = (started.stdout + started.stderr).strip().splitlines()
        assert len(lines) == 1, started
        for remedy in ("HF_ENDPOINT", f"sage llm model download {model}", "local model folder"):
            assert remedy in lines[0], started
        listed = offline.sage("engine", "list", "--json")
        assert [e["model_id"] for e in listed.json()["engines"]] == ["sim"]
    finally:
        _stop_stack(offline)
