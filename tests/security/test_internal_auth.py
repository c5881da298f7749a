"""Authenticated internals (issue 16, item 5 and "gRPC bypasses everything").

Before: any local process could call every gRPC method of every service (start engines
with any argv, register engines, run chat as any tenant with `rate_limit_rpm: 0`), and
engines answered anyone on their port. Now every gRPC call needs the stack's internal
token (or an mTLS client certificate), the scheduler resolves tenant and limits from the
caller's API key in its own table, and engines lifecycle starts need their own key.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import orjson
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sage.common.config.settings import SageSettings
from sage.common.grpc import (
    Registration,
    create_channel,
    create_server,
    process_token,
    tls_from_settings,
)
from sage.common.grpc.auth import ServerAuth, metadata_token, token_matches
from sage.common.security import engine_api_key, read_secret_file
from sage.common.utils.processes import stop_process
from sage.rpc.common.v1 import common_pb2
from sage.rpc.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from sage.rpc.gpu_manager.v1 import gpu_manager_pb2, gpu_manager_pb2_grpc
from sage.rpc.lifecycle.v1 import lifecycle_pb2, lifecycle_pb2_grpc
from sage.rpc.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from tests.conftest import SimFactory
from tests.integration.test_tls import Pki, pki  # noqa: F401 - the module-scoped fixture

A_KEY = "sk-tenant-a-internal-auth-1111"
B_KEY = "sk-tenant-b-internal-auth-2222"
B_RPM = 2
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
WRONG = (("x-sage-internal-token", "not-the-token"),)


@pytest.fixture
def settings(tmp_path: Path) -> SageSettings:
    """Two tenants; tenant-b may send B_RPM requests a minute."""
    keys = tmp_path / "keys.json"
    keys.write_bytes(
        orjson.dumps(
            [
                {"key": A_KEY, "tenant": "tenant-a"},
                {"key": B_KEY, "tenant": "tenant-b", "rate_limit_rpm": B_RPM},
            ]
        )
    )
    return SageSettings(
        home=tmp_path / "sage",
        rpc_timeout_s=10.0,
        request_timeout_s=30.0,
        disable_nvml=not Path("/dev/nvidia0").exists(),
        api_keys_file=keys,
    )


def _calls(channel: grpc.aio.Channel) -> dict[str, Callable[..., Any]]:
    """One cheap RPC per service, each returning an awaitable call on `channel`."""
    scheduler = scheduler_pb2_grpc.SchedulerServiceStub(channel)
    lifecycle = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
    gpus = gpu_manager_pb2_grpc.GpuManagerServiceStub(channel)
    embedding = embedding_pb2_grpc.EmbeddingServiceStub(channel)
    return {
        "scheduler": lambda **kw: scheduler.ListEngines(scheduler_pb2.ListEnginesRequest(), **kw),
        "lifecycle": lambda **kw: lifecycle.ListEngines(lifecycle_pb2.ListEnginesRequest(), **kw),
        "gpu_manager": lambda **kw: gpus.ListGpus(gpu_manager_pb2.ListGpusRequest(), **kw),
        "embedding_service": lambda **kw: embedding.EmbedBatch(
            embedding_pb2.EmbedBatchRequest(model="", inputs=["x"]), **kw
        ),
    }


async def _code(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("service", ["scheduler", "lifecycle", "gpu_manager", "embedding_service"])
async def test_each_service_refuses_calls_without_the_internal_token(
    full_plane: Any, service: str
) -> None:
    addr = full_plane.settings.address(service)
    async with grpc.aio.insecure_channel(addr) as bare:
        call = _calls(bare)[service]
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await call(timeout=10)
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "x-sage-internal-token" in (missing.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as wrong:
            await call(timeout=10, metadata=WRONG)
        assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Probes stay open: health answers without a token.
        health = await health_pb2_grpc.HealthStub(bare).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    channel = create_channel(addr)  # the process's token, as every service sends it
    try:
        code = await _code(_calls(channel)[service](timeout=10))
        # The embedding call reaches its servicer, which refuses the empty model.
        wanted = "INVALID_ARGUMENT" if service == "embedding_service" else "OK"
        assert code == grpc.StatusCode[wanted]
    finally:
        await channel.close(None)


async def test_start_engine_and_register_engine_need_the_token(full_plane: Any) -> None:
    settings = full_plane.settings
    async with (
        grpc.aio.insecure_channel(settings.address("lifecycle")) as life,
        grpc.aio.insecure_channel(settings.address("scheduler")) as sched,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as started:
            await lifecycle_pb2_grpc.LifecycleServiceStub(life).StartEngine(
                lifecycle_pb2.StartEngineRequest(
                    model="sim", backend="sim", extra_args=["--host", "0.0.0.0"]
                ),
                timeout=30,
            )
        assert started.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as registered:
            await scheduler_pb2_grpc.SchedulerServiceStub(sched).RegisterEngine(
                scheduler_pb2.RegisterEngineRequest(
                    engine=common_pb2.Engine(
                        engine_id="hijack",
                        model="sim",
                        base_url="http://127.0.0.1:9",
                        kind=common_pb2.ENGINE_KIND_LLM,
                    )
                ),
                timeout=10,
                metadata=WRONG,
            )
        assert registered.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Nothing was started or routed.
    life_ok = create_channel(settings.address("lifecycle"))
    try:
        listed = await lifecycle_pb2_grpc.LifecycleServiceStub(life_ok).ListEngines(
            lifecycle_pb2.ListEnginesRequest()
        )
        assert list(listed.engines) == []
    finally:
        await life_ok.close(None)
    routed = await full_plane.scheduler.ListEngines(scheduler_pb2.ListEnginesRequest())
    assert list(routed.engines) == []


async def test_tenant_and_limits_come_from_the_schedulers_key_table(
    control_plane: Any, sim_engine: SimFactory
) -> None:
    await control_plane.register("e1", "sim", sim_engine())
    body = orjson.dumps({"model": "sim", **CHAT})

    async def chat(**options: Any) -> grpc.StatusCode | str:
        try:
            await control_plane.scheduler.Chat(
                scheduler_pb2.ChatRequest(
                    model="sim", body=body, options=scheduler_pb2.RequestOptions(**options)
                ),
                timeout=20,
            )
        except grpc.aio.AioRpcError as err:
            return f"{err.code().name}: {err.details()}"
        return grpc.StatusCode.OK

    # The attack: name a tenant and lift its limits, with no key at all.
    spoofed = await chat(tenant="tenant-b", rate_limit_rpm=0)
    assert isinstance(spoofed, str) and spoofed.startswith("UNAUTHENTICATED"), spoofed
    unknown = await chat(api_key="sk-made-up-key-000000")
    assert isinstance(unknown, str) and unknown.startswith("UNAUTHENTICATED"), unknown
    assert "sk-made-up-key-000000" not in unknown
    # tenant-b's key, claiming tenant-a and no limit: still tenant-b, still B_RPM a minute.
    outcomes = [
        await chat(api_key=B_KEY, tenant="tenant-a", rate_limit_rpm=0) for _ in range(B_RPM + 2)
    ]
    assert outcomes[:B_RPM] == [grpc.StatusCode.OK] * B_RPM, outcomes
    for refused in outcomes[B_RPM:]:
        assert isinstance(refused, str) and refused.startswith("RESOURCE_EXHAUSTED"), refused
        assert "tenant-b" in refused
    # tenant-a's key is unlimited, whatever limit the request names.
    assert [await chat(api_key=A_KEY, rate_limit_rpm=1) for _ in range(B_RPM + 2)] == [
        grpc.StatusCode.OK
    ] * (B_RPM + 2)
    # The edge forwards the caller's key: tenant-b is limited there as well.
    codes = [
        (
            await control_plane.client.post(
                "/v1/chat/completions",
                json={"model": "sim", **CHAT},
                headers={"Authorization": f"Bearer {B_KEY}"},
            )
        ).status_code
        for _ in range(2)
    ]
    assert codes == [429, 429]
    ok = await control_plane.client.post(
        "/v1/chat/completions",
        json={"model": "sim", **CHAT},
        headers={"Authorization": f"Bearer {A_KEY}"},
    )
    assert ok.status_code == 200, ok.text


@dataclass
class Lifecycle:
    """A lifecycle stub with the stack's token and the engines a test started."""

    stub: Any
    started: list[str] = field(default_factory=list)

    async def start_sim(
        self, kind: common_pb2.EngineKind.ValueType = common_pb2.ENGINE_KIND_LLM
    ) -> common_pb2.Engine:
        reply = await self.stub.StartEngine(
            lifecycle_pb2.StartEngineRequest(model="sim", backend="sim", kind=kind)
        )
        self.started.append(reply.engine.engine_id)
        engine: common_pb2.Engine = reply.engine
        return engine


