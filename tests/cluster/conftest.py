"""The namespace cluster (topology.py) for the fault tests: built once per module (bring-up
is most of the suite's time), checked whole again before each test, torn down even when a
test fails."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.cluster.topology import NODES, Cluster, bring_up, build, start_engines, trim, whole


@pytest.fixture(scope="module")
def cluster_up(tmp_path_factory: pytest.TempPathFactory, internal_token: str) -> Iterator[Cluster]:
    """Three etcd members, two control-plane hosts, two node agents and the engines."""
    workdir = tmp_path_factory.mktemp("cluster")
    cluster = build(workdir, internal_token)
    try:
        bring_up(cluster)
        asyncio.run(start_engines(cluster))
        asyncio.run(whole(cluster, within_s=60))
        yield cluster
    finally:
        cluster.procs.kill_all()
        for i in range(len(cluster.etcd.members)):
            cluster.etcd.kill(i)
        cluster.net.teardown()


@pytest.fixture
async def cluster(cluster_up: Cluster) -> AsyncIterator[Cluster]:
    """The module's cluster, made whole first: what an earlier test took down comes back."""
    for node in NODES:
        cluster_up.net.link_up(node)
    cluster_up.etcd.start()
    await asyncio.to_thread(cluster_up.etcd.wait_healthy, 30)
    dead = [name for name in cluster_up.services() if not cluster_up.procs.procs[name].alive]
    if dead:
        await asyncio.to_thread(cluster_up.start_many, dead)
    await trim(cluster_up)
    await whole(cluster_up)
    yield cluster_up
