"""The command tree: --help everywhere (with an example), exit codes, serve's flags."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from sage.common.config.ports import SagePorts
from sage.common.config.settings import SageSettings
from sage.llm import cli, supervisor
from sage.llm.cli import ServeOptions, app, main


def _command_paths() -> list[tuple[str, ...]]:
    """Every command and group under `sage`, as argv prefixes."""
    paths: list[tuple[str, ...]] = []

    def walk(command: Any, prefix: tuple[str, ...]) -> None:
        paths.append(prefix)
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            walk(sub, (*prefix, name))

    walk(typer.main.get_command(app), ())
    return paths


COMMANDS = _command_paths()


def test_the_tree_has_every_command() -> None:
    leaves = {" ".join(p) for p in COMMANDS}
    for expected in (
        "llm serve", "llm stop", "llm restart", "llm status", "llm logs", "llm gpu",
        "llm engine list", "llm engine start", "llm engine stop", "llm engine prune",
        "llm preset list", "llm preset show", "llm preset apply",
        "llm model download", "llm model show", "llm model list", "llm model list-remote",
        "llm model delete",
    ):  # fmt: skip
        assert expected in leaves


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "sage")
def test_help_has_an_example(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Usage: sage" in result.output
    assert "Example: sage " in result.output


def test_top_level_help_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-h"]) == 0
    out = capsys.readouterr().out
    assert "Exit codes: 0 ok; 1 the operation was tried and failed; 2 usage" in " ".join(
        out.split()
    ).replace("│ ", "")


def test_policy_and_routing_help_name_their_settings_and_choices() -> None:
    result = CliRunner().invoke(app, ["llm", "serve", "--help"], env={"COLUMNS": "250"})
    assert "SAGE_SCHEDULER_POLICY" in result.output and "SAGE_SCHEDULER_ROUTING" in result.output
    assert "slo_aware" in result.output and "least_loaded" in result.output


def test_serve_help_names_the_gateways_routes() -> None:
    result = CliRunner().invoke(app, ["llm", "serve", "--help"], env={"COLUMNS": "250"})
    text = " ".join(result.output.replace("│", " ").split())
    for route in (
        "/v1/chat/completions",
        "/v1/responses",
        "/v1/messages",
        "/tokenize",
        "/v1/rerank",
        "/score",
    ):
        assert route in text, route


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        ([], 2),
        (["llm"], 2),
        (["nope"], 2),
        (["llm", "nope"], 2),
        (["llm", "--help"], 0),
        (["llm", "status"], 1),
        (["llm", "stop"], 1),
        (["llm", "restart"], 1),
        (["llm", "serve", "--backend", "tgi"], 2),
        (["llm", "serve", "--replicas", "0"], 2),
        (["llm", "serve", "--gpu-memory", "1.5"], 2),
        (["llm", "serve", "--port", "0"], 2),
        (["llm", "model", "download"], 2),
        (["llm", "model", "list-remote", "--limit", "0"], 2),
    ],
)
def test_exit_codes(argv: list[str], code: int, sage_home: Path) -> None:
    assert main(argv) == code


def test_exit_codes_through_typer_too(sage_home: Path) -> None:
    """`app` itself (standalone, as CliRunner and `typer` run it) maps codes the same way."""
    runner = CliRunner()
    assert runner.invoke(app, ["llm", "status"]).exit_code == 1
    assert runner.invoke(app, ["llm", "engine", "start"]).exit_code == 2
    refused = runner.invoke(app, ["llm", "engine", "list", "--url", "http://127.0.0.1:9/v1"])
    assert refused.exit_code == 2 and "no SAGE gateway" in refused.output


def test_invalid_setting_is_a_usage_error(
    sage_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SAGE_GATEWAY_PORT", "not-a-port")
    assert main(["llm", "status"]) == 2
    assert "invalid SAGE_* setting" in capsys.readouterr().err


# --- serve's flags ---------------------------------------------------------------------------


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[tuple[ServeOptions, bool]]:
    """Capture what `serve` would run instead of running it."""
    calls: list[tuple[ServeOptions, bool]] = []

    def run_serve(options: ServeOptions, background: bool) -> int:
        calls.append((options, background))
        return 0

    monkeypatch.setattr(cli, "run_serve", run_serve)
    return calls


def test_serve_defaults_are_todays_foreground(served: list[tuple[ServeOptions, bool]]) -> None:
    assert main(["llm", "serve"]) == 0
    assert served == [(ServeOptions(), False)]


def test_serve_every_flag_and_argv_round_trip(served: list[tuple[ServeOptions, bool]]) -> None:
    argv = [
        "llm", "serve", "-m", "Qwen/Qwen2.5-7B-Instruct", "-p", "9001", "--host", "0.0.0.0",
        "--gpu-memory", "0.85", "--max-model-len", "4096", "-tp", "2", "--background",
        "-e", "BAAI/bge-m3", "--embedding-port", "9002", "--replicas", "2",
        "--gateway-port", "9003", "--backend", "vllm", "--startup-timeout", "5",
        "--engine-timeout", "50", "--policy", "fair", "--routing", "prefix", "--insecure",
        "--extra-arg=--dtype=float32", "--extra-arg", "--enforce-eager",
    ]  # fmt: skip
    assert main(argv) == 0
    options, background = served[-1]
    assert background
    assert options == ServeOptions(
        model="Qwen/Qwen2.5-7B-Instruct",
        backend="vllm",
        port=9001,
        replicas=2,
        tensor_parallel=2,
        gpu_memory=0.85,
        max_model_len=4096,
        with_embedding=True,
        embedding_model="BAAI/bge-m3",
        embedding_port=9002,
        gateway_port=9003,
        host="0.0.0.0",
        startup_timeout=5.0,
        engine_timeout=50.0,
        policy="fair",
        routing="prefix",
        insecure=True,
        extra_args=("--dtype=float32", "--enforce-eager"),
    )
    assert options.child_env() == {
        "SAGE_SCHEDULER_POLICY": "fair",
        "SAGE_SCHEDULER_ROUTING": "prefix",
    }
    # What daemon.json records parses back to the same options (restart relies on it).
    assert main(["llm", "serve", *options.argv()]) == 0
    assert served[-1] == (options, False)


def test_serve_flag_aliases(served: list[tuple[ServeOptions, bool]]) -> None:
    assert main(["llm", "serve", "--no-embedding", "--gpu-memory-utilization", "0.5"]) == 0
    assert main(["llm", "serve", "--foreground", "--with-embedding", "--backend", "auto"]) == 0
    (first, _), (second, background) = served
    assert (first.with_embedding, first.gpu_memory) == (False, 0.5)
    assert (second.with_embedding, second.backend, background) == (True, "auto", False)
    assert ServeOptions(with_embedding=False).argv().count("--no-embedding") == 1


def test_serve_plan_carries_engines_argv_and_env(tmp_path: Path) -> None:
    settings = SageSettings(home=tmp_path)
    options = ServeOptions(
        model="sim",
        port=9100,
        replicas=2,
        max_model_len=2048,
        embedding_model="sim-embedding",
        embedding_port=9101,
        policy="fifo",
        extra_args=("--ttft-ms=5",),
    )
    plan = cli._serve_plan(options, settings)
    assert [
        (e.model, e.kind, e.port, e.backend, e.max_model_len, e.extra_args) for e in plan.engines
    ] == [
        ("sim", "llm", 9100, "sim", 2048, ("--ttft-ms=5",)),
        ("sim", "llm", 0, "sim", 2048, ("--ttft-ms=5",)),
        ("sim-embedding", "embedding", 9101, "sim", 0, ()),  # engine flags are the LLM's
    ]
    assert plan.serve_argv == options.argv()
    assert plan.child_env == {"SAGE_SCHEDULER_POLICY": "fifo"}
    assert supervisor._child_env(settings, plan.child_env)["SAGE_SCHEDULER_POLICY"] == "fifo"
    # The daemon record names the flags, so `restart` can repeat them.
    supervisor.Supervisor(plan).write_daemon_file()
    doc = json.loads(supervisor.daemon_file(settings).read_text())
    assert doc["serve_argv"] == options.argv() and doc["pid"] == os.getpid()
    assert (doc["startup_timeout_s"], doc["engine_timeout_s"]) == (60.0, 600.0)


def test_default_llm_port_is_the_recommended_one(tmp_path: Path) -> None:
    plan = cli._serve_plan(ServeOptions(with_embedding=False), SageSettings(home=tmp_path))
    assert plan.engines[0].port == SagePorts.get_recommended_llm_port()


# --- status and restart with a recorded stack --------------------------------------------------


def _record(home: Path, **extra: Any) -> dict[str, Any]:
    doc = {
        "pid": os.getpid(),
        "started_at": 0,
        "gateway_url": "http://127.0.0.1:9/v1",
        "services": {"edge": {"pid": os.getpid(), "port": 9, "addr": "127.0.0.1:9"}},
        "engines": [
            {
                "engine_id": "sim-1",
                "kind": "llm",
                "model": "sim",
                "base_url": "http://127.0.0.1:8/v1",
                "pid": None,
            }
        ],
        **extra,
    }
    (home / "llm").mkdir(parents=True, exist_ok=True)
    (home / "llm" / "daemon.json").write_text(json.dumps(doc))
    return doc


def test_status_reads_daemon_json(sage_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _record(sage_home)
    assert main(["llm", "status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == doc
    assert main(["llm", "status"]) == 0
    out = capsys.readouterr().out
    assert "gateway: http://127.0.0.1:9/v1" in out and "engine sim-1" in out


def test_restart_needs_recorded_flags(sage_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _record(sage_home)  # "running" as this very process: restart must refuse before stopping
    assert main(["llm", "restart"]) == 2
    assert "did not record its serve flags" in capsys.readouterr().err


def test_background_refuses_a_second_stack(
    sage_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _record(sage_home)
    assert main(["llm", "serve", "--background", "--no-embedding"]) == 2
    assert "already running" in capsys.readouterr().err


def test_usage_error_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["llm", "engine", "start", "m", "--tensor-parallel", "x"]) == 2
    _, err = capsys.readouterr()
    lines = err.splitlines()
    assert lines[0].startswith("Usage: sage llm engine start")
    assert lines[-1].startswith("error: ") and "--tensor-parallel" in lines[-1]
