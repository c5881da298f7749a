"""A control plane in the test's event loop: scheduler and embedding service on port 0,
the edge on a real uvicorn socket, talking to each other over real gRPC and HTTP.

Authenticated as `sage llm serve` runs: every server demands the run's internal token and
every channel sends it (set once per run by tests/conftest.py `internal_token`, as each
service's main sets its own), and engines lifecycle starts require their derived keys."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from sage.common.config.settings import SageSettings
from sage.common.grpc import SageServer, create_channel
from sage.common.http.testing import quiet_server, serve_in_task
from sage.common.security import admin_key_path, ensure_secret_file, resolve_admin_key
from sage.rpc.common.v1 import common_pb2
from sage.rpc.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from sage.services.edge.app import create_app
from sage.services.embedding.server import build_server as build_embedding
from sage.services.gpu_manager.server import build_server as build_gpu
from sage.services.lifecycle.server import build_server as build_lifecycle
from sage.services.scheduler.server import build_server as build_scheduler


class AdminForManagement(httpx.Auth):
    """Sends the stack's admin key on /v1/management requests that carry no Authorization
    header, as the CLI and client do with the key file `sage llm serve` writes."""

    def __init__(self, key: str) -> None:
        self.key = key

    def auth_flow(self, request: httpx.Request) -> Any:
        if request.url.path.startswith("/v1/management") and "authorization" not in request.headers:
            request.headers["Authorization"] = f"Bearer {self.key}"
        yield request


def plane_admin(settings: SageSettings) -> AdminForManagement | None:
    """Management is closed without an admin key: a plane whose settings name none gets one
    in its SAGE_HOME key file (like `sage llm serve`), sent by its client; settings that
    name one are left for the test to use explicitly."""
    if resolve_admin_key(settings) is not None:
        return None
    return AdminForManagement(ensure_secret_file(admin_key_path(settings), "sk-admin-"))


@dataclass
class ControlPlane:
    """The edge's HTTP client and the scheduler's stub."""

    client: httpx.AsyncClient
    scheduler: Any

    async def register(
        self, engine_id: str, model: str, base_url: str, *, kind: str = "llm", **fields: Any
    ) -> None:
        """Register an engine with the scheduler, as lifecycle would."""
        await self.scheduler.RegisterEngine(
            scheduler_pb2.RegisterEngineRequest(
                engine=common_pb2.Engine(
                    engine_id=engine_id,
                    model=model,
                    base_url=base_url,
                    kind=common_pb2.ENGINE_KIND_EMBEDDING
                    if kind == "embedding"
                    else common_pb2.ENGINE_KIND_LLM,
                    **fields,
                )
            )
        )


@pytest.fixture
async def control_plane(
    settings: SageSettings, port_factory: Callable[[], int]
) -> AsyncIterator[ControlPlane]:
    """scheduler + embedding service + edge, all real, stopped after the test."""
    embedding, emb_port = build_embedding(settings, "127.0.0.1:0")
    await embedding.start()
    sched_settings = settings.model_copy(update={"embedding_service_addr": f"127.0.0.1:{emb_port}"})
    scheduler, sched_port = build_scheduler(sched_settings, "127.0.0.1:0")
    await scheduler.start()
    edge_settings = settings.model_copy(
        update={"scheduler_addr": f"127.0.0.1:{sched_port}", "lifecycle_addr": "127.0.0.1:1"}
    )
    channel = create_channel(f"127.0.0.1:{sched_port}")
    port = port_factory()
    admin = plane_admin(edge_settings)
    server = quiet_server(create_app(edge_settings), port)
    task = await serve_in_task(server)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", timeout=60, auth=admin
    ) as client:
        yield ControlPlane(client, scheduler_pb2_grpc.SchedulerServiceStub(channel))
    server.should_exit = True
    await task
    await channel.close(None)
    await scheduler.stop(1)
    await embedding.stop(1)


@dataclass
class FullPlane(ControlPlane):
    """Every service in-process (lifecycle spawns real engine processes) plus the edge."""

    settings: SageSettings
    servers: dict[str, SageServer]
    lifecycle_port: int

    async def wait_engine(
        self, engine_id: str, ok: Callable[[dict[str, Any]], bool], within_s: float = 30
    ) -> dict[str, Any]:
        """The engine's management JSON once `ok` holds for it (AssertionError after
        `within_s`)."""
        deadline = time.monotonic() + within_s
        engine: dict[str, Any] = {}
        while time.monotonic() < deadline:
            engine = (await self.client.get(f"/v1/management/engines/{engine_id}")).json()
            if ok(engine):
                return engine
            await asyncio.sleep(0.1)
        raise AssertionError(f"{engine_id}: condition never met: {engine}")

    async def restart_lifecycle(self) -> None:
        """Stop lifecycle (its engines keep running) and start a new one on the same state."""
        await self.servers["lifecycle"].stop(1)
        server, _ = build_lifecycle(self.settings, f"127.0.0.1:{self.lifecycle_port}")
        await server.start()
        self.servers["lifecycle"] = server


@pytest.fixture
async def full_plane(
    settings: SageSettings, port_factory: Callable[[], int]
) -> AsyncIterator[FullPlane]:
    """gpu_manager, embedding, scheduler, lifecycle and edge, wired like `sage llm serve`."""
    # The services know each other's addresses before they bind, so a port taken by another
    # process between the pick and the bind fails the build: then all of them start again on
    # fresh ports (a busy CI run hit "Address already in use" here).
    for attempt in range(3):
        servers: dict[str, SageServer] = {}
        ports = {name: port_factory() for name in ("gpu", "emb", "sched", "life")}
        wired = settings.model_copy(
            update={
                "gpu_manager_addr": f"127.0.0.1:{ports['gpu']}",
                "embedding_service_addr": f"127.0.0.1:{ports['emb']}",
                "scheduler_addr": f"127.0.0.1:{ports['sched']}",
                "lifecycle_addr": f"127.0.0.1:{ports['life']}",
                "lifecycle_restart_backoff_s": 0.2,
                "lifecycle_max_crashes": 2,
                # engines outlive a lifecycle restart; teardown stops them through the API
                "lifecycle_stop_engines_on_exit": False,
            }
        )
        try:
            for name, build, port in (
                ("gpu_manager", build_gpu, ports["gpu"]),
                ("embedding", build_embedding, ports["emb"]),
                ("scheduler", build_scheduler, ports["sched"]),
                ("lifecycle", build_lifecycle, ports["life"]),
            ):
                server, _ = build(wired, f"127.0.0.1:{port}")
                await server.start()
                servers[name] = server
            break
        except RuntimeError as exc:
            for started in servers.values():
                await started.stop(0)
            if "Failed to bind" not in str(exc) or attempt == 2:
                raise
    channel = create_channel(wired.address("scheduler"))
    edge_port = port_factory()
    admin = plane_admin(wired)
    edge = quiet_server(create_app(wired), edge_port)
    task = await serve_in_task(edge)
    plane = FullPlane(
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{edge_port}", timeout=120, auth=admin),
        scheduler_pb2_grpc.SchedulerServiceStub(channel),
        wired,
        servers,
        ports["life"],
    )
    try:
        yield plane
    finally:
        listed = await plane.client.get("/v1/management/engines")
        for engine in listed.json().get("engines", []) if listed.status_code == 200 else []:
            if engine["status"] in ("STARTING", "RUNNING", "STOPPING"):
                await plane.client.delete(f"/v1/management/engines/{engine['engine_id']}")
        await plane.client.aclose()
        edge.should_exit = True
        await task
        await channel.close(None)
        for name in ("lifecycle", "scheduler", "embedding", "gpu_manager"):
            await plane.servers[name].stop(1)
