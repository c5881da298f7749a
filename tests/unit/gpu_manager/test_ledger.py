"""The ledger's rules: placement, all-or-nothing, bad input, never over-commit (hypothesis and
threads), attribution of usage to owners, reconcile, persistence."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from sage.common.exceptions import (
    ConflictError,
    InsufficientResourcesError,
    InternalError,
    InvalidRequestError,
    NotFoundError,
    SageError,
)
from sage.services.gpu_manager.ledger import Reservation, ReservationLedger, SafetyMargin
from sage.services.gpu_manager.nvml import GpuInfo, GpuProcessInfo, GpuSnapshot
from sage.services.gpu_manager.store import ReservationStore

GiB = 1 << 30
MiB = 1 << 20
NO_MARGIN = SafetyMargin(0.0, 0)


class FakeProbe:
    """A process table: pid -> start time, pid -> descendants."""

    def __init__(self, alive: dict[int, float] | None = None) -> None:
        self.alive = alive if alive is not None else {}
        self.children: dict[int, set[int]] = {}

    def started_at(self, pid: int) -> float | None:
        return self.alive.get(pid)

    def family(self, pid: int) -> frozenset[int]:
        return frozenset({pid, *self.children.get(pid, set())})


def gpu(index: int, free_gib: float, total_gib: float = 80, **kw: object) -> GpuInfo:
    free = int(free_gib * GiB)
    total = int(total_gib * GiB)
    return GpuInfo(index, f"GPU-{index}", "sim", total, total - free, free, **kw)  # type: ignore[arg-type]


def snap(*gpus: GpuInfo) -> GpuSnapshot:
    return GpuSnapshot(tuple(gpus), True)


def ledger(
    margin: SafetyMargin = NO_MARGIN,
    probe: FakeProbe | None = None,
    store: ReservationStore | None = None,
) -> ReservationLedger:
    return ReservationLedger(margin=margin, probe=probe or FakeProbe(), store=store)


# ---- placement ---------------------------------------------------------------------------


def test_named_gpus_get_exactly_the_memory_asked() -> None:
    book = ledger()
    made = book.reserve(
        "e1", snap(gpu(0, 80), gpu(1, 80)), gpu_indexes=[1], memory_per_gpu_bytes=10 * GiB
    )
    assert [(r.engine_id, r.gpu_index, r.memory_bytes, r.gpu_uuid) for r in made] == [
        ("e1", 1, 10 * GiB, "GPU-1")
    ]
    assert book.reserved_on(1) == 10 * GiB and book.reserved_on(0) == 0
    assert book.engines_on(1) == ["e1"]


def test_count_picks_the_gpus_with_most_room() -> None:
    book = ledger()
    s = snap(gpu(0, 20), gpu(1, 70), gpu(2, 50), gpu(3, 60))
    made = book.reserve("tp2", s, gpu_count=2, memory_per_gpu_bytes=30 * GiB)
    assert [r.gpu_index for r in made] == [1, 3]
    # Reservations count against room: now GPU 2 (50) beats 1 and 3 (40 and 30 left).
    (next_one,) = book.reserve("e2", s, gpu_count=1, memory_per_gpu_bytes=1 * GiB)
    assert next_one.gpu_index == 2


def test_fraction_is_of_each_gpus_total() -> None:
    book = ledger()
    made = book.reserve("f", snap(gpu(0, 80, 80), gpu(1, 40, 40)), gpu_count=2, memory_fraction=0.5)
    assert [r.memory_bytes for r in made] == [40 * GiB, 20 * GiB]


def test_tensor_parallel_is_all_or_nothing() -> None:
    book = ledger()
    s = snap(gpu(0, 80), gpu(1, 10))
    with pytest.raises(InsufficientResourcesError) as info:
        book.reserve("tp2", s, gpu_count=2, memory_per_gpu_bytes=20 * GiB)
    assert "1 of 2 GPU(s)" in info.value.message and "GPU 1" in info.value.message
    with pytest.raises(InsufficientResourcesError):
        book.reserve("tp2", s, gpu_indexes=[0, 1], memory_per_gpu_bytes=20 * GiB)
    assert book.all() == [] and book.reserved_on(0) == 0


def test_safety_margin_is_the_larger_of_fraction_and_floor() -> None:
    margin = SafetyMargin(0.05, 512 * MiB)
    assert margin.bytes_for(gpu(0, 80, 80)) == 4 * GiB
    assert margin.bytes_for(gpu(0, 4, 4)) == 512 * MiB
    book = ledger(margin)
    s = snap(gpu(0, 80, 80))
    with pytest.raises(InsufficientResourcesError):
        book.reserve("too-big", s, gpu_indexes=[0], memory_per_gpu_bytes=76 * GiB + 1)
    book.reserve("exact", s, gpu_indexes=[0], memory_per_gpu_bytes=76 * GiB)
    assert book.available_bytes(s.gpus[0]) == 0


# ---- bad input leaves the ledger unchanged -----------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "param"),
    [
        ({"memory_per_gpu_bytes": -1}, InvalidRequestError, "memory_per_gpu_bytes"),
        ({}, InvalidRequestError, "memory_per_gpu_bytes"),
        ({"memory_fraction": -0.1}, InvalidRequestError, "memory_fraction"),
        ({"memory_fraction": 1.5}, InvalidRequestError, "memory_fraction"),
        ({"memory_fraction": math.nan}, InvalidRequestError, "memory_fraction"),
        ({"memory_fraction": 1e-15}, InvalidRequestError, "memory_fraction"),
        (
            {"memory_per_gpu_bytes": GiB, "memory_fraction": 0.5},
            InvalidRequestError,
            "memory_fraction",
        ),
        ({"memory_per_gpu_bytes": GiB, "gpu_count": -1}, InvalidRequestError, "gpu_count"),
        ({"memory_per_gpu_bytes": GiB, "gpu_indexes": [0, 0]}, InvalidRequestError, "gpu_indexes"),
        (
            {"memory_per_gpu_bytes": GiB, "gpu_indexes": [0], "gpu_count": 2},
            InvalidRequestError,
            "gpu_count",
        ),
        ({"memory_per_gpu_bytes": GiB, "owner_pid": -5}, InvalidRequestError, "owner_pid"),
        ({"memory_per_gpu_bytes": GiB, "owner_pid": 999}, InvalidRequestError, "owner_pid"),
        ({"memory_per_gpu_bytes": GiB, "gpu_indexes": [7]}, NotFoundError, "gpu_indexes"),
        ({"memory_per_gpu_bytes": GiB, "gpu_count": 3}, InsufficientResourcesError, "gpu_count"),
        (
            {"memory_per_gpu_bytes": 81 * GiB},
            InsufficientResourcesError,
            "memory_per_gpu_bytes",
        ),
        ({"memory_fraction": 1.0}, InsufficientResourcesError, "memory_fraction"),
    ],
)
def test_bad_reserve_raises_and_changes_nothing(
    kwargs: dict[str, object], error: type[SageError], param: str
) -> None:
    book = ledger(SafetyMargin(0.01, 0))
    s = snap(gpu(0, 80), gpu(1, 80))
    book.reserve("held", s, gpu_indexes=[0], memory_per_gpu_bytes=GiB)
    before = book.all()
    with pytest.raises(error) as info:
        book.reserve("new", s, **kwargs)  # type: ignore[arg-type]
    assert info.value.param == param and info.value.message
    assert book.all() == before


@pytest.mark.parametrize("engine_id", ["", "   ", "x" * 257])
def test_engine_id_is_required_and_bounded(engine_id: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        ledger().reserve(engine_id, snap(gpu(0, 80)), memory_per_gpu_bytes=GiB)
    assert info.value.param == "engine_id"


def test_duplicate_engine_id_is_a_conflict() -> None:
    book = ledger()
    s = snap(gpu(0, 80))
    book.reserve("e1", s, memory_per_gpu_bytes=GiB)
    with pytest.raises(ConflictError) as info:
        book.reserve("e1", s, memory_per_gpu_bytes=GiB)
    assert info.value.param == "engine_id"
    assert book.reserved_on(0) == GiB


def test_unknown_gpu_index_names_the_index_and_host() -> None:
    with pytest.raises(NotFoundError) as info:
        ledger().reserve("e", snap(gpu(0, 80)), gpu_indexes=[0, 3], memory_per_gpu_bytes=GiB)
    assert info.value.code == "gpu_not_found"
    assert "index 3" in info.value.message and "1 GPU(s)" in info.value.message


def test_no_gpus_says_why() -> None:
    cpu_only = GpuSnapshot((), False, "NVMLError_LibraryNotFound: NVML Shared Library Not Found")
    with pytest.raises(InsufficientResourcesError) as info:
        ledger().reserve("e", cpu_only, memory_per_gpu_bytes=GiB)
    assert "LibraryNotFound" in info.value.message


def test_release_returns_what_it_freed_and_unknown_is_not_found() -> None:
    book = ledger()
    made = book.reserve("e1", snap(gpu(0, 80), gpu(1, 80)), gpu_count=2, memory_per_gpu_bytes=GiB)
    assert book.release("e1") == made
    assert book.all() == []
    with pytest.raises(NotFoundError) as info:
        book.release("e1")
    assert info.value.code == "reservation_not_found" and info.value.param == "engine_id"


# ---- never over-commit -------------------------------------------------------------------


def test_concurrent_reserves_never_over_commit() -> None:
    book = ledger(SafetyMargin(0.0, 2 * GiB))
    s = snap(gpu(0, 22))  # room for exactly 20 x 1 GiB
    granted: list[str] = []
    refused: list[str] = []
    start = threading.Barrier(64)

    def ask(i: int) -> None:
        start.wait()
        try:
            book.reserve(f"e{i}", s, gpu_indexes=[0], memory_per_gpu_bytes=GiB)
            granted.append(f"e{i}")
        except InsufficientResourcesError:
            refused.append(f"e{i}")

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 20 and len(refused) == 44
    assert book.reserved_on(0) == 20 * GiB


valid_memory = st.one_of(  # (MiB per GPU, fraction of each GPU's total)
    st.tuples(st.integers(1, 16 * 1024), st.just(0.0)),
    st.tuples(st.just(0), st.floats(0.001, 0.5)),
)
invalid_memory = st.one_of(
    st.tuples(st.integers(-1024, 0), st.just(0.0)),
    st.tuples(st.just(0), st.floats(1.01, 2.0)),
    st.tuples(st.integers(1, 1024), st.floats(0.01, 1.0)),
)
reserve_op = st.fixed_dictionaries(
    {
        "op": st.just("reserve"),
        "engine": st.sampled_from([f"e{i}" for i in range(8)]),
        "placement": st.one_of(  # (gpu_indexes, gpu_count)
            st.tuples(st.just([]), st.integers(0, 3)),
            st.tuples(st.lists(st.integers(0, 3), unique=True, min_size=1, max_size=3), st.just(0)),
            st.sampled_from([([0, 0], 0), ([0], 2)]),
        ),
        "memory": st.integers(0, 9).flatmap(lambda k: invalid_memory if k == 0 else valid_memory),
    }
)
release_op = st.fixed_dictionaries(
    {"op": st.just("release"), "engine": st.sampled_from([f"e{i}" for i in range(8)])}
)


@settings(max_examples=400, deadline=None)
@given(
    free=st.lists(st.integers(0, 80 * 1024), min_size=1, max_size=4),
    margin_fraction=st.floats(0, 0.2),
    ops=st.lists(st.one_of(reserve_op, reserve_op, release_op), min_size=5, max_size=40),
)
def test_ledger_never_over_commits(
    free: list[int], margin_fraction: float, ops: list[dict[str, object]]
) -> None:
    margin = SafetyMargin(margin_fraction, 256 * MiB)
    s = snap(*(gpu(i, mib / 1024) for i, mib in enumerate(free)))
    book = ledger(margin)
    for op in ops:
        before = book.all()
        try:
            if op["op"] == "reserve":
                made = book.reserve(
                    str(op["engine"]),
                    s,
                    gpu_indexes=op["placement"][0],  # type: ignore[index]
                    gpu_count=op["placement"][1],  # type: ignore[index]
                    memory_per_gpu_bytes=op["memory"][0] * MiB,  # type: ignore[index]
                    memory_fraction=op["memory"][1],  # type: ignore[index]
                )
                event("granted")
                assert made and len({r.gpu_index for r in made}) == len(made)
                assert all(r.memory_bytes > 0 for r in made)
            else:
                book.release(str(op["engine"]))
        except SageError as exc:
            event(f"refused: {type(exc).__name__}")
            assert book.all() == before  # a refused call changes nothing
        for g in s.gpus:
            capacity = max(0, g.memory_free_bytes - margin.bytes_for(g))
            assert book.reserved_on(g.index) <= capacity
            if capacity and book.reserved_on(g.index) > capacity // 2:
                event("a GPU more than half reserved")
            assert book.available_bytes(g) >= 0


# ---- usage already visible in NVML is not counted twice ----------------------------------


def owned_gpu(free_gib: float, processes: Iterable[tuple[int, int]]) -> GpuInfo:
    return gpu(0, free_gib, processes=tuple(GpuProcessInfo(p, m) for p, m in processes))


def test_owner_usage_on_the_gpu_is_not_counted_twice() -> None:
    probe = FakeProbe({100: 1.0, 200: 2.0})
    probe.children[100] = {101}  # the engine's worker holds the memory
    book = ledger(probe=probe)
    book.reserve("e1", snap(gpu(0, 80)), memory_per_gpu_bytes=40 * GiB, owner_pid=100)
    # Before it loads: 80 free, 40 promised.
    assert book.available_bytes(gpu(0, 80)) == 40 * GiB
    # Loaded 30 GiB in its worker: NVML free shows it, 10 GiB still outstanding.
    loaded = owned_gpu(50, [(101, 30 * GiB)])
    assert book.available_bytes(loaded) == 40 * GiB
    # Someone else's process is not the owner's: counts as outside use.
    stranger = owned_gpu(50, [(999, 30 * GiB)])
    assert book.available_bytes(stranger) == 10 * GiB


def test_shared_owner_processes_are_not_attributed() -> None:
    """Two reservations with the same owner (e.g. lifecycle's pid): a process in both families
    cannot be told apart, so both reservations count in full (never over-commit)."""
    probe = FakeProbe({100: 1.0})
    probe.children[100] = {101}
    book = ledger(probe=probe)
    s = snap(gpu(0, 80))
    book.reserve("a", s, memory_per_gpu_bytes=30 * GiB, owner_pid=100)
    book.reserve("b", s, memory_per_gpu_bytes=30 * GiB, owner_pid=100)
    loaded = owned_gpu(50, [(101, 30 * GiB)])
    assert book.available_bytes(loaded) == 0  # 50 free - 60 outstanding, never below 0
    # Attributing the 10 GiB to both would claim 30 GiB available; only 70 - 50 more is real.
    assert book.available_bytes(owned_gpu(70, [(101, 10 * GiB)])) == 10 * GiB


# ---- reconcile ---------------------------------------------------------------------------


def test_reconcile_releases_only_reservations_of_gone_owners() -> None:
    probe = FakeProbe({10: 1.0, 20: 2.0, 30: 3.0})
    book = ledger(probe=probe)
    s = snap(gpu(0, 80))
    for engine, pid in (("gone", 10), ("reused", 20), ("alive", 30), ("unowned", 0)):
        book.reserve(engine, s, memory_per_gpu_bytes=GiB, owner_pid=pid)
    assert book.reconcile() == []
    del probe.alive[10]
    probe.alive[20] = 500.0  # pid 20 now belongs to a newer process
    released = book.reconcile()
    assert sorted(r.engine_id for r in released) == ["gone", "reused"]
    assert [r.engine_id for r in book.all()] == ["alive", "unowned"]
    assert book.reconcile() == []


def test_a_reservation_handed_to_its_engine_goes_when_the_engine_does(tmp_path: Path) -> None:
    """Lifecycle reserves without an owner, then hands the reservation to the engine it
    spawned: reconcile releases it once that engine is gone (whoever else is alive)."""
    path = tmp_path / "gpu_reservations.json"
    probe = FakeProbe({500: 50.0, 600: 60.0})
    book = ledger(probe=probe, store=ReservationStore(path))
    book.reserve("tp", snap(gpu(0, 80), gpu(1, 80)), gpu_count=2, memory_per_gpu_bytes=GiB)
    assert book.reconcile() == []  # no owner: never released
    owned = book.set_owner("tp", 500, owner_started_at=50.2)
    assert [(r.owner_pid, r.owner_started_at) for r in owned] == [(500, 50.0), (500, 50.0)]
    # A restarted gpu_manager reads the owner back from disk.
    book = ledger(probe=probe, store=ReservationStore(path))
    assert {r.owner_pid for r in book.all()} == {500}
    assert book.reconcile() == []
    del probe.alive[500]
    assert [r.gpu_index for r in book.reconcile()] == [0, 1]
    assert book.all() == []


def test_set_owner_refuses_what_it_cannot_tell_apart() -> None:
    probe = FakeProbe({500: 50.0})
    book = ledger(probe=probe)
    with pytest.raises(NotFoundError):
        book.set_owner("none", 500)
    book.reserve("e", snap(gpu(0, 80)), memory_per_gpu_bytes=GiB)
    with pytest.raises(InvalidRequestError, match="not a running process"):
        book.set_owner("e", 501)
    # Same pid, another start time: the caller sees a different process (a pid namespace
    # of its own); the owner is left as it was rather than tied to a stranger.
    with pytest.raises(InvalidRequestError, match="pid namespace"):
        book.set_owner("e", 500, owner_started_at=999.0)
    assert [r.owner_pid for r in book.all()] == [0]
    book.set_owner("e", 500)
    assert book.set_owner("e", 0)[0].owner_pid == 0  # cleared again


# ---- persistence -------------------------------------------------------------------------


def test_reservations_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "llm" / "gpu_reservations.json"
    probe = FakeProbe({77: 5.0})
    first = ledger(probe=probe, store=ReservationStore(path))
    s = snap(gpu(0, 80), gpu(1, 80))
    made = first.reserve("tp", s, gpu_count=2, memory_per_gpu_bytes=GiB, owner_pid=77)
    first.reserve("solo", s, gpu_indexes=[1], memory_fraction=0.25)
    first.release("solo")

    second = ledger(probe=probe, store=ReservationStore(path))
    assert second.all() == list(made)
    assert second.reserved_on(0) == GiB
    with pytest.raises(ConflictError):
        second.reserve("tp", s, memory_per_gpu_bytes=GiB)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left
    assert json.loads(path.read_text())["version"] == 1


def test_failed_write_leaves_memory_and_disk_unchanged(tmp_path: Path) -> None:
    class FullDisk(ReservationStore):
        fail = False

        def save(self, reservations: list[Reservation]) -> None:
            if self.fail:
                raise OSError(28, "No space left on device")
            super().save(reservations)

    store = FullDisk(tmp_path / "r.json")
    book = ledger(store=store)
    s = snap(gpu(0, 80))
    book.reserve("kept", s, memory_per_gpu_bytes=GiB)
    on_disk = store.path.read_text()
    store.fail = True
    with pytest.raises(InternalError):
        book.reserve("lost", s, memory_per_gpu_bytes=GiB)
    with pytest.raises(InternalError):
        book.release("kept")
    assert [r.engine_id for r in book.all()] == ["kept"]
    assert store.path.read_text() == on_disk


@pytest.mark.parametrize(
    "content", ["{not json", '{"version": 99}', '{"version": 1, "reservations": [{}]}']
)
def test_unreadable_file_is_moved_aside(tmp_path: Path, content: str) -> None:
    path = tmp_path / "gpu_reservations.json"
    path.write_text(content)
    book = ledger(store=ReservationStore(path))
    assert book.all() == []
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("gpu_reservations.json.corrupt-")]
    assert len(aside) == 1 and aside[0].read_text() == content
    book.reserve("e", snap(gpu(0, 80)), memory_per_gpu_bytes=GiB)
    assert ReservationStore(path).load()[0].engine_id == "e"


def test_store_round_trips_every_field(tmp_path: Path) -> None:
    r = Reservation("e", 3, 5 * GiB, 1234, 1700000000.5, "GPU-abc", 1699999999.25)
    store = ReservationStore(tmp_path / "r.json")
    store.save([r, replace(r, gpu_index=4)])
    assert store.load() == [r, replace(r, gpu_index=4)]
