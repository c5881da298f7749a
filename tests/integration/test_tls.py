"""TLS and mTLS between real service processes and on the HTTPS edge.

Certificates are made per test module by a throwaway CA (the `cryptography` package); the
services run as `python -m sage.services.<name>` child processes configured only by
SAGE_TLS_* variables, exactly as a deployment configures them.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sage.common.config.settings import SageSettings
from sage.common.exceptions import ConfigurationError
from sage.common.grpc import (
    TlsConfig,
    create_channel,
    from_rpc_error,
    process_token,
    tls_from_settings,
)
from sage.common.utils.processes import stop_process
from sage.rpc.common.v1 import common_pb2
from sage.rpc.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from tests.conftest import SimFactory

pytestmark = pytest.mark.usefixtures("no_leaked_children")


# --- a throwaway PKI -----------------------------------------------------------------------
def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _make_ca(path: Path, common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write(path, cert, key)
    return cert, key


def _make_leaf(
    path: Path, common_name: str, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]
) -> None:
    """A certificate for both roles (server and client), as one node's services use it."""
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.DNSName("sage.internal"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca[1], hashes.SHA256())
    )
    _write(path, cert, key)


@dataclass(frozen=True)
class Pki:
    """Paths of the test PKI: our CA, a node cert from it, and an unrelated CA + cert."""

    ca: Path
    cert: Path
    key: Path
    other_ca: Path
    other_cert: Path
    other_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """One CA and node certificate per module; generating keys costs little, but not zero."""
    root = tmp_path_factory.mktemp("pki")
    ca = _make_ca(root / "ca", "sage test CA")
    _make_leaf(root / "node", "sage node", ca)
    other = _make_ca(root / "other-ca", "some other CA")
    _make_leaf(root / "other-node", "other node", other)
    return Pki(
        root / "ca.crt",
        root / "node.crt",
        root / "node.key",
        root / "other-ca.crt",
        root / "other-node.crt",
        root / "other-node.key",
    )


def _tls_env(pki: Pki, *, client_auth: bool = False) -> dict[str, str]:
    return {
        "SAGE_TLS_CERT_FILE": str(pki.cert),
        "SAGE_TLS_KEY_FILE": str(pki.key),
        "SAGE_TLS_CA_FILE": str(pki.ca),
        "SAGE_TLS_CLIENT_AUTH": "true" if client_auth else "false",
    }


def _client_tls(ca: Path, cert: Path | None = None, key: Path | None = None) -> TlsConfig:
    return tls_from_settings(
        SageSettings(
            tls_ca_file=str(ca),
            tls_cert_file=str(cert or ""),
            tls_key_file=str(key or ""),
        )
    )


# --- service processes -----------------------------------------------------------------------
Launch = Callable[..., tuple[subprocess.Popen[bytes], int]]


def _base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGE_")}
    env.update({"SAGE_HOME": str(home), "SAGE_DISABLE_NVML": "true", "SAGE_LOG_LEVEL": "WARNING"})
    env["SAGE_INTERNAL_TOKEN"] = process_token()  # the token this test's channels send
    return env


def _wait_grpc_healthy(
    proc: subprocess.Popen[bytes], port: int, tls: TlsConfig, timeout: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout
    creds = tls.channel_credentials()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"service exited with {proc.returncode} while starting")
        with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=1.0
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        time.sleep(0.1)
    raise TimeoutError(f"service on {port} not healthy after {timeout:g}s")