@pytest.fixture
async def lifecycle(full_plane: Any) -> AsyncIterator[Lifecycle]:
    """Starts engines through lifecycle's gRPC API; stops them after the test."""
    channel = create_channel(full_plane.settings.address("lifecycle"), default_timeout=120)
    plane = Lifecycle(lifecycle_pb2_grpc.LifecycleServiceStub(channel))
    yield plane
    for engine_id in plane.started:
        await plane.stub.StopEngine(lifecycle_pb2.StopEngineRequest(engine_id=engine_id))
    await channel.close(None)


async def test_an_engine_lifecycle_started_needs_its_own_key(
    full_plane: Any, lifecycle: Lifecycle
) -> None:
    engine = await lifecycle.start_sim()
    key = engine_api_key(process_token(), engine.engine_id)
    async with httpx.AsyncClient(base_url=engine.base_url, timeout=10, trust_env=False) as http:
        assert (await http.get("/health")).status_code == 200  # supervisors probe it
        for path in ("/v1/models", "/metrics"):
            refused = await http.get(path)
            assert refused.status_code == 401, path
            assert refused.json() == {"error": "Unauthorized"}  # vLLM's own refusal
            assert (
                await http.get(path, headers={"Authorization": "Bearer wrong"})
            ).status_code == 401
        anyone = await http.post("/v1/chat/completions", json={"model": "sim", **CHAT})
        assert anyone.status_code == 401
        assert (
            await http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        ).status_code == 200
        assert (
            await http.get("/metrics", headers={"Authorization": f"bearer {key}"})
        ).status_code == 200
    # The key came in the environment, not argv (which `ps` shows to other users), and the
    # engine got none of the control plane's secrets.
    proc = psutil.Process(engine.pid)
    assert not any(key in arg for arg in proc.cmdline())
    environ = proc.environ()
    assert environ.get("SAGE_ENGINE_API_KEY") == key
    assert "SAGE_INTERNAL_TOKEN" not in environ
    # The scheduler holds the key: chat through the edge still works.
    chat = await full_plane.client.post(
        "/v1/chat/completions",
        json={"model": "sim", **CHAT},
        headers={"Authorization": f"Bearer {A_KEY}"},
    )
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"]


