"""Issue 16, "bind-all without keys": `sage llm serve --host 0.0.0.0` used to start the edge,
gRPC and engines on every interface with no key and no warning. A non-loopback bind now needs
the credential that guards the listener and TLS; without them serve, the edge and each gRPC
service exit 2 naming what is missing before anything listens, and `--insecure`
(SAGE_INSECURE=1) starts them with a loud warning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from sage.common.bind_policy import check_bind
from sage.common.config.ports import SagePorts
from sage.common.config.settings import SageSettings
from sage.common.exceptions import ConfigurationError
from sage.common.security import ensure_secret_file
from sage.common.utils.processes import free_port, stop_process

pytestmark = pytest.mark.timeout(120)


def _settings(home: Path, **values: object) -> SageSettings:
    return SageSettings(home=home, **values)  # type: ignore[arg-type]


def _env(home: Path, **extra: str) -> dict[str, str]:
    """The test runner's environment without any SAGE_*/OPENAI_* setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGE_", "OPENAI_"))}
    env.update({"SAGE_HOME": str(home), "SAGE_DISABLE_NVML": "1", "PYTHONUNBUFFERED": "1", **extra})
    return env


def _assert_names_what_is_missing(text: str) -> None:
    assert "refusing to listen on 0.0.0.0" in text, text
    assert "admin key" in text and "SAGE_ADMIN_API_KEY" in text, text
    assert "TLS" in text and "SAGE_TLS_CERT_FILE" in text, text
    assert "--insecure" in text and "SAGE_INSECURE=1" in text, text


# --- the rule ---------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_needs_nothing(tmp_path: Path, host: str) -> None:
    settings = _settings(tmp_path)
    assert check_bind(settings, host, "edge", "edge") is None
    assert check_bind(settings, host, "scheduler", "grpc") is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7", "gateway.example"])
def test_other_addresses_without_key_and_tls_are_refused(tmp_path: Path, host: str) -> None:
    with pytest.raises(ConfigurationError) as refused:
        check_bind(_settings(tmp_path), host, "edge", "edge")
    message = refused.value.message
    assert "admin key" in message and "TLS" in message and "--insecure" in message
    assert host in message


def test_each_missing_piece_is_named_alone(tmp_path: Path) -> None:
    # A key but no TLS: only TLS is missing.
    with pytest.raises(ConfigurationError) as no_tls:
        check_bind(_settings(tmp_path, admin_api_key="sk-admin-x"), "0.0.0.0", "edge", "edge")
    assert "TLS" in no_tls.value.message and "admin key" not in no_tls.value.message
    # TLS but no key: only the key is missing.
    tls = {"tls_cert_file": "/etc/tls/c.pem", "tls_key_file": "/etc/tls/k.pem"}
    with pytest.raises(ConfigurationError) as no_key:
        check_bind(_settings(tmp_path, **tls), "0.0.0.0", "edge", "edge")
    assert "admin key" in no_key.value.message and "TLS (" not in no_key.value.message
    # Both: allowed, no warning.
    both = _settings(tmp_path, admin_api_key="sk-admin-x", **tls)
    assert check_bind(both, "0.0.0.0", "edge", "edge") is None


def test_the_key_file_counts_and_a_too_open_one_is_an_error(tmp_path: Path) -> None:
    settings = _settings(tmp_path, tls_cert_file="/c.pem", tls_key_file="/k.pem")
    assert ensure_secret_file(settings.llm_state_dir / "admin.key", prefix="sk-admin-")
    assert check_bind(settings, "0.0.0.0", "edge", "edge") is None
    (settings.llm_state_dir / "admin.key").chmod(0o644)
    with pytest.raises(ConfigurationError, match="readable by other users"):
        check_bind(settings, "0.0.0.0", "edge", "edge")


