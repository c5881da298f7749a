"""Reads GPUs through NVML (`pynvml` from nvidia-ml-py); hosts without a GPU report none."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any


@dataclass(frozen=True)
class GpuProcessInfo:
    """A process holding GPU memory."""

    pid: int
    used_memory_bytes: int


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML reports it."""

    index: int
    uuid: str
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    memory_free_bytes: int
    utilization_percent: int = 0
    temperature_celsius: int = 0
    processes: tuple[GpuProcessInfo, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class GpuSnapshot:
    """Every GPU at one moment, or why NVML could not be read."""

    gpus: tuple[GpuInfo, ...]
    nvml_available: bool
    nvml_error: str = ""
    driver_version: str = ""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlReader:
    """Thread-safe NVML access; NVML calls block, so callers run `read()` in a thread."""

    def __init__(self, nvml: ModuleType | None = None, *, disabled: bool = False) -> None:
        self._lock = threading.Lock()
        self._nvml = nvml
        self._disabled = disabled
        self._initialised = False
        self._init_error = ""

    def _ensure(self) -> Any | None:
        if self._disabled:
            self._init_error = "NVML disabled by SAGE_DISABLE_NVML"
            return None
        if self._initialised:
            return self._nvml
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            self._nvml.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            self._init_error = f"{type(exc).__name__}: {exc}"
            return None
        self._initialised = True
        return self._nvml

    def read(self) -> GpuSnapshot:
        """Current readings; zero GPUs with the reason when NVML is unavailable."""
        with self._lock:
            nvml = self._ensure()
            if nvml is None:
                return GpuSnapshot((), False, self._init_error)
            gpus = []
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)
                try:
                    util = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                except nvml.NVMLError:
                    util = 0
                try:
                    temp = int(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
                except nvml.NVMLError:
                    temp = 0
                try:
                    procs = tuple(
                        GpuProcessInfo(int(p.pid), int(p.usedGpuMemory or 0))
                        for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)
                    )
                except nvml.NVMLError:
                    procs = ()
                gpus.append(
                    GpuInfo(
                        index=index,
                        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                        name=_text(nvml.nvmlDeviceGetName(handle)),
                        memory_total_bytes=int(mem.total),
                        memory_used_bytes=int(mem.used),
                        memory_free_bytes=int(mem.free),
                        utilization_percent=util,
                        temperature_celsius=temp,
                        processes=procs,
                    )
                )
            try:
                driver = _text(nvml.nvmlSystemGetDriverVersion())
            except nvml.NVMLError:
                driver = ""
            return GpuSnapshot(tuple(gpus), True, "", driver)

    def close(self) -> None:
        """Shut NVML down if it was started."""
        with self._lock:
            if self._initialised and self._nvml is not None:
                with contextlib.suppress(Exception):
                    self._nvml.nvmlShutdown()
                self._initialised = False
