"""The etcd client, leases, election and prefix mirrors against real etcd members: what
cluster mode relies on (keys dying with their process, one leader, no missed deletes,
losing one member of three unnoticed)."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable

import grpc
import pytest

from sage.common.etcd import Election, EtcdClient, KeptLease, PrefixMirror, parse_endpoints
from sage.common.etcd.client import prefix_end
from sage.common.etcd.testing import EtcdMembers, etcd_binary

pytestmark = pytest.mark.skipif(
    etcd_binary() is None, reason="etcd is not installed (scripts/install_system_tools.sh)"
)


async def wait_for(predicate: Callable[[], bool], timeout_s: float) -> float:
    """Seconds until `predicate()` held; fails after `timeout_s`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"not true within {timeout_s:g}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def test_endpoints_parse_and_name_bad_entries() -> None:
    assert parse_endpoints("http://a:2379, b:2379,,a:2379") == ["a:2379", "b:2379"]
    with pytest.raises(ValueError, match="'a' needs a port"):
        parse_endpoints("a")
    with pytest.raises(ValueError, match="no etcd endpoints"):
        EtcdClient("")
    assert prefix_end(b"/sage/") == b"/sage0"
    assert prefix_end(b"a\xff") == b"b"


async def test_kv_round_trip_and_compare_and_swap(
    etcd_members: Callable[[int], EtcdMembers],
) -> None:
    members = etcd_members(1)
    client = EtcdClient(members.endpoints)
    try:
        assert await client.get("/t/a") is None
        assert await client.create("/t/a", b"1")
        assert not await client.create("/t/a", b"2"), "create must not overwrite"
        kv = await client.get("/t/a")
        assert kv is not None and kv.value == b"1"
        assert not await client.put_if("/t/a", b"3", mod_revision=kv.mod_revision - 1)
        assert await client.put_if("/t/a", b"3", mod_revision=kv.mod_revision)
        await client.put("/t/b", b"x")
        await client.put("/tother", b"y")  # outside the prefix /t/
        kvs, revision = await client.get_prefix("/t/")
        assert [(k.key, k.value) for k in kvs] == [(b"/t/a", b"3"), (b"/t/b", b"x")]
        assert revision >= kvs[-1].mod_revision
        assert await client.delete_prefix("/t/") == 2
        assert await client.get("/tother") is not None
    finally:
        await client.close()


async def test_keys_of_a_dead_process_expire_with_its_lease(
    etcd_members: Callable[[int], EtcdMembers],
) -> None:
    members = etcd_members(1)
    client = EtcdClient(members.endpoints)
    try:
        crashed = KeptLease(client, 2, name="crashed")
        await crashed.start()
        await crashed.put("/n/crashed", b"1")
        clean = KeptLease(client, 2, name="clean")
        await clean.start()
        await clean.put("/n/clean", b"1")
        alive = KeptLease(client, 2, name="alive")
        await alive.start()
        await alive.put("/n/alive", b"1")

        await clean.close()  # a clean stop revokes: gone at once
        assert await client.get("/n/clean") is None
        await crashed.close(revoke=False)  # a crash: no more refreshes
        gone = time.monotonic()
        while await client.get("/n/crashed") is not None:
            assert time.monotonic() - gone < 2 + 3, "leased key outlived its TTL"
            await asyncio.sleep(0.1)
        await asyncio.sleep(2.5)  # longer than the TTL: refreshes keep the live one
        assert await client.get("/n/alive") is not None
        await alive.close()
    finally:
        await client.close()


async def test_a_lost_lease_is_granted_again_and_its_keys_rewritten(
    etcd_members: Callable[[int], EtcdMembers],
) -> None:
    """A partition longer than the TTL: etcd dropped the lease; the process must come back
    with its keys, not stay invisible."""
    members = etcd_members(1)
    client = EtcdClient(members.endpoints)
    try:
        lease = KeptLease(client, 2, name="agent")
        await lease.start()
        await lease.put("/n/agent", b"report")
        first = lease.lease_id
        await client.revoke(first)  # what etcd does when refreshes stop for a TTL
        assert await client.get("/n/agent") is None
        await wait_for(lambda: lease.regrants == 1, 5)
        kv = await client.get("/n/agent")
        assert kv is not None and kv.value == b"report" and kv.lease == lease.lease_id != first
        await lease.close()
    finally:
        await client.close()


