"""Scheduler replicas in etcd mode (issue 21), against a real etcd member and two real
scheduler gRPC servers: engines written to etcd (as lifecycle writes them) route on every
replica, a node whose key goes away has its engines drained everywhere, one replica leads
(autoscaler, placement) and another takes over when its lease dies with it."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest

from sage.common.config.settings import SageSettings
from sage.common.etcd import ClusterKeys, EtcdClient, KeptLease
from sage.common.etcd.testing import EtcdMembers, etcd_binary
from sage.common.exceptions import ServiceUnavailableError
from sage.common.grpc import create_channel
from sage.rpc.common.v1 import common_pb2
from sage.rpc.scheduler.v1 import scheduler_pb2 as pb
from sage.rpc.scheduler.v1 import scheduler_pb2_grpc as pb_grpc
from sage.services.scheduler.server import SchedulerApp, build_scheduler

pytestmark = pytest.mark.skipif(
    etcd_binary() is None, reason="etcd is not installed (scripts/install_system_tools.sh)"
)

TTL_S = 2  # the scheduler replicas' lease (etcd's floor with the test members' timings)
# A crashed leader's key expires at most TTL_S after its last refresh; etcd checks for
# expired leases every 0.5 s and the watch then reaches the follower.
HANDOVER_BOUND_S = TTL_S + 2.0
CHAT = orjson.dumps(
    {"model": "sim", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
)
GiB = 1 << 30


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> float:
    """Seconds until `await predicate()` is truthy; fails naming `what` after `timeout_s`."""
    start = time.monotonic()
    while not await predicate():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s:g}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


@dataclass
class Replica:
    """One scheduler replica and a stub to it."""

    app: SchedulerApp
    stub: Any
    channel: grpc.aio.Channel

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.app.port}"

    async def status(self) -> pb.GetStatusResponse:
        reply: pb.GetStatusResponse = await self.stub.GetStatus(pb.GetStatusRequest())
        return reply

    async def engines(self) -> dict[str, int]:
        reply = await self.stub.ListEngines(pb.ListEnginesRequest())
        return {e.engine_id: e.state for e in reply.engines}

    async def nodes(self) -> dict[str, Any]:
        return {
            n.report.node_id: n for n in (await self.stub.ListNodes(pb.ListNodesRequest())).nodes
        }

    async def metric(self, name: str) -> float:
        text = (await self.stub.GetMetrics(pb.GetMetricsRequest())).prometheus_text.decode()
        values = [float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
        return sum(values)


def replica_settings(home: Path, endpoints: str) -> SageSettings:
    return SageSettings(
        home=home,
        rpc_timeout_s=5.0,
        request_timeout_s=30.0,
        disable_nvml=True,
        etcd_endpoints=endpoints,
        etcd_lease_ttl_s=TTL_S,
        # One ready replica of "sim" under a minimum of two: the leader decides "up" every
        # cooldown (dry-run: logged and counted, nothing started).
        autoscale="sim:2:3",
        autoscale_dry_run=True,
        autoscale_interval_s=0.1,
        autoscale_cooldown_s=0.2,
    )


@dataclass
class Cluster:
    """etcd, a node agent's lease (as lifecycle holds one) and the replicas."""

    members: EtcdMembers
    client: EtcdClient
    keys: ClusterKeys
    agent: KeptLease
    replicas: list[Replica]
    tmp: Path

    async def start_replica(self) -> Replica:
        home = self.tmp / f"sched{len(self.replicas)}"
        app = build_scheduler(replica_settings(home, self.members.endpoints), "127.0.0.1:0")
        await app.server.start()
        channel = create_channel(f"127.0.0.1:{app.port}", default_timeout=10.0)
        replica = Replica(app, pb_grpc.SchedulerServiceStub(channel), channel)
        self.replicas.append(replica)
        return replica

    async def publish_node(self, node_id: str, *engines: str, gpus: int = 1) -> None:
        report = common_pb2.NodeReport(
            node_id=node_id,
            lifecycle_addr="127.0.0.1:1",
            gpu_count=gpus,
            gpus=[
                common_pb2.NodeGpu(index=i, memory_total_bytes=80 * GiB, memory_free_bytes=70 * GiB)
                for i in range(gpus)
            ],
            engine_ids=list(engines),
            agent_instance=f"agent-{node_id}",
        )
        await self.agent.put(self.keys.node(node_id), report.SerializeToString())

    async def publish_engine(self, engine_id: str, base_url: str, node_id: str) -> None:
        engine = common_pb2.Engine(
            engine_id=engine_id,
            model="sim",
            kind=common_pb2.ENGINE_KIND_LLM,
            base_url=base_url,
            state=common_pb2.ENGINE_STATE_READY,
            backend="sim",
            node_id=node_id,
        )
        await self.agent.put(self.keys.engine(engine_id), engine.SerializeToString())


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdMembers]:
    """One real etcd member (not started: a test may start it late)."""
    members = EtcdMembers(tmp_path / "etcd")
    yield members
    members.stop()


