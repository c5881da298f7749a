"""The NVML adapter: the only module that imports `pynvml` (from nvidia-ml-py).

Everything NVML can throw (library missing, driver not loaded, a GPU fallen off the bus)
becomes data here: a host without a GPU reports zero GPUs, `nvml_available=False` and
the reason, and the rest of the service never sees an NVML exception.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("sage.gpu_manager.nvml")


@dataclass(frozen=True)
class GpuProcessInfo:
    """A process holding GPU memory (`used_memory_bytes` is 0 where NVML cannot say)."""

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


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class NvmlReader:
    """Thread-safe NVML access; NVML calls block, so async callers run `read()` in a thread.

    `nvml` is the pynvml module or a stand-in with the same functions and exception
    classes (tests); None imports pynvml on first use.
    """

    def __init__(self, nvml: Any | None = None, *, disabled: bool = False) -> None:
        self._lock = threading.Lock()
        self._nvml = nvml
        self._disabled = disabled
        self._initialised = False

    def _ensure(self) -> tuple[Any | None, str]:
        """The initialised module, or None and why not. Retried on every read, so a driver
        loaded after the service started is picked up."""
        if self._disabled:
            return None, "NVML disabled by SAGE_DISABLE_NVML"
        if self._initialised:
            return self._nvml, ""
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            self._nvml.nvmlInit()
        except ImportError as exc:
            return None, f"pynvml (nvidia-ml-py) is not installed: {exc}"
        except Exception as exc:  # NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
            return None, _describe(exc)
        self._initialised = True
        return self._nvml, ""

    def read(self) -> GpuSnapshot:
        """Current readings; zero GPUs with the reason when NVML is unavailable. Never raises."""
        with self._lock:
            nvml, reason = self._ensure()
            if nvml is None:
                return GpuSnapshot((), False, reason)
            try:
                count = int(nvml.nvmlDeviceGetCount())
            except Exception as exc:
                return GpuSnapshot((), False, _describe(exc))
            gpus: list[GpuInfo] = []
            errors: list[str] = []
            for index in range(count):
                try:
                    gpus.append(self._read_gpu(nvml, index))
                except Exception as exc:  # e.g. NVMLError_GpuIsLost: report the others
                    log.warning("cannot read GPU %d: %s", index, _describe(exc))
                    errors.append(f"GPU {index}: {_describe(exc)}")
            driver = ""
            with contextlib.suppress(Exception):
                driver = _text(nvml.nvmlSystemGetDriverVersion())
            return GpuSnapshot(tuple(gpus), True, "; ".join(errors), driver)

    @staticmethod
    def _read_gpu(nvml: Any, index: int) -> GpuInfo:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        try:
            # v2 separates driver-reserved memory from `used`, as nvidia-smi does.
            mem = nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
        except Exception:  # older drivers and bindings: v1, where used = total - free
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
        util = 0
        with contextlib.suppress(nvml.NVMLError):
            util = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        temp = 0
        with contextlib.suppress(nvml.NVMLError):
            temp = int(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
        by_pid: dict[int, int] = {}
        for getter in (
            nvml.nvmlDeviceGetComputeRunningProcesses,
            nvml.nvmlDeviceGetGraphicsRunningProcesses,
        ):
            with contextlib.suppress(nvml.NVMLError):
                for proc in getter(handle):
                    # usedGpuMemory is None where NVML cannot attribute memory (containers).
                    used = int(proc.usedGpuMemory or 0)
                    by_pid[int(proc.pid)] = max(by_pid.get(int(proc.pid), 0), used)
        return GpuInfo(
            index=index,
            uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
            name=_text(nvml.nvmlDeviceGetName(handle)),
            memory_total_bytes=int(mem.total),
            memory_used_bytes=int(mem.used),
            memory_free_bytes=int(mem.free),
            utilization_percent=util,
            temperature_celsius=temp,
            processes=tuple(GpuProcessInfo(pid, used) for pid, used in sorted(by_pid.items())),
        )

    def close(self) -> None:
        """Shut NVML down if it was started."""
        with self._lock:
            if self._initialised and self._nvml is not None:
                with contextlib.suppress(Exception):
                    self._nvml.nvmlShutdown()
                self._initialised = False
