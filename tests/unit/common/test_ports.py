"""SagePorts: constants, env overrides, WSL detection and real-socket port probing."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from sage.common.config import SagePorts as ReexportedSagePorts
from sage.common.config.ports import SagePorts


@pytest.fixture
def listening_socket() -> Iterator[tuple[socket.socket, int]]:
    """A real TCP listener on 127.0.0.1 at an OS-chosen port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    try:
        yield sock, sock.getsockname()[1]
    finally:
        sock.close()


@pytest.fixture
def not_wsl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SagePorts, "is_wsl", staticmethod(lambda *a, **k: False))


@pytest.fixture
def on_wsl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SagePorts, "is_wsl", staticmethod(lambda *a, **k: True))


def test_constants() -> None:
    assert SagePorts.GATEWAY_DEFAULT == 8889
    assert SagePorts.LLM_DEFAULT == 8001
    assert SagePorts.LLM_SECONDARY == 8002
    assert SagePorts.LLM_WSL_FALLBACK == 8901
    assert SagePorts.EMBEDDING_DEFAULT == 8090
    assert SagePorts.EMBEDDING_SECONDARY == 8091
    assert SagePorts.BENCHMARK_LLM == 8901
    assert SagePorts.BENCHMARK_EMBEDDING == 8902
    assert SagePorts.BENCHMARK_API == 8903
    assert SagePorts.STUDIO_FRONTEND == 5173
    assert SagePorts.SCHEDULER_GRPC == 50051
    assert SagePorts.LIFECYCLE_GRPC == 50052
    assert SagePorts.GPU_MANAGER_GRPC == 50053
    assert SagePorts.EMBEDDING_GRPC == 50054
    assert ReexportedSagePorts is SagePorts


def test_cannot_instantiate() -> None:
    with pytest.raises(TypeError, match="cannot be instantiated"):
        SagePorts()


def test_known_ports_cover_every_constant() -> None:
    names = {n for n in vars(SagePorts) if n.isupper() and not n.startswith("_")}
    assert {name for name, _, _ in SagePorts.known_ports()} == names
    for _name, port, purpose in SagePorts.known_ports():
        assert 1 <= port <= 65535
        assert purpose


def test_seed_example_verbatim(capsys: pytest.CaptureFixture[str]) -> None:
    from sage.common.config.ports import SagePorts

    # 统一端口常量(不要硬编码)
    PORT_MAP = {
        "Gateway": (SagePorts.GATEWAY_DEFAULT, "OpenAI 兼容 API"),
        "LLM": (SagePorts.LLM_DEFAULT, "主推理服务"),
        "Embedding": (SagePorts.EMBEDDING_DEFAULT, "Embedding Server"),
        "Benchmark": (SagePorts.BENCHMARK_LLM, "WSL2 fallback / benchmark"),
    }
    recommended = SagePorts.get_recommended_llm_port()
    print(f"LLM 在此机器使用端口: {recommended}")
    if SagePorts.is_wsl():
        # 8001 在 WSL2 可能出现监听但拒绝连接 → 回退 8901
        recommended = SagePorts.LLM_WSL_FALLBACK

    if SagePorts.is_wsl():  # noqa: SIM108 - the seed's code, verbatim
        llm_port = SagePorts.LLM_WSL_FALLBACK  # 8901
    else:
        llm_port = SagePorts.LLM_DEFAULT  # 8001
    print(
        "启动命令:",
        f"sage llm serve --port {llm_port} --embedding-port {SagePorts.EMBEDDING_DEFAULT}",
    )
    assert PORT_MAP["Gateway"][0] == 8889
    assert recommended in (8001, 8901)
    out = capsys.readouterr().out
    assert "--embedding-port 8090" in out


# --- env ------------------------------------------------------------------------------


def test_get_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAGE_TEST_PORT", raising=False)
    assert SagePorts.get_from_env("SAGE_TEST_PORT", 1234) == 1234
    monkeypatch.setenv("SAGE_TEST_PORT", "  ")
    assert SagePorts.get_from_env("SAGE_TEST_PORT", 1234) == 1234
    monkeypatch.setenv("SAGE_TEST_PORT", " 4321 ")
    assert SagePorts.get_from_env("SAGE_TEST_PORT", 1234) == 4321


