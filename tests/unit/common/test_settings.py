"""SageSettings precedence: argument > env > .env > a live stack's daemon.json > defaults."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sage.common.config.ports import SagePorts
from sage.common.config.settings import SageSettings, load_settings


def _daemon(home: Path, pid: int, gateway: int = 9999) -> None:
    (home / "llm").mkdir(parents=True, exist_ok=True)
    (home / "llm" / "daemon.json").write_text(
        json.dumps(
            {
                "pid": pid,
                "llm_port": 9001,
                "embedding_port": 9090,
                "services": {"edge": {"port": gateway}, "scheduler": {"port": 59051}},
            }
        )
    )


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("SAGE_GATEWAY_PORT", "SAGE_SCHEDULER_PORT", "SAGE_LLM_PORT", "SAGE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env


def test_defaults_come_from_sageports(tmp_path: Path) -> None:
    s = SageSettings(home=tmp_path)
    assert s.gateway_port == SagePorts.GATEWAY_DEFAULT
    assert s.address("scheduler") == f"127.0.0.1:{SagePorts.SCHEDULER_GRPC}"


def test_live_daemon_file_beats_defaults(tmp_path: Path) -> None:
    import os

    _daemon(tmp_path, os.getpid())
    s = SageSettings(home=tmp_path)
    assert (s.gateway_port, s.scheduler_port, s.llm_port, s.embedding_port) == (
        9999,
        59051,
        9001,
        9090,
    )


def test_stale_daemon_file_is_ignored(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _daemon(tmp_path, dead.pid)
    assert SageSettings(home=tmp_path).gateway_port == SagePorts.GATEWAY_DEFAULT


def test_env_beats_daemon_file_and_argument_beats_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    _daemon(tmp_path, os.getpid())
    monkeypatch.setenv("SAGE_HOME", str(tmp_path))
    monkeypatch.setenv("SAGE_GATEWAY_PORT", "7777")
    assert load_settings().gateway_port == 7777
    assert load_settings(gateway_port=6666).gateway_port == 6666
    assert load_settings().scheduler_port == 59051  # from daemon.json via SAGE_HOME


def test_dotenv_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("SAGE_GATEWAY_PORT=7001\n")
    assert SageSettings(home=tmp_path).gateway_port == 7001


def test_bad_env_value_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    monkeypatch.setenv("SAGE_GATEWAY_PORT", "eighty")
    with pytest.raises(ValidationError) as info:
        SageSettings(home=tmp_path)
    assert "gateway_port" in str(info.value)
