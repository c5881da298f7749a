"""Fixtures for the backend tests: fake engine programs on PATH, or nothing on PATH."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sage.common.utils.processes import stop_process, wait_http
from sage.services.lifecycle.backends import LaunchPlan
from sage.services.lifecycle.backends import vllm as vllm_module

FAKE_SCRIPT = Path(__file__).resolve().parents[2] / "fakes" / "fake_engines.py"
PROGRAMS = ("vllm", "text-embeddings-router", "infinity_emb")
BIN_ENV_VARS = ("SAGE_VLLM_BIN", "SAGE_VLLM_PYTHON", "SAGE_TEI_BIN", "SAGE_INFINITY_BIN")


@pytest.fixture(autouse=True)
def _fresh_vllm_probes() -> Iterator[None]:
    """Each test sees what is installed now, not what an earlier test's probe cached."""
    vllm_module._probe_cache.clear()
    yield
    vllm_module._probe_cache.clear()


def _skip_if_installed_next_to_python() -> None:
    # Backends prefer a program in this interpreter's bin folder over PATH.
    for name in PROGRAMS:
        if (Path(sys.executable).parent / name).exists():
            pytest.skip(f"a real {name} is installed next to {sys.executable}")


@dataclass(frozen=True)
class FakePrograms:
    """Copies of tests/fakes/fake_engines.py on PATH under the real programs' names."""

    bin_dir: Path
    argv_file: Path

    def path(self, program: str) -> str:
        return str(self.bin_dir / program)

    def recorded(self) -> dict[str, Any]:
        """What the last fake started was given: {"program", "argv", "env"}."""
        doc: dict[str, Any] = json.loads(self.argv_file.read_text())
        return doc


@pytest.fixture
def fake_programs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakePrograms:
    """Fake vllm, text-embeddings-router and infinity_emb first on PATH."""
    _skip_if_installed_next_to_python()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # This interpreter runs the copies, whatever python3 is (or is not) on PATH.
    body = FAKE_SCRIPT.read_text().split("\n", 1)[1]
    for program in PROGRAMS:
        copy = bin_dir / program
        copy.write_text(f"#!{sys.executable}\n{body}")
        copy.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    for var in BIN_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    argv_file = tmp_path / "argv.json"
    monkeypatch.setenv("FAKE_ARGV_FILE", str(argv_file))
    return FakePrograms(bin_dir, argv_file)


@pytest.fixture
def bare_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PATH holds one empty folder and no SAGE_*_BIN is set: no external program exists."""
    _skip_if_installed_next_to_python()
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    for var in BIN_ENV_VARS:
        monkeypatch.delenv(var, raising=False)


@contextmanager
def launched(
    plan: LaunchPlan, port: int, log: Path, *, host: str = "127.0.0.1", timeout: float = 30.0
) -> Iterator[str]:
    """Start the plan's argv with its env (as lifecycle does), wait for its health path,
    yield the base URL; stop it afterwards and check that it is gone."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            plan.argv, env={**os.environ, **plan.env}, stdout=out, stderr=subprocess.STDOUT
        )
    base = f"http://{host}:{port}"
    try:
        wait_http(base + plan.health_path, proc, timeout)
        yield base
    except BaseException:
        sys.stderr.write(log.read_text(errors="replace")[-4000:])
        raise
    finally:
        stop_process(proc)
        assert proc.poll() is not None
