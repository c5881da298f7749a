"""The reservation store of etcd mode against a real etcd member: what is saved is what a
new process loads, only changes are written, nodes are apart, and a write whose outcome is
unknown is made right by the next one."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from sage.common.etcd import EtcdClient
from sage.common.etcd.testing import EtcdMembers, etcd_binary
from sage.common.exceptions import ServiceUnavailableError
from sage.services.gpu_manager.etcd_store import EtcdReservationStore, reservation_key
from sage.services.gpu_manager.store import Reservation

pytestmark = pytest.mark.skipif(
    etcd_binary() is None, reason="etcd is not installed (scripts/install_system_tools.sh)"
)

_prefixes = itertools.count()


@pytest.fixture
def prefix() -> str:
    """A node's reservation prefix no other test uses."""
    return f"/t{next(_prefixes)}/gpu/node-a/reservations/"


@pytest.fixture
def stores(etcd: EtcdMembers) -> Iterator[list[EtcdReservationStore]]:
    """Stores a test opens; all closed after."""
    opened: list[EtcdReservationStore] = []
    yield opened
    for store in opened:
        store.close()


def open_store(
    opened: list[EtcdReservationStore],
    endpoints: str,
    prefix: str,
    client: EtcdClient | None = None,
) -> EtcdReservationStore:
    store = EtcdReservationStore(client or EtcdClient(endpoints, timeout_s=2.0), prefix)
    opened.append(store)
    return store


def res(engine_id: str, gpu_index: int = 0, memory_bytes: int = 1 << 30, **kw: Any) -> Reservation:
    return Reservation(engine_id, gpu_index, memory_bytes, **kw)


def raw(etcd: EtcdMembers, prefix: str) -> dict[bytes, bytes]:
    """What etcd holds under `prefix`, read with a client of its own."""

    async def read() -> dict[bytes, bytes]:
        client = EtcdClient(etcd.endpoints)
        try:
            kvs, _ = await client.get_prefix(prefix)
            return {kv.key: kv.value for kv in kvs}
        finally:
            await client.close()

    return asyncio.run(read())


def test_saved_reservations_are_what_a_new_store_loads(
    etcd: EtcdMembers, prefix: str, stores: list[EtcdReservationStore]
) -> None:
    first = open_store(stores, etcd.endpoints, prefix)
    assert first.load() == []
    held = [
        res(
            "tp2", 0, 5 << 30, owner_pid=42, created_at=1.5, gpu_uuid="GPU-0", owner_started_at=9.0
        ),
        res(
            "tp2", 1, 5 << 30, owner_pid=42, created_at=1.5, gpu_uuid="GPU-1", owner_started_at=9.0
        ),
        res("a/b c", 1),  # any engine id: quoted into one key segment
    ]
    first.save(held)
    # One key per reservation, holding the JSON object the file store writes for it.
    keys = raw(etcd, prefix)
    assert sorted(keys) == sorted(
        [f"{prefix}tp2/0".encode(), f"{prefix}tp2/1".encode(), f"{prefix}a%2Fb%20c/1".encode()]
    )
    assert json.loads(keys[f"{prefix}tp2/1".encode()]) == {
        "engine_id": "tp2",
        "gpu_index": 1,
        "memory_bytes": 5 << 30,
        "owner_pid": 42,
        "created_at": 1.5,
        "gpu_uuid": "GPU-1",
        "owner_started_at": 9.0,
    }
    first.close()

    second = open_store(stores, etcd.endpoints, prefix)
    assert sorted(second.load(), key=lambda r: (r.engine_id, r.gpu_index)) == sorted(
        held, key=lambda r: (r.engine_id, r.gpu_index)
    )


def test_a_save_writes_only_what_changed(
    etcd: EtcdMembers, prefix: str, stores: list[EtcdReservationStore]
) -> None:
    store = open_store(stores, etcd.endpoints, prefix)
    store.load()
    store.save([res("a"), res("b")])

    async def revisions() -> dict[bytes, int]:
        client = EtcdClient(etcd.endpoints)
        try:
            kvs, _ = await client.get_prefix(prefix)
            return {kv.key: kv.mod_revision for kv in kvs}
        finally:
            await client.close()

    before = asyncio.run(revisions())
    store.save([res("a", owner_pid=7), res("b")])
    after = asyncio.run(revisions())
    key_a, key_b = f"{prefix}a/0".encode(), f"{prefix}b/0".encode()
    assert after[key_b] == before[key_b], "an unchanged reservation was written again"
    assert after[key_a] > before[key_a]
    store.save([res("b")])
    assert list(raw(etcd, prefix)) == [key_b]