@pytest.mark.parametrize("bad", ["abc", "80.5", "0", "-1", "65536", "99999"])
def test_get_from_env_rejects_bad_values(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv("SAGE_TEST_PORT", bad)
    with pytest.raises(ValueError, match="SAGE_TEST_PORT"):
        SagePorts.get_from_env("SAGE_TEST_PORT", 1234)


@pytest.mark.parametrize(
    ("service", "env_var", "default"),
    [
        ("scheduler", "SAGE_SCHEDULER_PORT", 50051),
        ("lifecycle", "SAGE_LIFECYCLE_PORT", 50052),
        ("gpu_manager", "SAGE_GPU_MANAGER_PORT", 50053),
        ("gpu-manager", "SAGE_GPU_MANAGER_PORT", 50053),
        ("embedding", "SAGE_EMBEDDING_SERVICE_PORT", 50054),
    ],
)
def test_grpc_port(
    monkeypatch: pytest.MonkeyPatch, service: str, env_var: str, default: int
) -> None:
    monkeypatch.delenv(env_var, raising=False)
    assert SagePorts.grpc_port(service) == default
    assert SagePorts.grpc_env_var(service) == env_var
    monkeypatch.setenv(env_var, "60000")
    assert SagePorts.grpc_port(service) == 60000
    monkeypatch.setenv(env_var, "nope")
    with pytest.raises(ValueError, match=env_var):
        SagePorts.grpc_port(service)


def test_grpc_port_unknown_service() -> None:
    with pytest.raises(ValueError, match="unknown gRPC service 'edge'"):
        SagePorts.grpc_port("edge")


# --- WSL ------------------------------------------------------------------------------


def test_is_wsl_reads_proc_version(tmp_path: Path) -> None:
    wsl = tmp_path / "wsl"
    wsl.write_text("Linux version 5.15.90.1-microsoft-standard-WSL2 (gcc ...)\n")
    native = tmp_path / "native"
    native.write_text("Linux version 6.8.0-45-generic (buildd@lcy02) #45-Ubuntu SMP\n")
    upper = tmp_path / "upper"
    upper.write_text("Linux version 4.4.0-19041-Microsoft\n")
    assert SagePorts.is_wsl(wsl) is True
    assert SagePorts.is_wsl(str(upper)) is True
    assert SagePorts.is_wsl(native) is False
    assert SagePorts.is_wsl(tmp_path / "missing") is False
    assert SagePorts.is_wsl(tmp_path) is False  # a directory is unreadable as a file
    assert isinstance(SagePorts.is_wsl(), bool)


@pytest.mark.usefixtures("not_wsl")
def test_recommended_and_port_lists_native() -> None:
    assert SagePorts.get_recommended_llm_port() == 8001
    assert SagePorts.get_llm_ports() == [8001, 8002, 8901]
    assert SagePorts.get_embedding_ports() == [8090, 8091]
    assert SagePorts.get_benchmark_ports() == [8901, 8902, 8903]


@pytest.mark.usefixtures("on_wsl")
def test_recommended_and_port_lists_wsl() -> None:
    assert SagePorts.get_recommended_llm_port() == 8901
    assert SagePorts.get_llm_ports() == [8901, 8001, 8002]


# --- real sockets ---------------------------------------------------------------------


def test_is_available_with_real_listener(listening_socket: tuple[socket.socket, int]) -> None:
    sock, port = listening_socket
    assert SagePorts.is_available(port, host="127.0.0.1") is False
    assert SagePorts.is_available(port) is False  # "localhost" reaches 127.0.0.1 too
    sock.close()
    assert SagePorts.is_available(port, host="127.0.0.1") is True


def test_is_available_rejects_invalid_port() -> None:
    with pytest.raises(ValueError, match="65535"):
        SagePorts.is_available(70000)
    with pytest.raises(ValueError):
        SagePorts.is_available(0)


def test_find_available_port_skips_listener(listening_socket: tuple[socket.socket, int]) -> None:
    _sock, port = listening_socket
    if port + 20 > 65535:
        pytest.skip("ephemeral port too close to the top of the range")
    found = SagePorts.find_available_port(port, port + 20, host="127.0.0.1")
    assert port < found <= port + 20


def test_find_available_port_raises_naming_range(
    listening_socket: tuple[socket.socket, int],
) -> None:
    _sock, port = listening_socket
    with pytest.raises(RuntimeError, match=f"{port}-{port}"):
        SagePorts.find_available_port(port, port, host="127.0.0.1")


def test_find_available_port_checks_by_binding() -> None:
    """A bound but not listening socket refuses connections; binding must still see it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        assert SagePorts.is_available(port, host="127.0.0.1") is True  # nothing accepts
        with pytest.raises(RuntimeError, match="no available port"):
            SagePorts.find_available_port(port, port, host="127.0.0.1")
    finally:
        sock.close()


def test_find_available_port_returns_free_port() -> None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    end = min(port + 20, 65535)
    found = SagePorts.find_available_port(port, end, host="127.0.0.1")
    assert port <= found <= end
    # the port really is bindable
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", found))


def test_find_available_port_validates_range() -> None:
    with pytest.raises(ValueError, match="start"):
        SagePorts.find_available_port(9000, 8999)
    with pytest.raises(ValueError):
        SagePorts.find_available_port(0, 10)


def test_check_port_status_in_use(listening_socket: tuple[socket.socket, int]) -> None:
    _sock, port = listening_socket
    status = SagePorts.check_port_status(port, host="127.0.0.1")
    assert status["port"] == port
    assert status["available"] is False
    assert status["in_use"] is True
    if status["pid"] is not None:  # psutil could tell
        assert status["pid"] == os.getpid()
        assert status["process"] is None or isinstance(status["process"], str)


def test_check_port_status_free() -> None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    status = SagePorts.check_port_status(port, host="127.0.0.1")
    assert status == {
        "port": port,
        "host": "127.0.0.1",
        "available": True,
        "in_use": False,
        "pid": None,
        "process": None,
    }


def test_diagnose_reports_all_known_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGE_SCHEDULER_PORT", "bogus")
    monkeypatch.setenv("SAGE_LIFECYCLE_PORT", "50999")
    report = SagePorts.diagnose(host="127.0.0.1", timeout=0.2)
    by_name = {p["name"]: p for p in report["ports"]}
    assert set(by_name) == {name for name, _, _ in SagePorts.known_ports()}
    assert by_name["GATEWAY_DEFAULT"]["port"] == 8889
    assert by_name["LIFECYCLE_GRPC"]["port"] == 50999
    assert by_name["SCHEDULER_GRPC"]["port"] == 50051
    assert "SAGE_SCHEDULER_PORT" in (by_name["SCHEDULER_GRPC"]["error"] or "")
    assert report["recommended_llm_port"] in (8001, 8901)
    for p in report["ports"]:
        assert p["available"] is not p["in_use"]
    text = SagePorts.format_diagnosis(report)
    assert "GATEWAY_DEFAULT" in text
    assert "8889" in text
    assert "error" in text
