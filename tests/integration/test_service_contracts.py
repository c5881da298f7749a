"""Contract tests: each service as a real gRPC server on an ephemeral port.

Every service must answer grpc.health.v1, list itself through reflection, serve one real
RPC, and turn bad input into a proper status that names the field.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import orjson
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from sage.common.config.settings import SageSettings
from sage.common.exceptions import (
    InsufficientResourcesError,
    InvalidRequestError,
    ModelNotFoundError,
)
from sage.common.grpc import SageServer, create_channel, from_rpc_error
from sage.rpc.common.v1 import common_pb2
from sage.rpc.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from sage.rpc.gpu_manager.v1 import gpu_manager_pb2, gpu_manager_pb2_grpc
from sage.rpc.lifecycle.v1 import lifecycle_pb2, lifecycle_pb2_grpc
from sage.rpc.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from sage.services.edge.dashboard_routes import Sampler
from sage.services.edge.timeseries import GAUGE_FAMILIES, TimeSeries
from sage.services.embedding.server import build_server as build_embedding
from sage.services.gpu_manager.server import build_server as build_gpu
from sage.services.lifecycle.server import build_server as build_lifecycle
from sage.services.scheduler.server import build_server as build_scheduler

Builder = Callable[[SageSettings, str], tuple[SageServer, int]]


@pytest.fixture
async def running() -> AsyncIterator[Callable[[Builder, SageSettings], Any]]:
    """Start servers built by a service's build_server on 127.0.0.1:0; stop them after."""
    servers: list[SageServer] = []
    channels: list[grpc.aio.Channel] = []

    async def start(build: Builder, settings: SageSettings) -> tuple[grpc.aio.Channel, int]:
        server, port = build(settings, "127.0.0.1:0")
        await server.start()
        servers.append(server)
        channel = create_channel(f"127.0.0.1:{port}", default_timeout=20)
        channels.append(channel)
        return channel, port

    yield start
    for channel in channels:
        await channel.close(None)
    for server in reversed(servers):
        await server.stop(1)


async def assert_health_and_reflection(channel: grpc.aio.Channel, full_name: str) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", full_name):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = set()
    async for response in call:
        names |= {s.name for s in response.list_services_response.service}
    assert full_name in names
    assert "grpc.health.v1.Health" in names


def sim_engine_pb(
    engine_id: str,
    base_url: str,
    model: str = "sim",
    kind: common_pb2.EngineKind.ValueType = common_pb2.ENGINE_KIND_LLM,
) -> common_pb2.Engine:
    return common_pb2.Engine(
        engine_id=engine_id,
        model=model,
        kind=kind,
        base_url=base_url,
        state=common_pb2.ENGINE_STATE_READY,
    )