def test_grpc_services_need_the_internal_token_and_tls(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as refused:
        check_bind(_settings(tmp_path), "0.0.0.0", "scheduler", "grpc")
    assert "internal token" in refused.value.message and "TLS" in refused.value.message
    allowed = _settings(
        tmp_path, internal_token="t" * 32, tls_cert_file="/c.pem", tls_key_file="/k.pem"
    )
    assert check_bind(allowed, "0.0.0.0", "scheduler", "grpc") is None


def test_insecure_allows_with_a_warning(tmp_path: Path) -> None:
    warning = check_bind(_settings(tmp_path, insecure=True), "0.0.0.0", "edge", "edge")
    assert warning is not None and warning.startswith("INSECURE: edge listens on 0.0.0.0")
    assert "admin key" in warning and "TLS" in warning


# --- the processes ------------------------------------------------------------------------


def _sage(home: Path, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sage.llm.cli", "llm", *argv],
        env=_env(home, **env),
        capture_output=True,
        text=True,
        timeout=90,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("mode", ["--foreground", "--background"])
def test_serve_on_every_interface_without_key_or_tls_exits_2_before_starting(
    tmp_path: Path, mode: str
) -> None:
    home = tmp_path / "sage"
    gateway = free_port()
    done = _sage(
        home, "serve", mode, "--host", "0.0.0.0", "--no-embedding", "--gateway-port", str(gateway)
    )
    assert done.returncode == 2, done
    _assert_names_what_is_missing(done.stdout + done.stderr)
    # Nothing was started or created: no child (no logs), no key files, no daemon.json.
    state = home / "llm"
    assert not (state / "logs").exists(), list(state.rglob("*"))
    assert not (state / "admin.key").exists() and not (state / "daemon.json").exists()
    assert SagePorts.is_available(gateway, "0.0.0.0", timeout=0.3)


def test_edge_and_grpc_services_on_every_interface_exit_2(tmp_path: Path) -> None:
    home = tmp_path / "sage"
    edge = subprocess.run(
        [sys.executable, "-m", "sage.services.edge", "--host", "0.0.0.0", "--port", "0"],
        env=_env(home),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert edge.returncode == 2, edge
    assert edge.stderr.startswith("edge: cannot start: refusing"), edge.stderr
    _assert_names_what_is_missing(edge.stderr)
    # A gRPC service started alone, bound through SAGE_HOST: its token exists (it makes
    # one in SAGE_HOME), TLS does not.
    grpc_service = subprocess.run(
        [sys.executable, "-m", "sage.services.gpu_manager", "--port", "0"],
        env=_env(home, SAGE_HOST="0.0.0.0"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert grpc_service.returncode == 2, grpc_service
    assert "gpu_manager: cannot start: refusing to listen on 0.0.0.0" in grpc_service.stderr
    assert "TLS" in grpc_service.stderr and "--insecure" in grpc_service.stderr


def _listen_addresses(pid: int) -> set[str]:
    return {
        conn.laddr.ip
        for conn in psutil.Process(pid).net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN
    }


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        stop_process(proc)


def _start(
    procs: list[subprocess.Popen[bytes]], argv: list[str], env: dict[str, str], log: Path
) -> subprocess.Popen[bytes]:
    with open(log, "wb") as sink:
        proc = subprocess.Popen(argv, env=env, stdout=sink, stderr=subprocess.STDOUT)
    procs.append(proc)
    deadline = time.monotonic() + 60
    while not _listen_addresses(proc.pid):
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    return proc


def test_insecure_edge_and_service_start_with_a_loud_warning(
    tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    home = tmp_path / "sage"
    port = free_port()
    edge_log = tmp_path / "edge.log"
    edge = _start(
        started,
        [sys.executable, "-m", "sage.services.edge", "--host", "0.0.0.0", "--port", str(port)],
        _env(home, SAGE_INSECURE="1"),
        edge_log,
    )
    assert _listen_addresses(edge.pid) == {"0.0.0.0"}
    # It answers (the scheduler is not running: any HTTP status will do).
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5, trust_env=False).status_code
    text = edge_log.read_text()
    assert "WARNING" in text and "INSECURE: edge listens on 0.0.0.0" in text, text

    service_log = tmp_path / "gpu_manager.log"
    service = _start(
        started,
        [sys.executable, "-m", "sage.services.gpu_manager", "--insecure", "--port", "0"],
        _env(home, SAGE_HOST="0.0.0.0"),
        service_log,
    )
    assert _listen_addresses(service.pid) <= {"0.0.0.0", "::"}
    assert "INSECURE: gpu_manager listens on 0.0.0.0" in service_log.read_text()


def test_loopback_default_starts_without_warning(
    tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    log = tmp_path / "edge.log"
    edge = _start(
        started,
        [sys.executable, "-m", "sage.services.edge", "--port", str(free_port())],
        _env(tmp_path / "sage"),
        log,
    )
    assert _listen_addresses(edge.pid) == {"127.0.0.1"}
    assert "INSECURE" not in log.read_text()


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_serve_insecure_starts_on_every_interface_and_says_so(tmp_path: Path) -> None:
    home = tmp_path / "sage"
    gateway = free_port()
    env = _env(
        home,
        SAGE_SCHEDULER_PORT=str(free_port()),
        SAGE_LIFECYCLE_PORT=str(free_port()),
        SAGE_GPU_MANAGER_PORT=str(free_port()),
        SAGE_EMBEDDING_SERVICE_PORT=str(free_port()),
    )
    argv = [
        sys.executable, "-m", "sage.llm.cli", "llm", "serve", "--host", "0.0.0.0", "--insecure",
        "--no-embedding", "--gateway-port", str(gateway), "--port", str(free_port()),
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        while not any("gateway listening" in line for line in output[-1:]):
            line = proc.stdout.readline()
            assert line and time.monotonic() < deadline, "".join(output)
            output.append(line)
        said = "".join(output)
        assert "WARNING: INSECURE: sage llm serve listens on 0.0.0.0" in said, said
        doc = json.loads((home / "llm" / "daemon.json").read_text())
        assert doc["insecure"] is True and "--insecure" in doc["serve_argv"]  # for restart
        edge_pid = doc["services"]["edge"]["pid"]
        assert _listen_addresses(edge_pid) == {"0.0.0.0"}
        assert "INSECURE: edge listens" in (home / "llm" / "logs" / "edge.log").read_text()
        reply = httpx.get(f"http://127.0.0.1:{gateway}/v1/models", timeout=10, trust_env=False)
        assert reply.status_code == 200, reply.text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
