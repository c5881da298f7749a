"""Real etcd members (Debian's etcd-server) on loopback ports for the etcd client tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sage.common.etcd.testing import EtcdMembers


@pytest.fixture
def etcd_members(tmp_path: Path) -> Iterator[Callable[[int], EtcdMembers]]:
    """`etcd_members(n)` starts an n-member cluster and waits until it has a leader."""
    started: list[EtcdMembers] = []

    def start(n: int) -> EtcdMembers:
        members = EtcdMembers(tmp_path / f"etcd{len(started)}", hosts=["127.0.0.1"] * n)
        started.append(members)
        members.start()
        members.wait_healthy()
        return members

    yield start
    for members in started:
        members.stop()
