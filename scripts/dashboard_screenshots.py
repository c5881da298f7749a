"""Write the README's dashboard screenshots (docs/img/dashboard*.png).

Runs the browser test against a real stack (tests/dashboard, Debian chromium) with
SAGE_DASHBOARD_SCREENSHOTS set, so the pictures come from the same stack, data and page
the test checks; in that mode the test also sends about a minute of traffic first, so the
charts have some history. Usage: `python scripts/dashboard_screenshots.py [OUT_DIR]`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    """Run the test in screenshot mode; its exit status is ours."""
    out = Path(argv[0]) if argv else ROOT / "docs" / "img"
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SAGE_DASHBOARD_SCREENSHOTS": str(out.resolve())}
    test = "tests/dashboard/test_dashboard.py::test_dashboard_in_a_browser"
    command = [sys.executable, "-m", "pytest", test, "-q", "-p", "no:cacheprovider"]
    status = subprocess.call([*command, "--timeout", "300"], cwd=ROOT, env=env)
    if status == 0:
        for shot in sorted(out.glob("dashboard*.png")):
            print(shot.relative_to(ROOT) if shot.is_relative_to(ROOT) else shot)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
