"""GPUResourceManager: NVML readings plus the reservation ledger, SAGE's Python face of it.

The gRPC servicer uses the engine-keyed methods (`reserve`, `release`, `reconcile`,
`gpu_statuses`); SAGE's own methods (`get_system_status`, `check_resource_availability`,
`allocate_resources`, `release_resources`, `estimate_model_memory`) keep their names and
arguments and work in GiB ("GB" in SAGE's names means 2**30 bytes here). All methods block
(NVML, psutil, the ledger file); async callers run them in a thread.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sage.common.exceptions import InsufficientResourcesError, InvalidRequestError, NotFoundError

from .estimate import ModelMemoryEstimator
from .ledger import GiB, Placement, Reservation, ReservationLedger
from .nvml import GpuInfo, GpuSnapshot, NvmlReader

# Engine ids of reservations made through SAGE's anonymous allocate_resources().
ANONYMOUS_PREFIX = "alloc-"


@dataclass(frozen=True)
class GpuStatus:
    """One GPU's reading merged with what the ledger holds on it."""

    gpu: GpuInfo
    reserved_bytes: int
    available_bytes: int
    engine_ids: tuple[str, ...]


@dataclass(frozen=True)
class SystemStatus:
    """Every GPU's status, plus whether NVML could be read and why not."""

    gpus: tuple[GpuStatus, ...]
    nvml_available: bool
    nvml_error: str
    driver_version: str
    safety_margin_bytes: int


def _gib(value: int) -> float:
    return round(value / GiB, 3)


def _bytes(memory_gb: float, param: str) -> int:
    if not memory_gb > 0:  # also NaN
        raise InvalidRequestError(f"{param} must be > 0, got {memory_gb}", param=param)
    return round(memory_gb * GiB)


