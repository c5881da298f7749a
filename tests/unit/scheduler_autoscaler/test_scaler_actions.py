"""The autoscaler's lifecycle calls in etcd mode: the scheduler's host may run no lifecycle,
so a replica starts on the node agent that runs one to copy, and a stop goes to the
engine's own node. The node agents stand in as gRPC servers on port 0 that record calls
(lifecycle's wire contract, not its engine processes)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from sage.common.grpc import Registration, SageServer, create_channel, create_server
from sage.common.utils.processes import free_port
from sage.rpc.common.v1 import common_pb2
from sage.rpc.lifecycle.v1 import lifecycle_pb2, lifecycle_pb2_grpc
from sage.services.scheduler.clients import LifecycleScalerActions
from sage.services.scheduler.nodes import NodeReport, NodeTable
from sage.services.scheduler.registry import EngineRegistry


@dataclass
class Agent(lifecycle_pb2_grpc.LifecycleServiceServicer):
    """A node agent's LifecycleService: lists its engines, records starts and stops."""

    engines: list[common_pb2.Engine]
    calls: list[str] = field(default_factory=list)

    async def ListEngines(self, request: Any, context: Any) -> Any:
        return lifecycle_pb2.ListEnginesResponse(engines=self.engines)

    async def StartEngine(self, request: Any, context: Any) -> Any:
        self.calls.append(f"start like {request.like_engine_id}")
        return lifecycle_pb2.StartEngineResponse()

    async def StopEngine(self, request: Any, context: Any) -> Any:
        self.calls.append(f"stop {request.engine_id}")
        return lifecycle_pb2.StopEngineResponse()


def ready(engine_id: str, model: str) -> common_pb2.Engine:
    return common_pb2.Engine(engine_id=engine_id, model=model, state=common_pb2.ENGINE_STATE_READY)


@pytest.fixture
async def agents() -> AsyncIterator[dict[str, tuple[Agent, int]]]:
    """Node a runs a chat model's engine, node b an embedding model's."""
    started: dict[str, tuple[Agent, int]] = {}
    servers: list[SageServer] = []
    for node_id, engines in (("a", [ready("a1", "chat")]), ("b", [ready("b1", "embed")])):
        agent = Agent(engines)  # type: ignore[abstract]  # the other RPCs: UNIMPLEMENTED
        server, port = create_server(
            "127.0.0.1:0",
            [
                Registration(
                    lifecycle_pb2.DESCRIPTOR.services_by_name["LifecycleService"].full_name,
                    lifecycle_pb2_grpc.add_LifecycleServiceServicer_to_server,
                    agent,
                )
            ],
        )
        await server.start()
        servers.append(server)
        started[node_id] = (agent, port)
    yield started
    for server in servers:
        await server.stop(0)


async def test_replicas_start_and_stop_on_the_node_agents_that_run_them(
    agents: dict[str, tuple[Agent, int]],
) -> None:
    table = NodeTable(EngineRegistry(), timeout_s=6.0)
    for node_id, (_, port) in agents.items():
        table.report(NodeReport(node_id, f"127.0.0.1:{port}"), register=True, from_store=True)
    # A node whose agent died is passed over, and this host's own lifecycle is not there.
    dead = f"127.0.0.1:{free_port()}"
    table.report(NodeReport("0-dead", dead), register=True, from_store=True)
    own = create_channel(f"127.0.0.1:{free_port()}", default_timeout=2.0)
    actions = LifecycleScalerActions(
        own, 2.0, 5.0, nodes=table.nodes, node_of=lambda engine_id: engine_id[0]
    )
    try:
        await actions.start_replica("embed")
        await actions.start_replica("chat")
        await actions.stop_replica("a1")
    finally:
        await actions.aclose()
        await own.close(None)
    assert agents["a"][0].calls == ["start like a1", "stop a1"]
    assert agents["b"][0].calls == ["start like b1"]
