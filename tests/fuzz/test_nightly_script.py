"""scripts/fuzz_nightly.sh without its thousands of cases: the arguments reach pytest as
documented, bad ones stop it before anything runs, and its JSON summary is written."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "fuzz_nightly.sh"


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SAGE_FUZZ_")}
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_arguments_reach_pytest(tmp_path: Path) -> None:
    """Options set the environment the fuzz tests read; what follows `--` goes to pytest."""
    report = tmp_path / "r.json"
    done = _run(
        "--examples", "7", "--report", str(report), "--timeout", "60", "--", "-k", "x y",
        SAGE_FUZZ_DRY_RUN="1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    *variables, python, rest = done.stdout.split(maxsplit=4)
    assert variables == [
        "SAGE_FUZZ_EXAMPLES=7",
        "SAGE_FUZZ_PROFILE=nightly",
        f"SAGE_FUZZ_REPORT={report}",
    ]
    assert python.endswith("python")
    assert rest.split() == [
        *("-m", "pytest", "tests/fuzz", "-q", "-p", "no:cacheprovider"),
        *("-o", "timeout=60", "-k", "x", "y"),
    ]
    defaults = _run(SAGE_FUZZ_DRY_RUN="1")
    assert "SAGE_FUZZ_EXAMPLES=40000 " in defaults.stdout
    assert "SAGE_FUZZ_REPORT=bench/out/fuzz_nightly.json " in defaults.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--examples", "many"], "positive integer"),
        (["--timeout", "0"], "positive integer"),
        (["--examples"], "needs a value"),
        (["-k", "edge"], "unknown argument -k"),
    ],
)
def test_bad_arguments_stop_it(args: list[str], message: str) -> None:
    done = _run(*args, SAGE_FUZZ_DRY_RUN="1")
    assert done.returncode == 2
    assert message in done.stderr
    assert "pytest" not in done.stdout


def test_help_lists_the_options() -> None:
    done = _run("--help")
    assert done.returncode == 0
    assert all(option in done.stdout for option in ("--examples", "--report", "--timeout"))


def test_summary_is_written_as_json(tmp_path: Path) -> None:
    """One quick test through the script: the summary carries the fuzz module's figures and
    pytest's exit code (the full run is the same with thousands of cases)."""
    report = tmp_path / "fuzz.json"
    done = _run(
        "--examples", "20", "--report", str(report), "--",
        "tests/fuzz/test_schemathesis_edge.py", "-k", "test_served_document_is_the_fuzzed_one",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads(report.read_text())
    assert summary["pytest_exit_code"] == 0 and summary["examples_asked"] == 20
    assert summary["cases"] == 0 and summary["server_errors"] == 0
    assert "not_a_server_error" in summary["failures_by_check"]
    assert f"-> {report}" in done.stdout