class GPUResourceManager:
    """Tracks GPU utilisation and logical reservations for engines."""

    def __init__(
        self,
        reader: NvmlReader,
        ledger: ReservationLedger,
        estimator: ModelMemoryEstimator | None = None,
    ) -> None:
        self.reader = reader
        self.ledger = ledger
        self.estimator = estimator or ModelMemoryEstimator()

    # ---- engine-keyed API (the gRPC contract) ------------------------------------------

    def status(self) -> SystemStatus:
        """Readings merged with the ledger."""
        snap = self.reader.read()
        margin = max((self.ledger.margin.bytes_for(g) for g in snap.gpus), default=0)
        return SystemStatus(
            gpus=tuple(
                GpuStatus(
                    gpu=g,
                    reserved_bytes=self.ledger.reserved_on(g.index),
                    available_bytes=self.ledger.available_bytes(g),
                    engine_ids=tuple(self.ledger.engines_on(g.index)),
                )
                for g in snap.gpus
            ),
            nvml_available=snap.nvml_available,
            nvml_error=snap.nvml_error,
            driver_version=snap.driver_version,
            safety_margin_bytes=margin,
        )

    def snapshot(self) -> GpuSnapshot:
        """Raw NVML readings."""
        return self.reader.read()

    def reserve(
        self,
        engine_id: str,
        *,
        gpu_indexes: Sequence[int] = (),
        gpu_count: int = 0,
        memory_per_gpu_bytes: int = 0,
        memory_fraction: float = 0.0,
        owner_pid: int = 0,
    ) -> tuple[Reservation, ...]:
        """Place an engine's memory on fresh readings; all GPUs or none."""
        return self.ledger.reserve(
            engine_id,
            self.reader.read(),
            gpu_indexes=gpu_indexes,
            gpu_count=gpu_count,
            memory_per_gpu_bytes=memory_per_gpu_bytes,
            memory_fraction=memory_fraction,
            owner_pid=owner_pid,
        )

    def release(self, engine_id: str) -> tuple[Reservation, ...]:
        """Free an engine's reservations (NOT_FOUND when it holds none)."""
        return self.ledger.release(engine_id)

    def set_owner(
        self, engine_id: str, owner_pid: int, owner_started_at: float = 0.0
    ) -> tuple[Reservation, ...]:
        """Hand an engine's reservations to a process (NOT_FOUND when it holds none)."""
        return self.ledger.set_owner(engine_id, owner_pid, owner_started_at)

    def reservations(self) -> list[Reservation]:
        """The whole ledger."""
        return self.ledger.all()

    def reconcile(self) -> list[Reservation]:
        """Release reservations whose owner process is gone."""
        return self.ledger.reconcile()

    def close(self) -> None:
        """Release NVML and the ledger's store."""
        try:
            self.reader.close()
        finally:
            self.ledger.close()

    # ---- SAGE's GPUResourceManager methods ---------------------------------------------

    def get_system_status(self) -> list[dict[str, Any]]:
        """One dict per GPU: readings in GiB, what is reserved and still available, engines."""
        return [
            {
                "index": s.gpu.index,
                "uuid": s.gpu.uuid,
                "name": s.gpu.name,
                "memory_total_gb": _gib(s.gpu.memory_total_bytes),
                "memory_used_gb": _gib(s.gpu.memory_used_bytes),
                "memory_free_gb": _gib(s.gpu.memory_free_bytes),
                "memory_reserved_gb": _gib(s.reserved_bytes),
                "memory_available_gb": _gib(s.available_bytes),
                "utilization": s.gpu.utilization_percent,
                "temperature": s.gpu.temperature_celsius,
                "processes": [
                    {"pid": p.pid, "used_memory_gb": _gib(p.used_memory_bytes)}
                    for p in s.gpu.processes
                ],
                "engines": list(s.engine_ids),
            }
            for s in self.status().gpus
        ]

    def check_resource_availability(self, required_memory_gb: float, count: int = 1) -> list[int]:
        """GPU indexes `allocate_resources` would use now, or [] when the ask does not fit."""
        placement = self._plan(required_memory_gb, count)
        return list(placement.gpu_indexes) if placement else []

    def _plan(self, required_memory_gb: float, count: int) -> Placement | None:
        memory = _bytes(required_memory_gb, "required_memory_gb")
        if count < 1:
            raise InvalidRequestError(f"count must be >= 1, got {count}", param="count")
        try:
            return self.ledger.plan(
                self.reader.read(), gpu_count=count, memory_per_gpu_bytes=memory
            )
        except InsufficientResourcesError:
            return None

    def allocate_resources(self, required_memory_gb: float, count: int = 1) -> list[int]:
        """Reserve `required_memory_gb` on each of `count` GPUs without an engine id; returns
        their indexes. Raises InsufficientResourcesError when it does not fit."""
        memory = _bytes(required_memory_gb, "required_memory_gb")
        if count < 1:
            raise InvalidRequestError(f"count must be >= 1, got {count}", param="count")
        made = self.reserve(
            f"{ANONYMOUS_PREFIX}{uuid.uuid4().hex[:12]}",
            gpu_count=count,
            memory_per_gpu_bytes=memory,
        )
        return [r.gpu_index for r in made]

    def release_resources(self, gpu_ids: Sequence[int], memory_gb: float) -> None:
        """Undo one `allocate_resources(memory_gb, len(gpu_ids))` that placed on `gpu_ids`;
        NOT_FOUND when no such allocation is held."""
        memory = _bytes(memory_gb, "memory_gb")
        wanted = sorted(gpu_ids)
        by_engine: dict[str, list[Reservation]] = {}
        for r in self.ledger.all():
            if r.engine_id.startswith(ANONYMOUS_PREFIX):
                by_engine.setdefault(r.engine_id, []).append(r)
        matches = [
            rs
            for rs in by_engine.values()
            if sorted(r.gpu_index for r in rs) == wanted
            and all(r.memory_bytes == memory for r in rs)
        ]
        if not matches:
            raise NotFoundError(
                f"no allocation of {memory_gb} GiB on GPUs {wanted}",
                param="gpu_ids",
                code="reservation_not_found",
            )
        oldest = min(matches, key=lambda rs: rs[0].created_at)
        self.ledger.release(oldest[0].engine_id)

    def estimate_model_memory(self, model_name: str, tensor_parallel_size: int = 1) -> float:
        """GiB one GPU needs for the model at this tensor-parallel size (see estimate.py)."""
        estimate = self.estimator.estimate(model_name, tensor_parallel_size)
        return round(estimate.per_gpu_bytes / GiB, 3)