def test_a_change_over_one_transaction_goes_in_several(
    etcd: EtcdMembers, prefix: str, stores: list[EtcdReservationStore]
) -> None:
    store = open_store(stores, etcd.endpoints, prefix)
    store.load()
    many = [res(f"e{i:03}", i % 8) for i in range(300)]
    store.save(many)
    assert len(raw(etcd, prefix)) == 300
    assert len(open_store(stores, etcd.endpoints, prefix).load()) == 300
    store.save([])
    assert raw(etcd, prefix) == {}


def test_nodes_never_see_each_other(
    etcd: EtcdMembers, prefix: str, stores: list[EtcdReservationStore]
) -> None:
    node_a = open_store(stores, etcd.endpoints, prefix)
    # "node-ab" starts with "node-a": the prefix's trailing '/' keeps them apart.
    node_ab = open_store(stores, etcd.endpoints, prefix.replace("node-a/", "node-ab/"))
    node_a.load()
    node_ab.load()
    node_a.save([res("e", 0)])
    node_ab.save([res("e", 1)])
    node_ab.save([])  # deletes only its own
    assert open_store(stores, etcd.endpoints, prefix).load() == [res("e", 0)]


def test_unreadable_records_are_skipped_and_left_alone(
    etcd: EtcdMembers, prefix: str, stores: list[EtcdReservationStore]
) -> None:
    async def plant() -> None:
        client = EtcdClient(etcd.endpoints)
        try:
            await client.put(f"{prefix}junk/0", b"{not json")
            await client.put(f"{prefix}elsewhere/3", json.dumps(asdict(res("x", 0))).encode())
        finally:
            await client.close()

    asyncio.run(plant())
    store = open_store(stores, etcd.endpoints, prefix)
    assert store.load() == []
    store.save([res("ok")])
    assert sorted(raw(etcd, prefix)) == sorted(
        [f"{prefix}junk/0".encode(), f"{prefix}elsewhere/3".encode(), f"{prefix}ok/0".encode()]
    )


class LostReply(EtcdClient):
    """etcd commits the transaction but the reply never arrives (a member dying after the
    commit): the caller sees UNAVAILABLE while the write is in."""

    lose_next = False

    async def apply(
        self, puts: Mapping[str | bytes, bytes], deletes: Iterable[str | bytes] = ()
    ) -> int:
        revision = await super().apply(puts, deletes)
        if self.lose_next:
            self.lose_next = False
            raise ServiceUnavailableError("reply lost")
        return revision


def test_a_write_of_unknown_outcome_is_made_right_by_the_next(
    etcd: EtcdMembers, prefix: str, stores: list[EtcdReservationStore]
) -> None:
    client = LostReply(etcd.endpoints, timeout_s=2.0)
    store = open_store(stores, etcd.endpoints, prefix, client)
    store.load()
    store.save([res("kept")])
    client.lose_next = True
    with pytest.raises(ServiceUnavailableError):
        store.save([res("kept"), res("failed")])  # the ledger stays without "failed"
    # etcd has "failed" although the ledger does not: the next save removes it.
    assert f"{prefix}failed/0".encode() in raw(etcd, prefix)
    store.save([res("kept"), res("next")])
    assert sorted(raw(etcd, prefix)) == sorted(
        [f"{prefix}kept/0".encode(), f"{prefix}next/0".encode()]
    )


def test_no_member_answering_is_unavailable_and_nothing_is_lost(
    tmp_path: Path, stores: list[EtcdReservationStore]
) -> None:
    members = EtcdMembers(tmp_path / "etcd", hosts=["127.0.0.1"])
    members.start()
    members.wait_healthy()
    try:
        prefix = "/gpu/n/reservations/"
        store = open_store(stores, members.endpoints, prefix)
        store.load()
        store.save([res("a")])
        members.kill(0)
        with pytest.raises(ServiceUnavailableError):
            store.save([res("a"), res("b")])
        with pytest.raises(ServiceUnavailableError):
            open_store(stores, members.endpoints, prefix).load()
        members.start(0)
        members.wait_healthy()
        for _ in range(100):  # the channel reconnects within its backoff (at most 2 s)
            try:
                store.save([res("a"), res("c")])
                break
            except ServiceUnavailableError:
                time.sleep(0.1)
        assert sorted(
            r.engine_id for r in open_store(stores, members.endpoints, prefix).load()
        ) == [
            "a",
            "c",
        ]
    finally:
        members.stop()


def test_the_key_names_engine_and_gpu() -> None:
    assert reservation_key("/p/", res("x/y", 3)) == b"/p/x%2Fy/3"
    with pytest.raises(ValueError, match="must end with"):
        EtcdReservationStore(EtcdClient("127.0.0.1:1"), "/p")
