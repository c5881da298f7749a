"""The logical reservation ledger: GPU memory promised to engines, never over-committed.

What a new reservation may get on a GPU is

    NVML free - safety margin - outstanding reservations on that GPU

where a reservation is *outstanding* for the part its owner has not yet allocated: an engine
that has loaded its weights already shows in NVML's free memory and must not be counted
twice, while one still starting shows nowhere but in the ledger. Usage is attributed to a
reservation only when the process on the GPU belongs to its owner alone; otherwise the
whole reservation counts (conservative: it can waste memory, never over-commit).

Every change is written to the store (when one is given: the JSON file, or etcd in etcd
mode) before it takes effect, under one lock, so concurrent reserve calls and a crash
between them both leave a consistent ledger.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from sage.common.exceptions import (
    ConflictError,
    InsufficientResourcesError,
    InternalError,
    InvalidRequestError,
    NotFoundError,
)

from .nvml import GpuInfo, GpuSnapshot
from .owners import ProcessProbe, PsutilProbe
from .store import LedgerStore, Reservation

__all__ = ["Placement", "Reservation", "ReservationLedger", "SafetyMargin"]

MiB = 1 << 20
GiB = 1 << 30
MAX_ENGINE_ID_LENGTH = 256


@dataclass(frozen=True)
class SafetyMargin:
    """Memory per GPU the ledger never hands out: the larger of a fraction of the GPU's total
    and a floor (CUDA contexts, fragmentation, NVML readings that lag allocations)."""

    fraction: float = 0.05
    min_bytes: int = 512 * MiB

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"safety margin fraction must be in [0, 1), got {self.fraction}")
        if self.min_bytes < 0:
            raise ValueError(f"safety margin floor must be >= 0, got {self.min_bytes}")

    def bytes_for(self, gpu: GpuInfo) -> int:
        """The margin on this GPU."""
        return max(int(gpu.memory_total_bytes * self.fraction), self.min_bytes)


@dataclass(frozen=True)
class Placement:
    """Where a request would go: the GPUs and the bytes on each (same order)."""

    gpu_indexes: tuple[int, ...]
    memory_bytes: tuple[int, ...]


class ReservationLedger:
    """Reserve/release GPU memory against NVML readings, all or nothing, persisted."""

    def __init__(
        self,
        *,
        margin: SafetyMargin | None = None,
        store: LedgerStore | None = None,
        probe: ProcessProbe | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.margin = margin or SafetyMargin()
        self._store = store
        self._probe: ProcessProbe = probe or PsutilProbe()
        self._clock = clock
        self._lock = threading.Lock()
        self._by_engine: dict[str, tuple[Reservation, ...]] = {}
        if store is not None:
            for r in store.load():
                self._by_engine[r.engine_id] = (*self._by_engine.get(r.engine_id, ()), r)

    # ---- reading ---------------------------------------------------------------------

    def all(self) -> list[Reservation]:
        """Every reservation, by engine then GPU."""
        with self._lock:
            return [r for _, rs in sorted(self._by_engine.items()) for r in rs]

    def reserved_on(self, gpu_index: int) -> int:
        """Bytes currently reserved on one GPU."""
        with self._lock:
            return sum(r.memory_bytes for r in self._on(gpu_index))

    def engines_on(self, gpu_index: int) -> list[str]:
        """Engines holding a reservation on one GPU."""
        with self._lock:
            return sorted({r.engine_id for r in self._on(gpu_index)})

    def available_bytes(self, gpu: GpuInfo) -> int:
        """What a new reservation could get on this GPU now (never negative)."""
        with self._lock:
            return max(0, self._available(gpu))

    def _on(self, gpu_index: int) -> Iterable[Reservation]:
        return (r for rs in self._by_engine.values() for r in rs if r.gpu_index == gpu_index)

    def _available(self, gpu: GpuInfo) -> int:
        outstanding = self._outstanding(gpu)
        return gpu.memory_free_bytes - self.margin.bytes_for(gpu) - outstanding

    def _outstanding(self, gpu: GpuInfo) -> int:
        """Reserved bytes on `gpu` its owners do not yet hold (see the module docstring)."""
        here = list(self._on(gpu.index))
        if not here:
            return 0
        on_gpu = {p.pid: p.used_memory_bytes for p in gpu.processes}
        pids_on_gpu = frozenset(on_gpu)
        families: dict[str, frozenset[int]] = {
            r.engine_id: (
                self._probe.family(r.owner_pid) & pids_on_gpu
                if r.owner_pid and pids_on_gpu
                else frozenset()
            )
            for r in here
        }
        claims: dict[int, int] = {}
        for pids in families.values():
            for pid in pids:
                claims[pid] = claims.get(pid, 0) + 1
        total = 0
        for r in here:
            used = sum(on_gpu[pid] for pid in families[r.engine_id] if claims[pid] == 1)
            total += max(0, r.memory_bytes - used)
        return total

    # ---- placing ---------------------------------------------------------------------

    def plan(
        self,
        snapshot: GpuSnapshot,
        *,
        gpu_indexes: Sequence[int] = (),
        gpu_count: int = 0,
        memory_per_gpu_bytes: int = 0,
        memory_fraction: float = 0.0,
    ) -> Placement:
        """Where a reservation would go now, without making it; raises what `reserve` would."""
        _check_memory(memory_per_gpu_bytes, memory_fraction)
        with self._lock:
            return self._plan(
                snapshot, gpu_indexes, gpu_count, memory_per_gpu_bytes, memory_fraction
            )

    def _plan(
        self,
        snapshot: GpuSnapshot,
        gpu_indexes: Sequence[int],
        gpu_count: int,
        memory_per_gpu_bytes: int,
        memory_fraction: float,
    ) -> Placement:
        gpus = {g.index: g for g in snapshot.gpus}
        where = _host_note(snapshot)

        def need(gpu: GpuInfo) -> int:
            return memory_per_gpu_bytes or int(gpu.memory_total_bytes * memory_fraction)

        if gpu_indexes:
            if gpu_count and gpu_count != len(gpu_indexes):
                raise InvalidRequestError(
                    f"gpu_count {gpu_count} does not match {len(gpu_indexes)} gpu_indexes",
                    param="gpu_count",
                )
            if len(set(gpu_indexes)) != len(gpu_indexes):
                raise InvalidRequestError(
                    f"gpu_indexes repeats a GPU: {list(gpu_indexes)}", param="gpu_indexes"
                )
            unknown = [i for i in gpu_indexes if i not in gpus]
            if unknown:
                raise NotFoundError(
                    f"no GPU with index {', '.join(map(str, unknown))} ({where})",
                    param="gpu_indexes",
                    code="gpu_not_found",
                )
            chosen = [gpus[i] for i in gpu_indexes]
            for gpu in chosen:
                if need(gpu) > self._available(gpu):
                    raise InsufficientResourcesError(
                        _short_of(gpu, need(gpu), self._available(gpu)),
                        param="memory_per_gpu_bytes" if memory_per_gpu_bytes else "memory_fraction",
                    )
        else:
            count = gpu_count or 1
            if count > len(gpus):
                raise InsufficientResourcesError(
                    f"asked for {count} GPU(s), {where}", param="gpu_count"
                )
            fits = [g for g in gpus.values() if need(g) <= self._available(g)]
            if len(fits) < count:
                best = sorted(gpus.values(), key=self._available, reverse=True)[:count]
                detail = "; ".join(_short_of(g, need(g), self._available(g)) for g in best)
                raise InsufficientResourcesError(
                    f"only {len(fits)} of {len(gpus)} GPU(s) can hold the request, "
                    f"{count} needed: {detail}",
                    param="memory_per_gpu_bytes" if memory_per_gpu_bytes else "memory_fraction",
                )
            # Most room first keeps big holes for big engines less well than best-fit would,
            # but spreads load and keeps tensor-parallel groups on equally free GPUs.
            chosen = sorted(fits, key=lambda g: (-self._available(g), g.index))[:count]
            chosen.sort(key=lambda g: g.index)
        if any(need(g) <= 0 for g in chosen):
            raise InvalidRequestError(
                f"memory_fraction {memory_fraction} is less than one byte", param="memory_fraction"
            )
        return Placement(tuple(g.index for g in chosen), tuple(need(g) for g in chosen))

    def reserve(
        self,
        engine_id: str,
        snapshot: GpuSnapshot,
        *,
        gpu_indexes: Sequence[int] = (),
        gpu_count: int = 0,
        memory_per_gpu_bytes: int = 0,
        memory_fraction: float = 0.0,
        owner_pid: int = 0,
    ) -> tuple[Reservation, ...]:
        """Reserve on the named GPUs, or on `gpu_count` GPUs (tensor parallel) with the most
        room; every GPU or none. The ledger is unchanged when this raises."""
        _check_engine_id(engine_id)
        _check_memory(memory_per_gpu_bytes, memory_fraction)
        if gpu_count < 0:
            raise InvalidRequestError("gpu_count must be >= 0", param="gpu_count")
        if owner_pid < 0:
            raise InvalidRequestError("owner_pid must be >= 0", param="owner_pid")
        owner_started = 0.0
        if owner_pid:
            started = self._probe.started_at(owner_pid)
            if started is None:
                raise InvalidRequestError(
                    f"owner_pid {owner_pid} is not a running process", param="owner_pid"
                )
            owner_started = started
        uuids = {g.index: g.uuid for g in snapshot.gpus}
        with self._lock:
            if engine_id in self._by_engine:
                raise ConflictError(
                    f"engine {engine_id!r} already holds a reservation; release it first",
                    param="engine_id",
                )
            placement = self._plan(
                snapshot, gpu_indexes, gpu_count, memory_per_gpu_bytes, memory_fraction
            )
            now = self._clock()
            made = tuple(
                Reservation(
                    engine_id=engine_id,
                    gpu_index=index,
                    memory_bytes=need,
                    owner_pid=owner_pid,
                    created_at=now,
                    gpu_uuid=uuids.get(index, ""),
                    owner_started_at=owner_started,
                )
                for index, need in zip(placement.gpu_indexes, placement.memory_bytes, strict=True)
            )
            self._commit({**self._by_engine, engine_id: made})
            return made

    def release(self, engine_id: str) -> tuple[Reservation, ...]:
        """Drop an engine's reservations; an engine holding none is NOT_FOUND."""
        with self._lock:
            if engine_id not in self._by_engine:
                raise NotFoundError(
                    f"no reservation for engine {engine_id!r}",
                    param="engine_id",
                    code="reservation_not_found",
                )
            released = self._by_engine[engine_id]
            self._commit({k: v for k, v in self._by_engine.items() if k != engine_id})
            return released

    def set_owner(
        self, engine_id: str, owner_pid: int, owner_started_at: float = 0.0
    ) -> tuple[Reservation, ...]:
        """Make `owner_pid` the owner of an engine's reservations (0: no owner). Lifecycle
        hands them to the engine once it is spawned, so they go when the engine dies, even
        if lifecycle is gone by then. `owner_started_at` (the start time the caller sees,
        0: unknown) tells a process of the caller's from another one with the same pid
        here: a caller in another pid namespace (a container) is refused, not misread."""
        if owner_pid < 0:
            raise InvalidRequestError("owner_pid must be >= 0", param="owner_pid")
        owner_started = 0.0
        if owner_pid:
            started = self._probe.started_at(owner_pid)
            if started is None:
                raise InvalidRequestError(
                    f"owner_pid {owner_pid} is not a running process on gpu_manager's host "
                    "(or in its pid namespace)",
                    param="owner_pid",
                )
            if owner_started_at and started and abs(started - owner_started_at) > 1.0:
                raise InvalidRequestError(
                    f"owner_pid {owner_pid} is another process here than the caller's "
                    "(start times differ): gpu_manager and the caller do not share a pid "
                    "namespace",
                    param="owner_pid",
                )
            owner_started = started
        with self._lock:
            if engine_id not in self._by_engine:
                raise NotFoundError(
                    f"no reservation for engine {engine_id!r}",
                    param="engine_id",
                    code="reservation_not_found",
                )
            owned = tuple(
                replace(r, owner_pid=owner_pid, owner_started_at=owner_started)
                for r in self._by_engine[engine_id]
            )
            self._commit({**self._by_engine, engine_id: owned})
            return owned

    def reconcile(self) -> list[Reservation]:
        """Release every reservation whose owner process is gone (or whose pid now belongs to
        a different process); returns what was released."""

        def owner(rs: tuple[Reservation, ...]) -> tuple[int, float]:
            return rs[0].owner_pid, rs[0].owner_started_at

        # Ask the process table outside the lock; reserve() only accepts live owners, so an
        # owner found gone here cannot gain a reservation before the second look.
        with self._lock:
            owners = {owner(rs) for rs in self._by_engine.values() if rs[0].owner_pid}
        gone = {o for o in owners if not self._alive(*o)}
        if not gone:
            return []
        with self._lock:
            dead = {k: v for k, v in self._by_engine.items() if owner(v) in gone}
            if not dead:
                return []
            self._commit({k: v for k, v in self._by_engine.items() if k not in dead})
            return [r for _, rs in sorted(dead.items()) for r in rs]

    def _alive(self, pid: int, started_at: float) -> bool:
        now_started = self._probe.started_at(pid)
        if now_started is None:
            return False
        # Start times of one process agree to well under a second; 0 means unknown.
        return not (started_at and now_started and abs(now_started - started_at) > 1.0)

    @property
    def store_where(self) -> str:
        """Where the ledger is persisted ("memory only" without a store), for logs."""
        return self._store.where if self._store is not None else "memory only"

    def close(self) -> None:
        """Close the store (the ledger is not used after)."""
        if self._store is not None:
            self._store.close()

    def _commit(self, new_state: dict[str, tuple[Reservation, ...]]) -> None:
        """Persist, then switch; a failed write leaves memory as it was (a store that cannot
        reach etcd raises ServiceUnavailableError, which callers see as UNAVAILABLE)."""
        if self._store is not None:
            try:
                self._store.save([r for _, rs in sorted(new_state.items()) for r in rs])
            except OSError as exc:
                raise InternalError(f"cannot persist GPU reservations: {exc}") from exc
        self._by_engine = new_state