async def test_scheduler_contract(
    running: Any, settings: SageSettings, sim_engine: Callable[..., str]
) -> None:
    channel, _ = await running(build_scheduler, settings)
    await assert_health_and_reflection(channel, "sage.rpc.scheduler.v1.SchedulerService")
    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
    base = sim_engine()
    reply = await stub.RegisterEngine(
        scheduler_pb2.RegisterEngineRequest(engine=sim_engine_pb("sim-a", base))
    )
    assert reply.engine.engine_id == "sim-a" and not reply.replaced

    models = await stub.ListModels(scheduler_pb2.ListModelsRequest())
    assert [m.id for m in models.models] == ["sim"]
    chat = await stub.Chat(
        scheduler_pb2.ChatRequest(
            model="sim",
            body=b'{"model":"sim","messages":[{"role":"user","content":"hi"}],"max_tokens":4}',
        )
    )
    assert chat.engine_id == "sim-a"
    assert chat.usage.completion_tokens == 4
    assert b'"chat.completion"' in chat.body

    # Bad input comes back as a status whose trailers rebuild the original error.
    with pytest.raises(grpc.RpcError) as info:
        await stub.RegisterEngine(
            scheduler_pb2.RegisterEngineRequest(engine=sim_engine_pb("bad", "not-a-url"))
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = from_rpc_error(info.value)
    assert isinstance(err, InvalidRequestError) and err.param == "engine.base_url"

    with pytest.raises(grpc.RpcError) as info:
        await stub.Chat(scheduler_pb2.ChatRequest(model="nope", body=b"{}"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    missing = from_rpc_error(info.value)
    assert isinstance(missing, ModelNotFoundError)
    assert missing.param == "model" and missing.code == "model_not_found"

    # The service keeps serving after errors.
    status = await stub.GetStatus(scheduler_pb2.GetStatusRequest())
    assert status.engines_ready == 1 and status.requests_total == 2


async def test_scheduler_streams_chunk_by_chunk(
    running: Any, settings: SageSettings, sim_engine: Callable[..., str]
) -> None:
    channel, _ = await running(build_scheduler, settings)
    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
    base = sim_engine("--tpot-ms", "20")
    await stub.RegisterEngine(
        scheduler_pb2.RegisterEngineRequest(engine=sim_engine_pb("sim-a", base))
    )
    body = (
        b'{"model":"sim","stream":true,"max_tokens":5,"messages":[{"role":"user","content":"hi"}]}'
    )
    chunks = [
        m.data
        async for m in stub.ChatStream(scheduler_pb2.ChatStreamRequest(model="sim", body=body))
    ]
    # role chunk + 5 token chunks + finish chunk, no [DONE] sentinel inside gRPC
    assert len(chunks) >= 6
    assert all(c.startswith(b"{") for c in chunks)


async def test_coalesced_stream_carries_the_same_chunks_in_fewer_messages(
    running: Any, settings: SageSettings, sim_engine: Callable[..., str]
) -> None:
    """With `coalesce`, chunks a zero-latency engine sends together share a message; the
    chunk sequence is unchanged. Without it, old clients still get one chunk per message."""
    channel, _ = await running(build_scheduler, settings)
    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
    base = sim_engine("--tpot-ms", "0", "--ttft-ms", "0")
    await stub.RegisterEngine(
        scheduler_pb2.RegisterEngineRequest(engine=sim_engine_pb("sim-a", base))
    )
    body = (
        b'{"model":"sim","stream":true,"max_tokens":32,"seed":1,'
        b'"messages":[{"role":"user","content":"hi"}]}'
    )

    async def chunks(coalesce: bool) -> tuple[int, list[bytes]]:
        request = scheduler_pb2.ChatStreamRequest(model="sim", body=body, coalesce=coalesce)
        messages = [m async for m in stub.ChatStream(request)]
        return len(messages), [c for m in messages for c in (m.data, *m.more)]

    plain_messages, plain = await chunks(False)
    merged_messages, merged = await chunks(True)
    assert plain_messages == len(plain) >= 33  # one chunk per message
    assert len(merged) == len(plain)
    texts = [orjson.loads(c)["choices"][0]["delta"].get("content", "") for c in merged]
    expected = [orjson.loads(c)["choices"][0]["delta"].get("content", "") for c in plain]
    assert texts == expected
    assert merged_messages < plain_messages


async def test_gpu_manager_contract(running: Any, settings: SageSettings) -> None:
    channel, _ = await running(build_gpu, settings)
    await assert_health_and_reflection(channel, "sage.rpc.gpu_manager.v1.GpuManagerService")
    stub = gpu_manager_pb2_grpc.GpuManagerServiceStub(channel)
    gpus = await stub.ListGpus(gpu_manager_pb2.ListGpusRequest())
    if not gpus.nvml_available:
        # CPU-only host: zero GPUs, a reason, and reservations refused cleanly.
        assert list(gpus.gpus) == [] and gpus.nvml_error
        with pytest.raises(grpc.RpcError) as info:
            await stub.Reserve(
                gpu_manager_pb2.ReserveRequest(
                    engine_id="e1", gpu_count=1, memory_per_gpu_bytes=1 << 30
                )
            )
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert isinstance(from_rpc_error(info.value), InsufficientResourcesError)
    listed = await stub.ListReservations(gpu_manager_pb2.ListReservationsRequest())
    assert list(listed.reservations) == []


async def test_embedding_contract(
    running: Any, settings: SageSettings, sim_engine: Callable[..., str]
) -> None:
    channel, _ = await running(build_embedding, settings)
    await assert_health_and_reflection(channel, "sage.rpc.embedding.v1.EmbeddingService")
    stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
    base = sim_engine("--embedding-dim", "16", model="sim-embedding")
    reply = await stub.EmbedBatch(
        embedding_pb2.EmbedBatchRequest(
            model="sim-embedding",
            inputs=["hello", "world", "hello"],
            engines=[embedding_pb2.EngineEndpoint(engine_id="emb-a", base_url=base)],
        )
    )
    vectors = [list(v.values) for v in reply.vectors]
    assert len(vectors) == 3 and all(len(v) == 16 for v in vectors)
    assert vectors[0] == pytest.approx(vectors[2]) and vectors[0] != pytest.approx(vectors[1])
    assert list(reply.engine_ids) == ["emb-a"] * 3

    with pytest.raises(grpc.RpcError) as info:
        await stub.EmbedBatch(embedding_pb2.EmbedBatchRequest(model="", inputs=["x"]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert from_rpc_error(info.value).param == "model"


async def test_lifecycle_contract_starts_registers_and_stops_an_engine(
    running: Any, settings: SageSettings, no_leaked_children: None
) -> None:
    sched_channel, sched_port = await running(build_scheduler, settings)
    life_settings = settings.model_copy(update={"scheduler_addr": f"127.0.0.1:{sched_port}"})
    channel, _ = await running(build_lifecycle, life_settings)
    await assert_health_and_reflection(channel, "sage.rpc.lifecycle.v1.LifecycleService")
    stub = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
    scheduler = scheduler_pb2_grpc.SchedulerServiceStub(sched_channel)

    started = await stub.StartEngine(
        lifecycle_pb2.StartEngineRequest(
            model="sim", kind=common_pb2.ENGINE_KIND_LLM, backend="sim", startup_timeout_s=60
        ),
        timeout=90,
    )
    engine = started.engine
    assert engine.state == common_pb2.ENGINE_STATE_READY and engine.pid > 0
    registered = await scheduler.ListEngines(scheduler_pb2.ListEnginesRequest())
    assert [e.engine_id for e in registered.engines] == [engine.engine_id]

    logs = await stub.TailLogs(lifecycle_pb2.TailLogsRequest(engine_id=engine.engine_id, lines=50))
    assert any("listening" in line.lower() or "uvicorn" in line.lower() for line in logs.lines)

    stopped = await stub.StopEngine(lifecycle_pb2.StopEngineRequest(engine_id=engine.engine_id))
    assert stopped.engine.state == common_pb2.ENGINE_STATE_STOPPED
    assert list((await scheduler.ListEngines(scheduler_pb2.ListEnginesRequest())).engines) == []

    with pytest.raises(grpc.RpcError) as info:
        await stub.GetEngine(lifecycle_pb2.GetEngineRequest(engine_id="missing"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert from_rpc_error(info.value).param == "engine_id"


def test_service_process_exits_cleanly_on_sigterm(
    port_factory: Callable[[], int], tmp_path: Any
) -> None:
    """`python -m sage.services.<name>` serves health, then stops gracefully on SIGTERM."""
    port = port_factory()
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
        env={"SAGE_HOME": str(tmp_path), "SAGE_DISABLE_NVML": "1", "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        import time

        deadline = time.monotonic() + 20
        serving = False
        while time.monotonic() < deadline and not serving:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                try:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=1
                    )
                    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
                except grpc.RpcError:
                    time.sleep(0.1)
        assert serving
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
        assert proc.returncode == 0, out.decode()
        assert b"shutting down" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_get_metrics_names_families_and_the_dashboard_sampler_reads_its_gauges(
    running: Any, settings: SageSettings, sim_engine: Callable[..., str]
) -> None:
    """GetMetrics with `families` answers only those (the dashboard's 2 s sampler asks for
    its two gauges, not megabytes of per-engine histograms); the sampler still sees the
    requests in flight per engine and the tokens per second."""
    channel, _ = await running(build_scheduler, settings)
    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
    base = sim_engine("--ttft-ms", "0", "--tpot-ms", "300")
    await stub.RegisterEngine(
        scheduler_pb2.RegisterEngineRequest(engine=sim_engine_pb("sim-a", base))
    )
    body = b'{"model":"sim","max_tokens":4,"messages":[{"role":"user","content":"hi"}]}'
    series = TimeSeries()
    sampler = Sampler(series, lambda: stub)
    call = asyncio.ensure_future(stub.Chat(scheduler_pb2.ChatRequest(model="sim", body=body)))
    for _ in range(100):  # until the scheduler has it on the engine
        await sampler.sample_once()
        if series.samples[-1].engine_in_flight:
            break
        await asyncio.sleep(0.01)
    assert series.samples[-1].engine_in_flight == {"sim-a": 1.0}
    await call
    await sampler.sample_once()
    assert series.samples[-1].engine_in_flight == {}
    assert series.samples[-1].models["sim"].tokens_per_s > 0

    part = await stub.GetMetrics(scheduler_pb2.GetMetricsRequest(families=GAUGE_FAMILIES))
    whole = await stub.GetMetrics(scheduler_pb2.GetMetricsRequest())
    assert {f.name for f in text_string_to_metric_families(part.prometheus_text.decode())} == set(
        GAUGE_FAMILIES
    )
    names = {f.name for f in text_string_to_metric_families(whole.prometheus_text.decode())}
    assert "sage:scheduler_request_latency_seconds" in names
    assert [m.model for m in part.models] == [m.model for m in whole.models] == ["sim"]
