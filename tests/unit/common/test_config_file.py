"""The SAGE_CONFIG file (`sage llm serve --config`): a place for scheduler and other settings."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from sage.common.config.settings import SageSettings
from sage.common.config.values import AutoscaleRule
from sage.common.exceptions import ConfigurationError
from sage.common.grpc import create_sync_channel, process_token
from sage.common.utils.processes import free_port, stop_process
from sage.llm.cli import main
from sage.rpc.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in list(os.environ):
        if var.startswith("SAGE_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("SAGE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # no stray .env


def _config(tmp_path: Path, text: str, name: str = "sage.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_sections_flatten_into_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _config(
        tmp_path,
        "scheduler:\n  policy: slo_aware\n  routing: least_loaded\n"
        "  max-inflight-per-engine: 4\nautoscale: 'sim:1:3'\ngateway_port: 9999\n",
    )
    monkeypatch.setenv("SAGE_CONFIG", str(path))
    s = SageSettings()
    assert (s.scheduler_policy, s.scheduler_routing) == ("slo_aware", "least_loaded")
    assert s.scheduler_max_inflight_per_engine == 4
    assert s.autoscaler.models == [AutoscaleRule(model="sim", min=1, max=3)]
    assert s.gateway_port == 9999 and s.edge.port == 9999


def test_toml_works_and_env_and_arguments_win(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _config(tmp_path, '[scheduler]\npolicy = "fair"\nrouting = "p2c"\n', "sage.toml")
    monkeypatch.setenv("SAGE_CONFIG", str(path))
    monkeypatch.setenv("SAGE_SCHEDULER_ROUTING", "least_loaded")
    s = SageSettings(scheduler_policy="priority")
    assert s.scheduler_policy == "priority"  # argument > env > file
    assert s.scheduler_routing == "least_loaded"  # env > file
    assert SageSettings().scheduler_policy == "fair"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("scheduler:\n  polcy: fair\n", "unknown setting 'scheduler_polcy'"),
        ("scheduler:\n  polcy: fair\n", "did you mean 'scheduler_policy'"),
        ("scheduler: [1, 2\n", "does not parse"),
        ("- just\n- a list\n", "must hold a mapping"),
    ],
)
def test_a_wrong_file_names_the_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, expected: str
) -> None:
    monkeypatch.setenv("SAGE_CONFIG", str(_config(tmp_path, text)))
    with pytest.raises(ConfigurationError, match=expected):
        SageSettings()


def test_a_missing_file_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGE_CONFIG", str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigurationError, match="cannot read config file"):
        SageSettings()


def _service_env(tmp_path: Path, config: Path) -> dict[str, str]:
    return {
        "SAGE_HOME": str(tmp_path / "home"),
        "SAGE_CONFIG": str(config),
        "SAGE_INTERNAL_TOKEN": process_token(),  # the token this test's channel sends
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    }


def test_the_scheduler_service_runs_the_files_policy(tmp_path: Path) -> None:
    config = _config(tmp_path, "scheduler:\n  policy: fair\n  routing: least_loaded\n")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sage.services.scheduler", "--port", str(port)],
        env=_service_env(tmp_path, config),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        policy = ""
        while time.monotonic() < deadline and not policy:
            with create_sync_channel(f"127.0.0.1:{port}") as channel:
                stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
                try:
                    policy = stub.GetStatus(scheduler_pb2.GetStatusRequest(), timeout=1).policy
                except grpc.RpcError:
                    time.sleep(0.2)
        assert policy.startswith("fair")
    finally:
        stop_process(proc)


def test_a_service_with_a_wrong_file_exits_with_a_message(tmp_path: Path) -> None:
    config = _config(tmp_path, "scheduler:\n  polcy: fair\n")
    out = subprocess.run(
        [sys.executable, "-m", "sage.services.scheduler", "--port", str(free_port())],
        env=_service_env(tmp_path, config),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "unknown setting 'scheduler_polcy'" in out.stderr
    assert "Traceback" not in out.stderr


def test_serve_refuses_an_unknown_policy_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path, "scheduler:\n  policy: fastest\n")
    monkeypatch.setenv("SAGE_CONFIG", "")  # so teardown undoes what serve exports
    assert main(["llm", "serve", "--config", str(config), "--no-embedding"]) == 2
    err = capsys.readouterr().err
    assert "fastest" in err
    assert not (tmp_path / "home" / "llm" / "daemon.json").exists()
    monkeypatch.delenv("SAGE_CONFIG")  # serve exported it for its children
    assert main(["llm", "serve", "--routing", "teleport", "--no-embedding"]) == 2
    assert "teleport" in capsys.readouterr().err


def test_the_readme_example_is_a_valid_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    readme = (Path(__file__).parents[3] / "README.md").read_text()
    block = readme.split("# sage.yaml — sage llm serve --config sage.yaml\n", 1)[1]
    monkeypatch.setenv("SAGE_CONFIG", str(_config(tmp_path, block.split("```", 1)[0])))
    s = SageSettings()
    assert (s.scheduler_policy, s.scheduler_routing) == ("slo_aware", "least_loaded")
    assert s.scheduler_max_queue == 2000 and s.request_timeout_s == 120