@pytest.fixture
def launch(tmp_path: Path, port_factory: Callable[[], int]) -> Iterator[Launch]:
    """Start `python -m sage.services.<name>` with extra env on a free port; stops them all."""
    procs: list[subprocess.Popen[bytes]] = []

    def _launch(
        service: str, env: dict[str, str], *, host_flag: bool = True
    ) -> tuple[subprocess.Popen[bytes], int]:
        port = port_factory()
        argv = [sys.executable, "-m", f"sage.services.{service}", "--port", str(port)]
        if host_flag:
            argv += ["--host", "127.0.0.1"]
        log = open(tmp_path / f"{service}-{port}.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            argv, env={**_base_env(tmp_path / "home"), **env}, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        procs.append(proc)
        return proc, port

    yield _launch
    for proc in procs:
        stop_process(proc)


def _start_scheduler(launch: Launch, pki: Pki, *, client_auth: bool = False) -> int:
    proc, port = launch("scheduler", _tls_env(pki, client_auth=client_auth))
    _wait_grpc_healthy(proc, port, _client_tls(pki.ca, pki.cert, pki.key))
    return port


async def _list_engines(port: int, tls: TlsConfig | None) -> int:
    """ListEngines on the scheduler; returns how many engines it knows."""
    if tls is None:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    else:
        channel = create_channel(f"127.0.0.1:{port}", default_timeout=5.0, tls=tls)
    async with channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        reply = await stub.ListEngines(scheduler_pb2.ListEnginesRequest(), timeout=5.0)
        return len(reply.engines)


# --- gRPC ----------------------------------------------------------------------------------
async def test_tls_call_succeeds_and_plaintext_or_foreign_ca_fails(
    launch: Launch, pki: Pki
) -> None:
    port = _start_scheduler(launch, pki)

    assert await _list_engines(port, _client_tls(pki.ca)) == 0

    with pytest.raises(grpc.RpcError) as plain:
        await _list_engines(port, None)
    assert plain.value.code() == grpc.StatusCode.UNAVAILABLE

    with pytest.raises(grpc.RpcError) as foreign:
        await _list_engines(port, _client_tls(pki.other_ca))
    err = from_rpc_error(foreign.value)
    assert foreign.value.code() == grpc.StatusCode.UNAVAILABLE
    # The message says why: the server's certificate did not verify against our CA.
    assert "certificate" in err.message.lower() or "handshake" in err.message.lower(), err.message


async def test_server_name_override_lets_clients_dial_by_another_name(
    launch: Launch, pki: Pki
) -> None:
    port = _start_scheduler(launch, pki)
    named = tls_from_settings(
        SageSettings(tls_ca_file=str(pki.ca), tls_server_name="sage.internal")
    )
    assert await _list_engines(port, named) == 0
    wrong = tls_from_settings(SageSettings(tls_ca_file=str(pki.ca), tls_server_name="evil.example"))
    with pytest.raises(grpc.RpcError) as mismatch:
        await _list_engines(port, wrong)
    assert mismatch.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_server_rejects_clients_without_a_cert(launch: Launch, pki: Pki) -> None:
    port = _start_scheduler(launch, pki, client_auth=True)

    with pytest.raises(grpc.RpcError) as anonymous:
        await _list_engines(port, _client_tls(pki.ca))
    assert anonymous.value.code() == grpc.StatusCode.UNAVAILABLE

    with pytest.raises(grpc.RpcError) as foreign_client:
        await _list_engines(port, _client_tls(pki.ca, pki.other_cert, pki.other_key))
    assert foreign_client.value.code() == grpc.StatusCode.UNAVAILABLE

    assert await _list_engines(port, _client_tls(pki.ca, pki.cert, pki.key)) == 0


# --- bad certificate files -------------------------------------------------------------------
@pytest.mark.parametrize("problem", ["missing", "garbage", "wrong_key", "bad_ca"])
def test_bad_pem_files_stop_the_service_with_a_message_naming_the_file(
    tmp_path: Path, pki: Pki, problem: str
) -> None:
    env = _tls_env(pki)
    if problem == "missing":
        named = str(tmp_path / "nope.crt")
        env["SAGE_TLS_CERT_FILE"] = named
    elif problem == "garbage":
        named = str(tmp_path / "garbage.key")
        Path(named).write_text("this is not a key\n")
        env["SAGE_TLS_KEY_FILE"] = named
    elif problem == "wrong_key":
        named = str(pki.other_key)
        env["SAGE_TLS_KEY_FILE"] = named
    else:
        named = str(tmp_path / "ca.pem")
        Path(named).write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        env["SAGE_TLS_CA_FILE"] = named
    done = subprocess.run(
        [sys.executable, "-m", "sage.services.gpu_manager", "--host", "127.0.0.1", "--port", "0"],
        env={**_base_env(tmp_path / "home"), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert named in done.stderr
    assert "cannot start" in done.stderr
    assert "Traceback" not in done.stderr


def test_tls_settings_that_do_not_fit_together_are_named(pki: Pki) -> None:
    with pytest.raises(ConfigurationError, match="SAGE_TLS_KEY_FILE"):
        tls_from_settings(SageSettings(tls_cert_file=str(pki.cert)))
    with pytest.raises(ConfigurationError, match="SAGE_TLS_CLIENT_AUTH"):
        tls_from_settings(SageSettings(tls_client_auth=True))
    assert not tls_from_settings(SageSettings()).dials_tls


# --- the HTTPS edge ---------------------------------------------------------------------------
async def _wait_https(
    url: str, proc: subprocess.Popen[bytes], verify: ssl.SSLContext | bool
) -> httpx.Response:
    """First answer of a starting HTTPS server (any status), failing if it exits first."""
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient(verify=verify, timeout=5.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"edge exited with {proc.returncode}")
            try:
                return await client.get(url)
            except httpx.TransportError:
                await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} never answered")


async def test_edge_serves_https_and_chats_through_a_tls_scheduler(
    launch: Launch, pki: Pki, sim_engine: SimFactory
) -> None:
    sched_port = _start_scheduler(launch, pki, client_auth=True)
    node_tls = _client_tls(pki.ca, pki.cert, pki.key)
    engine_url = sim_engine()
    channel = create_channel(f"127.0.0.1:{sched_port}", tls=node_tls)
    async with channel:
        await scheduler_pb2_grpc.SchedulerServiceStub(channel).RegisterEngine(
            scheduler_pb2.RegisterEngineRequest(
                engine=common_pb2.Engine(
                    engine_id="sim-1",
                    model="sim",
                    base_url=engine_url,
                    kind=common_pb2.ENGINE_KIND_LLM,
                )
            )
        )
    upstream = {
        "SAGE_SCHEDULER_ADDR": f"127.0.0.1:{sched_port}",
        "SAGE_LIFECYCLE_ADDR": "127.0.0.1:1",
        "SAGE_GPU_MANAGER_ADDR": "127.0.0.1:1",
    }
    edge, edge_port = launch("edge", {**_tls_env(pki, client_auth=True), **upstream})
    verify = node_tls.httpx_verify()
    edge_url = f"https://127.0.0.1:{edge_port}"
    health = await _wait_https(edge_url + "/health", edge, verify)
    assert health.status_code == 200, health.text
    assert health.json()["status"] == "ok"

    async with httpx.AsyncClient(verify=verify, trust_env=False, timeout=30) as client:
        reply = await client.post(
            edge_url + "/v1/chat/completions",
            json={"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        )
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"]

    # Plain HTTP to the HTTPS port, and HTTPS without a client certificate, get nowhere.
    async with httpx.AsyncClient(timeout=5, trust_env=False) as plain:
        with pytest.raises(httpx.TransportError):
            await plain.get(f"http://127.0.0.1:{edge_port}/health")
    no_cert = _client_tls(pki.ca).httpx_verify()
    async with httpx.AsyncClient(verify=no_cert, timeout=5, trust_env=False) as anonymous:
        with pytest.raises(httpx.TransportError):
            await anonymous.get(edge_url + "/health")

    # An edge that trusts the wrong CA reports the scheduler unhealthy, and says why,
    # while the scheduler keeps serving clients that trust the right one.
    wrong_env = {**_tls_env(pki), "SAGE_TLS_CA_FILE": str(pki.other_ca), **upstream}
    wrong, wrong_port = launch("edge", wrong_env)
    # Its own certificate is still from our CA: only its trust in the scheduler is wrong.
    answer = await _wait_https(f"https://127.0.0.1:{wrong_port}/health", wrong, no_cert)
    assert answer.status_code == 503
    assert answer.json()["status"] == "unavailable"
    assert "CERTIFICATE_VERIFY_FAILED" in answer.json()["scheduler"]
    assert await _list_engines(sched_port, node_tls) == 1


def _start_https_sim(port: int, pki: Pki) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable, "-m", "sage.engines.sim", "--port", str(port),
            "--ssl-certfile", str(pki.cert), "--ssl-keyfile", str(pki.key),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


async def test_scheduler_verifies_https_engines_against_the_ca(
    launch: Launch, pki: Pki, port_factory: Callable[[], int]
) -> None:
    """An engine serving HTTPS (vLLM's --ssl-certfile) is reached only when its certificate
    chains to SAGE_TLS_CA_FILE; a scheduler trusting another CA refuses it, naming why."""
    engine_port = port_factory()
    sim = _start_https_sim(engine_port, pki)
    try:
        https_url = f"https://127.0.0.1:{engine_port}"
        health = await _wait_https(https_url + "/health", sim, _client_tls(pki.ca).httpx_verify())
        assert health.status_code == 200
        await _chat_through_schedulers(launch, pki, https_url)
    finally:
        stop_process(sim)


async def _chat_through_schedulers(launch: Launch, pki: Pki, https_url: str) -> None:
    body = b'{"model": "sim", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]}'
    for ca, ok in ((pki.ca, True), (pki.other_ca, False)):
        env = {**_tls_env(pki), "SAGE_TLS_CA_FILE": str(ca)}
        proc, port = launch("scheduler", env)
        # Only the scheduler's trust in engines changes; we still trust its certificate.
        _wait_grpc_healthy(proc, port, _client_tls(pki.ca, pki.cert, pki.key))
        channel = create_channel(f"127.0.0.1:{port}", tls=_client_tls(pki.ca, pki.cert, pki.key))
        async with channel:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            await stub.RegisterEngine(
                scheduler_pb2.RegisterEngineRequest(
                    engine=common_pb2.Engine(
                        engine_id="sim-tls",
                        model="sim",
                        base_url=https_url,
                        kind=common_pb2.ENGINE_KIND_LLM,
                    )
                )
            )
            if ok:
                reply = await stub.Chat(scheduler_pb2.ChatRequest(model="sim", body=body))
                assert b"choices" in reply.body
            else:
                with pytest.raises(grpc.RpcError) as info:
                    await stub.Chat(scheduler_pb2.ChatRequest(model="sim", body=body))
                assert "CERTIFICATE_VERIFY_FAILED" in str(info.value.details())


# --- loopback by default ----------------------------------------------------------------------
def _unmapped(ip: str) -> str:
    """gRPC listens on an IPv6 socket even for 127.0.0.1 (as ::ffff:127.0.0.1)."""
    addr = ipaddress.ip_address(ip)
    mapped = addr.ipv4_mapped if isinstance(addr, ipaddress.IPv6Address) else None
    return str(mapped or addr)


def test_services_bind_loopback_unless_told_otherwise(launch: Launch) -> None:
    assert SageSettings().host == "127.0.0.1"
    proc, port = launch("embedding", {}, host_flag=False)
    deadline = time.monotonic() + 30
    addrs: set[str] = set()
    while time.monotonic() < deadline and not addrs:
        assert proc.poll() is None, "embedding exited while starting"
        addrs = {
            _unmapped(conn.laddr.ip)
            for conn in psutil.Process(proc.pid).net_connections(kind="inet")
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port
        }
        time.sleep(0.1)
    assert addrs == {"127.0.0.1"}


# --- sage llm serve with TLS ------------------------------------------------------------------
def test_sage_llm_serve_status_and_client_work_over_mtls(
    tmp_path: Path, pki: Pki, port_factory: Callable[[], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve's readiness probes, daemon.json, `status` and UnifiedInferenceClient over mTLS."""
    home = tmp_path / "sage"
    gateway = port_factory()
    env = {
        **_base_env(home),
        **_tls_env(pki, client_auth=True),
        "SAGE_SCHEDULER_PORT": str(port_factory()),
        "SAGE_LIFECYCLE_PORT": str(port_factory()),
        "SAGE_GPU_MANAGER_PORT": str(port_factory()),
        "SAGE_EMBEDDING_SERVICE_PORT": str(port_factory()),
    }
    argv = [sys.executable, "-m", "sage.llm.cli", "llm"]
    serve = subprocess.Popen(
        [
            *argv,
            *("serve", "--model", "sim", "--no-embedding", "--gateway-port", str(gateway)),
            *("--port", str(port_factory())),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    try:
        assert serve.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = serve.stdout.readline()
            assert line, "serve exited early:\n" + "".join(output)
            output.append(line)
            if "gateway listening" in line:
                break
        else:
            raise AssertionError("serve did not come up:\n" + "".join(output))
        url = f"https://127.0.0.1:{gateway}/v1"
        assert url in output[-1]

        status = subprocess.run(
            [*argv, "status"], env=env, capture_output=True, text=True, timeout=60
        )
        assert status.returncode == 0 and f"gateway: {url}" in status.stdout, status

        for key, value in _tls_env(pki, client_auth=True).items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("SAGE_UNIFIED_BASE_URL", url)
        from sage.llm import UnifiedInferenceClient

        client = UnifiedInferenceClient.create()
        assert client.chat([{"role": "user", "content": "hi"}], max_tokens=3)

        from sage.llm import AsyncUnifiedInferenceClient

        async def async_chat() -> str:
            # The async client verifies the gateway against the same CA (and shows our cert).
            async with AsyncUnifiedInferenceClient.create() as async_client:
                return str(
                    await async_client.chat([{"role": "user", "content": "hi"}], max_tokens=3)
                )

        assert asyncio.run(async_chat())
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(60)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
    assert serve.returncode == 0, "".join(output)
