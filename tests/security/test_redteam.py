"""The red-team replay (scripts/redteam.py) against a fresh `sage llm serve`: every attack
of issue 16 must meet its secure outcome on the default settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "redteam.py"


@pytest.mark.timeout(600)
def test_redteam_replay_finds_every_attack_refused(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--start", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=560,
    )
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    assert " passed, 0 failed" in proc.stdout
