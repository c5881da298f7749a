"""Fault-injection fixtures: a real scheduler (gRPC, port 0) and edge (uvicorn) in the test's
event loop, with per-test settings, in front of simulator engines run as child processes so
that `kill -9` is a real kill."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from sage.common.config.settings import SageSettings
from sage.common.grpc import SageServer, create_channel
from sage.common.http.testing import quiet_server, serve_in_task
from sage.rpc.common.v1 import common_pb2
from sage.rpc.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from sage.services.edge.app import create_app
from sage.services.scheduler.server import build_server as build_scheduler


@dataclass
class Plane:
    """The edge's HTTP client and the scheduler's stub."""

    client: httpx.AsyncClient
    scheduler: Any
    _stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def register(self, engine_id: str, base_url: str, model: str = "sim") -> None:
        """Register an LLM engine with the scheduler, as lifecycle would."""
        await self.scheduler.RegisterEngine(
            scheduler_pb2.RegisterEngineRequest(
                engine=common_pb2.Engine(
                    engine_id=engine_id,
                    model=model,
                    base_url=base_url,
                    kind=common_pb2.ENGINE_KIND_LLM,
                )
            )
        )

    async def metric(self, name: str, **labels: str) -> float:
        """One sample of the scheduler's Prometheus metrics (through the edge's /metrics)."""
        text = (await self.client.get("/metrics")).text
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)"
        found = re.search(r"^" + pattern + r"$", text, re.M)
        return float(found.group(1)) if found else 0.0


PlaneFactory = Callable[..., Awaitable[Plane]]


@pytest.fixture
async def plane_factory(
    settings: SageSettings, port_factory: Callable[[], int]
) -> AsyncIterator[PlaneFactory]:
    """Builds scheduler + edge with settings overrides (`request_timeout_s=1.0`, ...)."""
    planes: list[Plane] = []

    async def build(**overrides: Any) -> Plane:
        tuned = settings.model_copy(update=overrides)
        scheduler: SageServer
        scheduler, sched_port = build_scheduler(tuned, "127.0.0.1:0")
        await scheduler.start()
        # The edge's own deadline is longer, so the scheduler's engine deadline fires first.
        edge_settings = tuned.model_copy(
            update={
                "scheduler_addr": f"127.0.0.1:{sched_port}",
                "lifecycle_addr": "127.0.0.1:1",
                "request_timeout_s": tuned.request_timeout_s + 10.0,
            }
        )
        channel = create_channel(f"127.0.0.1:{sched_port}")
        port = port_factory()
        server = quiet_server(create_app(edge_settings), port)
        task = await serve_in_task(server)
        client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            timeout=60,
            limits=httpx.Limits(max_connections=500, max_keepalive_connections=100),
        )

        async def stop() -> None:
            await client.aclose()
            server.should_exit = True
            await task
            await channel.close(None)
            await scheduler.stop(1)

        plane = Plane(client, scheduler_pb2_grpc.SchedulerServiceStub(channel), [stop])
        planes.append(plane)
        return plane

    yield build
    for plane in planes:
        for stop in plane._stop:
            await stop()
