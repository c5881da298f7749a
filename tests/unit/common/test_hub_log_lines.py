"""An engine that cannot reach the Hub logs one line per attempt, not four (huggingface_hub
writes each retry as two records, each to its own stderr handler and to ours). Run in a
child process, as an engine runs: configure_logging, then huggingface_hub's own retrying
request against a port nothing listens on (what no network looks like)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sage.common.utils.processes import free_port

pytest.importorskip("huggingface_hub")

ENGINE = """
import sys
from sage.common.utils.logging import configure_logging
configure_logging("test-engine", "INFO")
from huggingface_hub.utils import http_backoff  # imported after logging, as engines do
try:
    http_backoff("HEAD", sys.argv[1], max_retries=3, base_wait_time=0.01, max_wait_time=0.02)
except Exception as exc:
    print(f"error: {type(exc).__name__}", file=sys.stderr)
"""


def test_each_hub_retry_is_one_log_line() -> None:
    url = f"http://127.0.0.1:{free_port()}/Qwen/resolve/main/config.json"
    done = subprocess.run(
        [sys.executable, "-c", ENGINE, url], capture_output=True, text=True, timeout=60
    )
    lines = done.stderr.strip().splitlines()
    retries, final = lines[:-1], lines[-1]
    assert len(retries) == 3, done.stderr
    for n, line in enumerate(retries, start=1):
        assert " WARNING test-engine huggingface_hub.utils._http Hub request failed: " in line
        assert f"HEAD {url}; retrying in " in line and f"[Retry {n}/3]" in line
    assert final == "error: ConnectError"
