"""Shared fixtures: free ports, real engine subprocesses, real gRPC servers on port 0."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from sage.common.config.settings import SageSettings
from sage.common.etcd.testing import EtcdMembers, etcd_binary
from sage.common.grpc.auth import set_process_token
from sage.common.security import new_secret
from sage.common.utils.processes import free_port, stop_process, wait_http


@pytest.fixture(scope="session", autouse=True)
def internal_token() -> Iterator[str]:
    """The stack's internal gRPC token for the run: every in-process server demands it and
    every channel sends it (as a service's main sets it), so no test resolves or creates one
    under the real ~/.sage. Service subprocesses a test talks to get it as
    SAGE_INTERNAL_TOKEN."""
    token = new_secret()
    set_process_token(token)
    yield token
    set_process_token(None)


@pytest.fixture
def settings(tmp_path: Path) -> SageSettings:
    """Settings isolated to a temp SAGE_HOME, with NVML off on hosts without a GPU."""
    return SageSettings(
        home=tmp_path / "sage",
        rpc_timeout_s=10.0,
        request_timeout_s=30.0,
        disable_nvml=not Path("/dev/nvidia0").exists(),
        # test engines are sims on loopback, registered as external engines
        external_engine_allow="127.0.0.1",
    )


SimFactory = Callable[..., str]


class _SimLauncher:
    """Starts `python -m sage.engines.sim` subprocesses and stops them all at the end."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def __call__(self, *args: str, model: str = "sim") -> str:
        port = free_port()
        with open(self.log_dir / f"sim-{port}.log", "wb") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "sage.engines.sim",
                    "--model",
                    model,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    *args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/health", proc)
        return base

    def stop(self) -> None:
        for proc in self.procs:
            stop_process(proc)


@pytest.fixture
def sim_engine(tmp_path: Path) -> Iterator[SimFactory]:
    """Start simulator engines for one test; returns their base URLs."""
    launcher = _SimLauncher(tmp_path)
    yield launcher
    launcher.stop()


@pytest.fixture(scope="module")
def module_sim_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimFactory]:
    """Like sim_engine, but the engines live for the whole test module (cheaper)."""
    launcher = _SimLauncher(tmp_path_factory.mktemp("sims"))
    yield launcher
    launcher.stop()


@pytest.fixture
def no_leaked_children() -> Iterator[None]:
    """Fail the test if it leaves child processes of the test runner behind."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        extra = [
            p
            for p in psutil.Process().children(recursive=True)
            if p.pid not in before and p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        ]
        if not extra:
            return
        time.sleep(0.2)
    raise AssertionError(f"child processes left behind: {[p.cmdline() for p in extra]}")


@pytest.fixture
def port_factory() -> Callable[[], int]:
    """Hands out free TCP ports on 127.0.0.1."""
    return free_port


def integration_fixtures() -> Any:
    """tests/integration/conftest.py as a module, so conftests of other folders can reuse its
    fixtures (`control_plane`, `full_plane`); loaded once per session."""
    name = "sage_tests_integration_fixtures"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).parent / "integration" / "conftest.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


async def served_by_engine(urls: dict[str, str]) -> dict[str, float]:
    """Finished requests per engine (id -> base URL), from each engine's own
    vllm:request_success_total: which engine served a request, as the engine saw it."""
    counts: dict[str, float] = {}
    async with httpx.AsyncClient(timeout=10) as http:
        for engine_id, url in urls.items():
            text = (await http.get(url + "/metrics")).text
            counts[engine_id] = sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("vllm:request_success_total")
            )
    return counts


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdMembers]:
    """One real etcd member for the module (a skip where etcd is not installed); each test
    writes under a prefix of its own."""
    if etcd_binary() is None:
        pytest.skip("etcd is not installed (scripts/install_system_tools.sh)")
    members = EtcdMembers(tmp_path_factory.mktemp("etcd"), hosts=["127.0.0.1"])
    members.start()
    members.wait_healthy()
    yield members
    members.stop()


@pytest.fixture
def etcd_members(tmp_path: Path) -> Iterator[Callable[[int], EtcdMembers]]:
    """`etcd_members(n)` starts an n-member cluster of its own and waits for its leader."""
    if etcd_binary() is None:
        pytest.skip("etcd is not installed (scripts/install_system_tools.sh)")
    started: list[EtcdMembers] = []

    def start(n: int) -> EtcdMembers:
        members = EtcdMembers(tmp_path / f"etcd{len(started)}", hosts=["127.0.0.1"] * n)
        started.append(members)
        members.start()
        members.wait_healthy()
        return members

    yield start
    for members in started:
        members.stop()
