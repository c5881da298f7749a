"""The node table over real gRPC and the edge's HTTP, without network namespaces (the
multi-host run itself is test_multihost.py): registration, bad agents, placement, draining."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from sage.common.config.settings import SageSettings
from sage.rpc.common.v1 import common_pb2
from sage.rpc.scheduler.v1 import scheduler_pb2

GiB = 1 << 30
LIST_NODES = scheduler_pb2.ListNodesRequest()


@pytest.fixture
def settings(tmp_path: Path) -> SageSettings:
    """Short node timeout so a silent node is noticed quickly."""
    return SageSettings(
        home=tmp_path / "sage",
        rpc_timeout_s=10.0,
        request_timeout_s=30.0,
        disable_nvml=True,
        node_heartbeat_s=0.2,
        node_timeout_s=1.0,
    )


def report(node_id: str, port: int, *free_gib: int, engines: tuple[str, ...] = ()) -> Any:
    return common_pb2.NodeReport(
        node_id=node_id,
        lifecycle_addr=f"127.0.0.1:{port}",
        gpu_count=len(free_gib),
        gpus=[
            common_pb2.NodeGpu(index=i, memory_total_bytes=80 * GiB, memory_free_bytes=f * GiB)
            for i, f in enumerate(free_gib)
        ],
        engine_ids=list(engines),
        agent_instance=f"agent-{node_id}",
    )


async def register(plane: Any, rep: Any) -> Any:
    return (await plane.scheduler.RegisterNode(scheduler_pb2.RegisterNodeRequest(report=rep))).node


async def test_nodes_register_place_and_refuse_bad_agents(control_plane: Any) -> None:
    await register(control_plane, report("big", 1, 70))
    await register(control_plane, report("wide", 2, 40, 40))
    nodes = (await control_plane.client.get("/v1/management/nodes")).json()
    assert {n["node_id"]: n["state"] for n in nodes["nodes"]} == {"big": "ready", "wide": "ready"}

    async def placed(**fields: Any) -> Any:
        body = {"model_id": "m", "backend": "vllm", "dry_run": True, **fields}
        resp = await control_plane.client.post("/v1/management/engines", json=body)
        return resp.status_code, resp.json()

    assert (await placed())[1]["node"]["node_id"] == "big"
    assert (await placed(tensor_parallel_size=2))[1]["node"]["node_id"] == "wide"
    status, body = await placed(node="nowhere")
    assert status == 404 and "nowhere" in body["error"]["message"]
    status, body = await placed(dry_run="yes")
    assert status == 400 and body["error"]["param"] == "dry_run"

    with pytest.raises(grpc.aio.AioRpcError) as dup:
        await register(control_plane, report("big", 3, 70))
    assert dup.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "127.0.0.1:1" in (dup.value.details() or "")

    liar = await register(control_plane, report("liar", 4, 10))
    assert liar.state == scheduler_pb2.NODE_STATE_READY
    lying = report("liar", 4, 10)
    lying.gpus[0].memory_free_bytes = 100 * GiB
    node = (
        await control_plane.scheduler.NodeHeartbeat(
            scheduler_pb2.NodeHeartbeatRequest(report=lying)
        )
    ).node
    assert node.state == scheduler_pb2.NODE_STATE_UNHEALTHY
    assert "more free memory" in node.reason

    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await control_plane.scheduler.NodeHeartbeat(
            scheduler_pb2.NodeHeartbeatRequest(report=report("stranger", 5))
        )
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as empty:
        await control_plane.scheduler.RegisterNode(scheduler_pb2.RegisterNodeRequest())
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # after all that, the edge still answers
    assert (await control_plane.client.get("/health")).status_code == 200


async def test_gpu_or_cpu_and_the_fallback_are_decided_by_the_scheduler(
    control_plane: Any,
) -> None:
    # The nodes publish which backends never use a GPU; "gpu" also runs an engine, so a
    # CPU engine goes to the idler "cpu" node.
    for rep in (report("gpu", 1, 70, engines=("e1",)), report("cpu", 2)):
        rep.cpu_backends.append("sim")
        await register(control_plane, rep)
    await control_plane.register("e1", "m", "http://127.0.0.1:9", node_id="gpu")

    async def placed(**fields: Any) -> tuple[int, str]:
        body = {"model_id": "m", "dry_run": True, **fields}
        resp = await control_plane.client.post("/v1/management/engines", json=body)
        doc = resp.json()
        answer = doc["node"]["node_id"] if resp.is_success else doc["error"]["message"]
        return resp.status_code, answer

    assert await placed(backend="vllm") == (200, "gpu")
    assert await placed(backend="sim") == (200, "cpu")
    # no node has two GPUs: the automatic choice runs on CPU, an explicit one is refused
    assert await placed(backend="vllm", tensor_parallel_size=2) == (200, "cpu")
    status, message = await placed(backend="vllm", tensor_parallel_size=2, use_gpu=True)
    assert status == 409 and "2 GPUs are needed on one host" in message
    # a direct gRPC caller gets the same decision
    place = control_plane.scheduler.PlaceEngine
    for backend, gpus, node in (("vllm", 1, "gpu"), ("sim", 1, "cpu"), ("", 2, "cpu")):
        request = scheduler_pb2.PlaceEngineRequest(gpus_needed=gpus, backend=backend, gpu_auto=True)
        assert (await place(request)).node.report.node_id == node, backend


async def test_a_silent_node_is_drained_and_restored(control_plane: Any) -> None:
    await register(control_plane, report("n1", 1, engines=("e1",)))
    await control_plane.register("e1", "m", "http://127.0.0.1:9", node_id="n1")

    async def ready() -> int:
        status = (await control_plane.client.get("/v1/management/status")).json()
        return int(status["control_plane"]["instances_ready"])

    assert await ready() == 1
    deadline = time.monotonic() + 10
    while await ready() != 0:  # no heartbeats: the node times out
        assert time.monotonic() < deadline, "the silent node's engine stayed in routing"
        await asyncio.sleep(0.1)
    status = (await control_plane.client.get("/v1/management/status")).json()
    assert [(n["node_id"], n["state"]) for n in status["nodes"]] == [("n1", "down")]
    await control_plane.scheduler.NodeHeartbeat(
        scheduler_pb2.NodeHeartbeatRequest(report=report("n1", 1, engines=("e1",)))
    )
    assert await ready() == 1


async def test_an_engine_is_found_on_the_node_the_routing_table_names(full_plane: Any) -> None:
    # The plane's lifecycle runs a node agent; a second node nobody answers for is added.
    deadline = time.monotonic() + 10
    while not (nodes := (await full_plane.scheduler.ListNodes(LIST_NODES)).nodes):
        assert time.monotonic() < deadline, "the lifecycle's node agent never registered"
        await asyncio.sleep(0.05)
    here = nodes[0].report
    # the agent publishes its lifecycle's facts: which backends never use a GPU
    assert "sim" in here.cpu_backends and "vllm" not in here.cpu_backends
    await register(full_plane, report("far", 1))
    body = {"model_id": "sim", "backend": "sim", "engine_id": "owned", "node": here.node_id}
    started = await full_plane.client.post("/v1/management/engines", json=body)
    assert started.status_code == 201, started.text
    assert started.json()["node_id"] == here.node_id

    got = await full_plane.client.get("/v1/management/engines/owned")
    assert got.status_code == 200 and got.json()["status"] == "RUNNING"
    logs = await full_plane.client.get("/v1/management/engines/owned/logs?lines=5")
    assert logs.status_code == 200 and logs.json()["lines"]
    stopped = await full_plane.client.delete("/v1/management/engines/owned")
    assert stopped.status_code == 200 and stopped.json()["status"] == "STOPPED"
    # out of routing now: the nodes themselves are asked
    gone = await full_plane.client.get("/v1/management/engines/owned")
    assert gone.status_code == 200 and gone.json()["status"] == "STOPPED"
    missing = await full_plane.client.get("/v1/management/engines/nobody")
    assert missing.status_code == 404