def _check_engine_id(engine_id: str) -> None:
    if not engine_id or not engine_id.strip():
        raise InvalidRequestError("engine_id is required", param="engine_id")
    if len(engine_id) > MAX_ENGINE_ID_LENGTH:
        raise InvalidRequestError(
            f"engine_id is longer than {MAX_ENGINE_ID_LENGTH} characters", param="engine_id"
        )


def _check_memory(memory_per_gpu_bytes: int, memory_fraction: float) -> None:
    if memory_per_gpu_bytes < 0:
        raise InvalidRequestError(
            f"memory_per_gpu_bytes must be > 0, got {memory_per_gpu_bytes}",
            param="memory_per_gpu_bytes",
        )
    if not 0.0 <= memory_fraction <= 1.0:  # also rejects NaN
        raise InvalidRequestError(
            f"memory_fraction must be in (0, 1], got {memory_fraction}", param="memory_fraction"
        )
    if memory_per_gpu_bytes and memory_fraction:
        raise InvalidRequestError(
            "give memory_per_gpu_bytes or memory_fraction, not both",
            param="memory_fraction",
        )
    if not memory_per_gpu_bytes and not memory_fraction:
        raise InvalidRequestError(
            "memory_per_gpu_bytes or memory_fraction must be > 0",
            param="memory_per_gpu_bytes",
        )


def _host_note(snapshot: GpuSnapshot) -> str:
    if not snapshot.nvml_available:
        return f"host has no usable GPU: {snapshot.nvml_error}"
    return f"host has {len(snapshot.gpus)} GPU(s)"


def _short_of(gpu: GpuInfo, need: int, available: int) -> str:
    return (
        f"GPU {gpu.index} has {max(0, available) / GiB:.2f} GiB available "
        f"(free {gpu.memory_free_bytes / GiB:.2f} GiB less margin and reservations), "
        f"{need / GiB:.2f} GiB requested"
    )
