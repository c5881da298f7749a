"""The logical reservation ledger: memory promised to engines, per GPU, never over-committed."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from sage.common.exceptions import ConflictError, InsufficientResourcesError, InvalidRequestError

from .nvml import GpuInfo


@dataclass(frozen=True)
class Reservation:
    """Memory on one GPU held for one engine."""

    engine_id: str
    gpu_index: int
    memory_bytes: int
    owner_pid: int = 0
    created_at: float = 0.0


class ReservationLedger:
    """Reserve/release GPU memory against what NVML says is free, atomically."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_engine: dict[str, tuple[Reservation, ...]] = {}

    def reserved_on(self, gpu_index: int) -> int:
        """Bytes currently reserved on one GPU."""
        with self._lock:
            return self._reserved_on(gpu_index)

    def _reserved_on(self, gpu_index: int) -> int:
        return sum(
            r.memory_bytes
            for rs in self._by_engine.values()
            for r in rs
            if r.gpu_index == gpu_index
        )

    def reserve(
        self,
        engine_id: str,
        gpus: Sequence[GpuInfo],
        *,
        gpu_indexes: Sequence[int] = (),
        gpu_count: int = 0,
        memory_per_gpu_bytes: int = 0,
        memory_fraction: float = 0.0,
        owner_pid: int = 0,
    ) -> tuple[Reservation, ...]:
        """Reserve on the named GPUs, or on the `gpu_count` GPUs with most unreserved memory."""
        if not engine_id:
            raise InvalidRequestError("engine_id is required", param="engine_id")
        if memory_per_gpu_bytes < 0:
            raise InvalidRequestError(
                "memory_per_gpu_bytes must be >= 0", param="memory_per_gpu_bytes"
            )
        if not 0.0 <= memory_fraction <= 1.0:
            raise InvalidRequestError("memory_fraction must be in [0, 1]", param="memory_fraction")
        if not gpus:
            raise InsufficientResourcesError("no GPUs on this host", param="gpu_count")
        by_index = {g.index: g for g in gpus}
        with self._lock:
            if engine_id in self._by_engine:
                raise ConflictError(
                    f"engine {engine_id!r} already holds a reservation", param="engine_id"
                )

            def unreserved(g: GpuInfo) -> int:
                return g.memory_free_bytes - self._reserved_on(g.index)

            if gpu_indexes:
                unknown = [i for i in gpu_indexes if i not in by_index]
                if unknown:
                    raise InvalidRequestError(f"no GPU with index {unknown}", param="gpu_indexes")
                chosen = [by_index[i] for i in gpu_indexes]
            else:
                count = gpu_count or 1
                if count > len(gpus):
                    raise InsufficientResourcesError(
                        f"asked for {count} GPUs, host has {len(gpus)}", param="gpu_count"
                    )
                chosen = sorted(gpus, key=unreserved, reverse=True)[:count]
            now = time.time()
            made = []
            for gpu in chosen:
                need = memory_per_gpu_bytes or int(gpu.memory_total_bytes * memory_fraction)
                if need > unreserved(gpu):
                    raise InsufficientResourcesError(
                        f"GPU {gpu.index} has {unreserved(gpu) / 2**30:.2f} GiB unreserved, "
                        f"{need / 2**30:.2f} GiB requested",
                        param="memory_per_gpu_bytes",
                    )
                made.append(Reservation(engine_id, gpu.index, need, owner_pid, now))
            self._by_engine[engine_id] = tuple(made)
            return tuple(made)

    def release(self, engine_id: str) -> tuple[Reservation, ...]:
        """Drop an engine's reservations; releasing nothing is not an error (idempotent)."""
        with self._lock:
            return self._by_engine.pop(engine_id, ())

    def all(self) -> list[Reservation]:
        """Every reservation, by engine then GPU."""
        with self._lock:
            return [r for _, rs in sorted(self._by_engine.items()) for r in rs]
