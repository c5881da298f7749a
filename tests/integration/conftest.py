"""A control plane in the test's event loop: scheduler and embedding service on port 0,
the edge on a real uvicorn socket, talking to each other over real gRPC and HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn

from sage.common.config.settings import SageSettings
from sage.common.grpc import create_channel
from sage.rpc.common.v1 import common_pb2
from sage.rpc.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from sage.services.edge.app import create_app
from sage.services.embedding.server import build_server as build_embedding
from sage.services.scheduler.server import build_server as build_scheduler


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
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(edge_settings),
            host="127.0.0.1",
            port=port,
            log_config=None,
            access_log=False,
            lifespan="on",
        )
    )
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
        await asyncio.sleep(0.02)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield ControlPlane(client, scheduler_pb2_grpc.SchedulerServiceStub(channel))
    server.should_exit = True
    await task
    await channel.close(None)
    await scheduler.stop(1)
    await embedding.stop(1)