async def test_one_leader_and_handover_when_it_dies(
    etcd_members: Callable[[int], EtcdMembers],
) -> None:
    members = etcd_members(1)
    client = EtcdClient(members.endpoints)
    leases: list[KeptLease] = []
    elections: list[Election] = []
    changes: list[tuple[str, bool]] = []
    try:
        for name in ("a", "b", "c"):
            lease = KeptLease(client, 2, name=name)
            await lease.start()
            leases.append(lease)
            election = Election(
                client,
                "/el",
                f"{name}:50051",
                lease=lease,
                on_change=functools.partial(lambda who, now: changes.append((who, now)), name),
            )
            await election.start()
            elections.append(election)
        await wait_for(lambda: all(e.leader_value == "a:50051" for e in elections), 3)
        assert [e.is_leader for e in elections] == [True, False, False]

        await leases[0].close(revoke=False)  # the leader crashes
        took = await wait_for(lambda: elections[1].is_leader, 2 + 3)
        assert took <= 5
        assert not elections[2].is_leader and elections[2].leader_value == "b:50051"

        await elections[1].resign()  # a clean stop hands over at once
        await wait_for(lambda: elections[2].is_leader, 1.5)
        assert ("b", True) in changes and ("b", False) in changes and ("c", True) in changes
    finally:
        for election in elections:
            await election.resign()
        for lease in leases:
            await lease.close()
        await client.close()


async def test_mirror_misses_no_delete_across_a_member_loss(
    etcd_members: Callable[[int], EtcdMembers],
) -> None:
    """Three members; the one the watch reads from is killed; writes go on through the
    others and the mirror ends equal to etcd with every delete seen."""
    members = etcd_members(3)
    writer = EtcdClient(list(reversed(members.endpoints.split(","))))
    reader = EtcdClient(members.endpoints)  # starts on member 0
    deleted: list[str] = []
    mirror = PrefixMirror(reader, "/e/", on_delete=lambda name, _v: deleted.append(name))
    try:
        for i in range(5):
            await writer.put(f"/e/{i}", b"v")
        await mirror.start()
        assert sorted(mirror.items) == ["0", "1", "2", "3", "4"]
        members.kill(0)
        for i in range(3):
            await writer.delete(f"/e/{i}")
        await writer.put("/e/new", b"n")
        await wait_for(lambda: sorted(mirror.items) == ["3", "4", "new"], 10)
        assert sorted(deleted) == ["0", "1", "2"]
        # Unary calls move to a live member too.
        assert (await reader.get("/e/new")) is not None
        assert reader.endpoint != members.members[0].endpoint
    finally:
        await mirror.close()
        await reader.close()
        await writer.close()


async def test_apply_writes_every_key_or_none(
    etcd_members: Callable[[int], EtcdMembers],
) -> None:
    members = etcd_members(1)
    client = EtcdClient(members.endpoints)
    try:
        await client.put("/r/old", b"0")
        await client.apply({"/r/a": b"1", "/r/b": b"2"}, ["/r/old"])
        kvs, _ = await client.get_prefix("/r/")
        assert [(k.key, k.value) for k in kvs] == [(b"/r/a", b"1"), (b"/r/b", b"2")]
        # A transaction etcd refuses (one key twice) changes nothing.
        with pytest.raises(grpc.aio.AioRpcError):
            await client.apply({"/r/c": b"3", "/r/a": b"9"}, ["/r/a"])
        kvs, _ = await client.get_prefix("/r/")
        assert [(k.key, k.value) for k in kvs] == [(b"/r/a", b"1"), (b"/r/b", b"2")]
    finally:
        await client.close()