@pytest.fixture
async def cluster(etcd: EtcdMembers, tmp_path: Path) -> AsyncIterator[Cluster]:
    """etcd up, two replicas synced."""
    etcd.start()
    etcd.wait_healthy()
    client = EtcdClient(etcd.endpoints)
    agent = KeptLease(client, TTL_S, name="agent-n1")
    await agent.start()
    plane = Cluster(etcd, client, ClusterKeys(), agent, [], tmp_path)
    try:
        for _ in range(2):
            replica = await plane.start_replica()
            await wait_for(partial(_synced, replica), 15, "replica synced from etcd")
        yield plane
    finally:
        for replica in plane.replicas:
            await replica.app.server.stop(0)
            await replica.channel.close(None)
        await agent.close()
        await client.close()


async def _synced(replica: Replica) -> bool:
    return (await replica.status()).synced


async def chat(replica: Replica) -> pb.ChatResponse:
    reply: pb.ChatResponse = await replica.stub.Chat(pb.ChatRequest(model="sim", body=CHAT))
    return reply


async def test_engines_from_etcd_route_on_every_replica_and_leave_with_their_node(
    cluster: Cluster, sim_engine: Callable[..., str]
) -> None:
    url = await asyncio.to_thread(sim_engine)  # off the loop: the leases keep refreshing
    await cluster.publish_node("n1", "e1")
    await cluster.publish_engine("e1", url, "n1")
    ready = common_pb2.ENGINE_STATE_READY
    for replica in cluster.replicas:
        await wait_for(partial(_has, replica, "e1", ready), 5, "e1 routable")
        reply = await chat(replica)
        assert reply.engine_id == "e1"
        assert orjson.loads(reply.body)["choices"][0]["message"]["content"]

    # The agent's node key goes away (its lease expired): every replica drains its engines.
    await cluster.client.delete(cluster.keys.node("n1"))
    draining = common_pb2.ENGINE_STATE_DRAINING
    for replica in cluster.replicas:
        await wait_for(partial(_has, replica, "e1", draining), 5, "e1 drained")
        node = (await replica.nodes())["n1"]
        assert node.state == pb.NODE_STATE_DOWN
        assert "etcd" in node.reason and "lease expired" in node.reason
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await chat(replica)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND  # no ready engine of sim

    # It comes back: routable again everywhere, without any engine being registered twice.
    await cluster.publish_node("n1", "e1")
    for replica in cluster.replicas:
        await wait_for(partial(_has, replica, "e1", ready), 5, "e1 back in routing")
        assert list(await replica.engines()) == ["e1"]
        assert (await replica.nodes())["n1"].last_seen_s_ago == 0.0  # the lease is alive
        assert (await chat(replica)).engine_id == "e1"

    # An engine key deleted (the engine stopped): gone from every replica.
    await cluster.agent.delete(cluster.keys.engine("e1"))
    for replica in cluster.replicas:
        await wait_for(partial(_gone, replica, "e1"), 5, "e1 deregistered")

    # State comes from etcd: registering over gRPC is refused with the fix named.
    replica = cluster.replicas[0]
    with pytest.raises(grpc.aio.AioRpcError) as node_rpc:
        await replica.stub.RegisterNode(
            pb.RegisterNodeRequest(
                report=common_pb2.NodeReport(node_id="x", lifecycle_addr="127.0.0.1:2")
            )
        )
    assert node_rpc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "etcd mode" in (node_rpc.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as engine_rpc:
        await replica.stub.RegisterEngine(
            pb.RegisterEngineRequest(
                engine=common_pb2.Engine(
                    engine_id="e9", model="sim", kind=common_pb2.ENGINE_KIND_LLM, base_url=url
                )
            )
        )
    assert engine_rpc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "e9" not in await replica.engines()


async def _has(replica: Replica, engine_id: str, state: int) -> bool:
    return (await replica.engines()).get(engine_id) == state


async def _gone(replica: Replica, engine_id: str) -> bool:
    return engine_id not in await replica.engines()


async def test_one_leader_places_and_autoscales_and_another_takes_over_after_a_crash(
    cluster: Cluster,
) -> None:
    await cluster.publish_node("n1", "e1", gpus=1)
    await cluster.publish_node("n2", gpus=2)
    await cluster.publish_engine("e1", "http://127.0.0.1:9", "n1")  # never called here

    async def one_leader() -> bool:
        states = [await r.status() for r in cluster.replicas]
        return sum(s.is_leader for s in states) == 1 and all(s.replicas == 2 for s in states)

    await wait_for(one_leader, 5, "one leader of two replicas")
    states = [await r.status() for r in cluster.replicas]
    leader = cluster.replicas[[s.is_leader for s in states].index(True)]
    follower = next(r for r in cluster.replicas if r is not leader)
    assert {s.leader_address for s in states} == {leader.address}
    assert await leader.metric("sage_scheduler_is_leader") == 1.0
    assert await follower.metric("sage_scheduler_is_leader") == 0.0

    # Only the leader's autoscaler decides ("sim" has 1 ready replica, min 2).
    decisions = "sage_scheduler_autoscale_decisions_total"
    await wait_for(partial(_above, leader, decisions, 1), 5, "leader's autoscaler decides")
    assert await follower.metric(decisions) == 0.0

    # PlaceEngine on the follower answers as the leader does, refusals included.
    for request in (
        pb.PlaceEngineRequest(gpus_needed=2, use_gpu=True),
        pb.PlaceEngineRequest(gpus_needed=1, use_gpu=False),
    ):
        by_leader = await leader.stub.PlaceEngine(request)
        by_follower = await follower.stub.PlaceEngine(request)
        assert by_follower.node.report == by_leader.node.report
        assert by_follower.node.state == by_leader.node.state
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await follower.stub.PlaceEngine(pb.PlaceEngineRequest(node_id="nowhere"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nowhere" in (unknown.value.details() or "")

    # The leader crashes: its lease is left to expire, its server stops answering.
    assert leader.app.replica is not None
    await leader.app.replica.aclose(revoke=False)
    await leader.app.server.stop(0)

    async def follower_leads() -> bool:
        return (await follower.status()).is_leader

    took = await wait_for(follower_leads, HANDOVER_BOUND_S + 5, "the follower takes over")
    print(f"leader handover after a crash: {took:.2f}s (TTL {TTL_S}s, bound {HANDOVER_BOUND_S}s)")
    assert took <= HANDOVER_BOUND_S, f"handover took {took:.2f}s, bound {HANDOVER_BOUND_S}s"
    status = await follower.status()
    assert status.leader_address == follower.address
    await wait_for(partial(_replicas, follower, 1), 5, "the crashed replica's key expired")
    assert await follower.metric("sage_scheduler_is_leader") == 1.0

    # The new leader autoscales and places.
    await wait_for(partial(_above, follower, decisions, 1), 5, "new leader's autoscaler decides")
    placed = await follower.stub.PlaceEngine(pb.PlaceEngineRequest(gpus_needed=2, use_gpu=True))
    assert placed.node.report.node_id == "n2"


async def test_without_etcd_replicas_keep_routing_and_none_leads_until_it_is_back(
    cluster: Cluster, sim_engine: Callable[..., str]
) -> None:
    url = await asyncio.to_thread(sim_engine)
    await cluster.publish_node("n1", "e1")
    await cluster.publish_engine("e1", url, "n1")
    for replica in cluster.replicas:
        await wait_for(partial(_has, replica, "e1", common_pb2.ENGINE_STATE_READY), 5, "e1")

    async def leaders() -> int:
        return sum([(await r.status()).is_leader for r in cluster.replicas])

    assert await leaders() == 1
    cluster.members.kill(0)  # the whole etcd cluster (one member) is gone

    async def no_leader() -> bool:
        return await leaders() == 0

    # A leader cut off from etcd steps down once its lease may have expired (TTL): nobody
    # places or autoscales on a view that another replica may no longer share...
    await wait_for(no_leader, HANDOVER_BOUND_S, "the cut-off leader steps down")
    # ...while every replica keeps routing what it last saw.
    for replica in cluster.replicas:
        assert (await chat(replica)).engine_id == "e1"
    with pytest.raises(grpc.aio.AioRpcError) as place:
        await cluster.replicas[0].stub.PlaceEngine(pb.PlaceEngineRequest())
    assert place.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "has not reached etcd" in (place.value.details() or "")

    cluster.members.start(0)
    cluster.members.wait_healthy()

    async def one_leader_again() -> bool:
        return await leaders() == 1

    await wait_for(one_leader_again, 15, "a leader once etcd is back")
    for replica in cluster.replicas:
        assert (await chat(replica)).engine_id == "e1"
        assert (await replica.status()).replicas == 2


async def _above(replica: Replica, name: str, floor: float) -> bool:
    return await replica.metric(name) >= floor


async def _replicas(replica: Replica, count: int) -> bool:
    return (await replica.status()).replicas == count


async def test_a_replica_waits_for_etcd_and_routes_nothing_until_synced(
    etcd: EtcdMembers, tmp_path: Path, sim_engine: Callable[..., str]
) -> None:
    # etcd is not running yet: the replica starts, keeps trying, and does not crash.
    client = EtcdClient(etcd.endpoints)
    plane = Cluster(etcd, client, ClusterKeys(), KeptLease(client, TTL_S), [], tmp_path)
    replica = await plane.start_replica()
    try:
        await asyncio.sleep(1.5)
        status = await replica.status()
        assert not status.synced and not status.is_leader
        with pytest.raises(grpc.aio.AioRpcError) as early:
            await chat(replica)
        assert early.value.code() == grpc.StatusCode.UNAVAILABLE  # retry elsewhere, not a 404
        assert "has not synced" in (early.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as place:
            await replica.stub.PlaceEngine(pb.PlaceEngineRequest())
        assert place.value.code() == grpc.StatusCode.UNAVAILABLE

        etcd.start()
        etcd.wait_healthy()
        # gRPC shares the replica's subchannel, still backing off from refused connects
        # (up to 2 s): the agent's first grant may be refused once more.
        await wait_for(partial(_started, plane.agent), 10, "the agent's lease granted")
        await plane.publish_node("n1", "e1")
        await plane.publish_engine("e1", await asyncio.to_thread(sim_engine), "n1")
        await wait_for(partial(_synced, replica), 15, "synced once etcd is up")
        await wait_for(
            partial(_has, replica, "e1", common_pb2.ENGINE_STATE_READY), 5, "e1 routable"
        )
        assert (await chat(replica)).engine_id == "e1"
        status = await replica.status()
        assert status.is_leader and status.replicas == 1
    finally:
        await replica.app.server.stop(0)
        await replica.channel.close(None)
        await plane.agent.close()
        await client.close()


async def _started(lease: KeptLease) -> bool:
    try:
        await lease.start()
    except ServiceUnavailableError:
        return False
    return True


async def test_the_one_machine_scheduler_is_its_own_leader(settings: SageSettings) -> None:
    app = build_scheduler(settings, "127.0.0.1:0")
    await app.server.start()
    channel = create_channel(f"127.0.0.1:{app.port}", default_timeout=10.0)
    try:
        replica = Replica(app, pb_grpc.SchedulerServiceStub(channel), channel)
        status = await replica.status()
        assert (status.is_leader, status.synced, status.replicas) == (True, True, 1)
        assert status.leader_address == replica.address
        assert await replica.metric("sage_scheduler_is_leader") == 1.0
        assert app.replica is None
    finally:
        await app.server.stop(0)
        await channel.close(None)
