"""Fixtures for the Prometheus tests: `full_plane` (every service real, sim engines started
through lifecycle, one simulated 80 GiB GPU) tuned so that a few dozen requests queue, and
a real Prometheus (Debian's /usr/bin/prometheus) scraping it. Tests skip, saying why, only
when the prometheus binaries are not installed (scripts/install_system_tools.sh puts them
there)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from sage.common.config.settings import SageSettings
from sage.common.utils.processes import free_port, stop_process, wait_http
from tests.conftest import integration_fixtures

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="prometheus/promtool are not installed (Debian package `prometheus`; "
    "scripts/install_system_tools.sh installs it)",
)

_integration = integration_fixtures()
full_plane = _integration.full_plane

# What the scheduler lets each engine run at once: the rest wait in its queue.
ENGINE_SLOTS = 2
BREAKER_FAILURES = 2


@pytest.fixture
def settings(settings: SageSettings, monkeypatch: pytest.MonkeyPatch) -> SageSettings:
    """The shared test settings with small engine caps (so floods queue), a breaker that
    opens after two failures, and gpu_manager simulating one 80 GiB GPU (its NVML stand-in,
    the boundary a GPU-less host fakes)."""
    monkeypatch.setenv("SAGE_GPU_SIMULATE", "1x80")  # for the processes a test starts
    return settings.model_copy(
        update={
            "gpu_simulate": "1x80",
            "scheduler_max_inflight_per_engine": ENGINE_SLOTS,
            "scheduler_breaker_failures": BREAKER_FAILURES,
            "node_heartbeat_s": 0.5,
        }
    )


PrometheusFactory = Callable[[str, dict[str, str]], Awaitable[str]]


def _launch(home: Path, config: str, files: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    """Write prometheus.yml and `files` into `home`, start Prometheus there on a free
    loopback port and wait until it is ready; returns it and its base URL."""
    assert PROMETHEUS is not None
    home.mkdir()
    (home / "prometheus.yml").write_text(config)
    for name, text in files.items():
        (home / name).write_text(text)
    port = free_port()
    with open(home / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={home / 'prometheus.yml'}",
                f"--storage.tsdb.path={home / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=home,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/-/ready", proc)
    except BaseException:
        stop_process(proc)
        raise
    return proc, base


@pytest.fixture
async def prometheus(tmp_path: Path) -> AsyncIterator[PrometheusFactory]:
    """Starts real Prometheus servers (prometheus.yml text and the files beside it, rule
    files for instance); returns each one's base URL. Stopped, and checked, at the end."""
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    async def start(config: str, files: dict[str, str]) -> str:
        home = tmp_path / f"prometheus-{len(procs)}"
        proc, base = await asyncio.to_thread(_launch, home, config, files)
        procs.append((proc, home))
        return base

    yield start
    for proc, home in procs:
        assert stop_process(proc) == 0, (home / "prometheus.log").read_text()