async def test_the_embedding_service_sends_the_engine_key(
    full_plane: Any, lifecycle: Lifecycle
) -> None:
    engine = await lifecycle.start_sim(common_pb2.ENGINE_KIND_EMBEDDING)
    async with httpx.AsyncClient(base_url=engine.base_url, timeout=10, trust_env=False) as http:
        direct = await http.post("/v1/embeddings", json={"model": "sim", "input": ["x"]})
        assert direct.status_code == 401
    reply = await full_plane.client.post(
        "/v1/embeddings",
        json={"model": "sim", "input": ["one", "two"]},
        headers={"Authorization": f"Bearer {A_KEY}"},
    )
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["data"]) == 2


def test_a_service_started_alone_creates_its_token_file(
    tmp_path: Path, port_factory: Callable[[], int]
) -> None:
    port = port_factory()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGE_")}
    env.update({"SAGE_HOME": str(tmp_path), "SAGE_DISABLE_NVML": "1", "SAGE_LOG_LEVEL": "WARNING"})
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sage.services.gpu_manager",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    addr = f"127.0.0.1:{port}"
    try:
        token_file = tmp_path / "llm" / "internal.token"
        deadline = time.monotonic() + 30
        serving = False
        with grpc.insecure_channel(addr) as bare:
            while not serving and time.monotonic() < deadline:
                assert proc.poll() is None, "gpu_manager exited"
                try:
                    serving = (
                        health_pb2_grpc.HealthStub(bare)
                        .Check(health_pb2.HealthCheckRequest(), timeout=1)
                        .status
                        == health_pb2.HealthCheckResponse.SERVING
                    )
                except grpc.RpcError:
                    time.sleep(0.1)
            assert serving
            assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
            stub = gpu_manager_pb2_grpc.GpuManagerServiceStub(bare)
            with pytest.raises(grpc.RpcError) as refused:
                stub.ListGpus(gpu_manager_pb2.ListGpusRequest(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            token = read_secret_file(token_file)
            assert token and token != process_token()
            stub.ListGpus(
                gpu_manager_pb2.ListGpusRequest(),
                timeout=5,
                metadata=(("x-sage-internal-token", token),),
            )
    finally:
        stop_process(proc)


def _identity(data: bytes) -> bytes:
    return data


async def _hello(request: bytes, context: Any) -> bytes:
    return b"hello"


def _add_hello(servicer: Any, server: grpc.aio.Server) -> None:
    handler = grpc.unary_unary_rpc_method_handler(
        _hello, request_deserializer=_identity, response_serializer=_identity
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("sage.test.v1.Hello", {"Hello": handler}),)
    )


@pytest.mark.parametrize("client_auth", [True, False])
async def test_an_mtls_client_certificate_does_not_replace_the_token(
    pki: Pki,  # noqa: F811 - the imported fixture
    client_auth: bool,
) -> None:
    server_tls = tls_from_settings(
        SageSettings(
            tls_cert_file=str(pki.cert),
            tls_key_file=str(pki.key),
            tls_ca_file=str(pki.ca),
            tls_client_auth=client_auth,
        )
    )
    client_tls = tls_from_settings(
        SageSettings(
            tls_cert_file=str(pki.cert), tls_key_file=str(pki.key), tls_ca_file=str(pki.ca)
        )
    )
    server, port = create_server(
        "127.0.0.1:0",
        [Registration("sage.test.v1.Hello", _add_hello, None)],
        tls=server_tls,
        internal_token="the-token",
    )
    await server.start()
    # No token: refused even with a certificate the server verified (client_auth), since
    # the edge's HTTPS clients may hold certificates of the same CA.
    channel = create_channel(f"127.0.0.1:{port}", tls=client_tls, internal_token="")
    try:
        hello = channel.unary_unary(
            "/sage.test.v1.Hello/Hello",
            request_serializer=_identity,
            response_deserializer=_identity,
        )
        code = await _code(hello(b"", timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert (
            await hello(b"", timeout=10, metadata=(("x-sage-internal-token", "the-token"),))
            == b"hello"
        )
    finally:
        await channel.close(None)
        await server.stop(0)


def test_token_checks_refuse_near_misses_and_never_raise() -> None:
    auth = ServerAuth("sk-token")
    assert auth.allows((("x-sage-internal-token", "sk-token"),))
    for bad in ("", "sk-toke", "sk-token2", "SK-TOKEN", "sk-tökén", b"sk-token\xff"):
        assert not auth.allows((("x-sage-internal-token", bad),)), bad
    assert not auth.allows(None)
    assert not auth.allows((("authorization", "sk-token"),))
    assert metadata_token((("a", "b"), ("x-sage-internal-token", "t"))) == "t"
    assert token_matches(b"sk-token", "sk-token") and not token_matches(None, "sk-token")


def test_engines_inherit_none_of_the_control_planes_secrets_or_their_files() -> None:
    """An engine runs model code: it gets its own key and nothing that opens the stack."""
    from sage.services.lifecycle.backends import BACKENDS
    from sage.services.lifecycle.backends._common import launch_env
    from sage.services.lifecycle.spec import EngineSpec

    backend = BACKENDS["sim"]
    plan = backend.plan(EngineSpec(model="sim"), 8900, [])
    secrets = {
        name: "secret"
        for name in (
            "SAGE_INTERNAL_TOKEN",
            "SAGE_INTERNAL_TOKEN_FILE",
            "SAGE_ADMIN_API_KEY",
            "SAGE_ADMIN_API_KEY_FILE",
            "SAGE_API_KEYS",
            "SAGE_API_KEYS_FILE",
            "SAGE_CHAT_API_KEY",
            "SAGE_EMBEDDING_API_KEY",
            "SAGE_TLS_KEY_FILE",
        )
    }
    env = launch_env(plan, backend, "sk-engine-x", {**secrets, "PATH": "/usr/bin"})
    assert not set(secrets) & set(env), sorted(set(secrets) & set(env))
    assert env["SAGE_ENGINE_API_KEY"] == "sk-engine-x" and env["PATH"] == "/usr/bin"
