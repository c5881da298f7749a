"""A stand-in for the `pynvml` module: same function names, return shapes and exception
classes (`NVMLError` mapping an error code to `NVMLError_LibraryNotFound`, ...), over
simulated GPUs whose readings tests and CPU-only stacks can set.

It lets `NvmlReader` and everything above it run on hosts without a GPU: unit tests of the
adapter's error handling, gRPC tests that reserve on "GPUs", and `SAGE_GPU_SIMULATE=2x80`
stacks for trying engine placement. It does not import pynvml; a test keeps its exceptions
identical to the real module's.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, ClassVar

from sage.common.config.values import parse_gpu_simulation

# Error codes and messages as in nvml.h / pynvml.
NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999

NVML_TEMPERATURE_GPU = 0
nvmlMemory_v2 = 0x02000028

GiB = 1 << 30
MiB = 1 << 20


class NVMLError(Exception):
    """pynvml's base error: `NVMLError(code)` builds the subclass registered for the code."""

    _valClassMapping: ClassVar[dict[int, type[NVMLError]]] = {}
    _errcode_to_string: ClassVar[dict[int, str]] = {
        NVML_ERROR_UNINITIALIZED: "Uninitialized",
        NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
        NVML_ERROR_NOT_SUPPORTED: "Not Supported",
        NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
        NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
        NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
        NVML_ERROR_GPU_IS_LOST: "GPU is lost",
        NVML_ERROR_UNKNOWN: "Unknown Error",
    }
    value: int

    def __new__(cls, value: int) -> NVMLError:
        target = NVMLError._valClassMapping.get(value, cls) if cls is NVMLError else cls
        obj = Exception.__new__(target)
        obj.value = value
        return obj

    def __str__(self) -> str:
        return self._errcode_to_string.get(self.value, f"NVML Error with code {self.value}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NVMLError) and self.value == other.value

    def __hash__(self) -> int:
        return hash(self.value)


def _error_class(name: str, code: int) -> type[NVMLError]:
    def new(cls: type[NVMLError], *args: Any) -> NVMLError:
        return NVMLError.__new__(cls, code)

    cls = type(name, (NVMLError,), {"__new__": new})
    NVMLError._valClassMapping[code] = cls
    return cls


NVMLError_Uninitialized = _error_class("NVMLError_Uninitialized", NVML_ERROR_UNINITIALIZED)
NVMLError_InvalidArgument = _error_class("NVMLError_InvalidArgument", NVML_ERROR_INVALID_ARGUMENT)
NVMLError_NotSupported = _error_class("NVMLError_NotSupported", NVML_ERROR_NOT_SUPPORTED)
NVMLError_DriverNotLoaded = _error_class("NVMLError_DriverNotLoaded", NVML_ERROR_DRIVER_NOT_LOADED)
NVMLError_LibraryNotFound = _error_class("NVMLError_LibraryNotFound", NVML_ERROR_LIBRARY_NOT_FOUND)
NVMLError_FunctionNotFound = _error_class(
    "NVMLError_FunctionNotFound", NVML_ERROR_FUNCTION_NOT_FOUND
)
NVMLError_GpuIsLost = _error_class("NVMLError_GpuIsLost", NVML_ERROR_GPU_IS_LOST)
NVMLError_Unknown = _error_class("NVMLError_Unknown", NVML_ERROR_UNKNOWN)


@dataclass
class SimGpu:
    """One simulated GPU; tests change its fields between reads."""

    name: str = "NVIDIA Simulated GPU"
    total_bytes: int = 80 * GiB
    used_bytes: int = 0
    # Driver-reserved memory: v2 readings report it apart from `used`, v1 folds it in.
    reserved_bytes: int = 0
    utilization: int = 0
    temperature: int = 35
    # pid -> used bytes; None where NVML cannot attribute memory (as in containers).
    processes: dict[int, int | None] = field(default_factory=dict)
    lost: bool = False
    uuid: str = ""


class SimNvml:
    """Module-like object with pynvml's functions over `gpus`; pass it to NvmlReader.

    `init_error` makes nvmlInit raise that code (LibraryNotFound, DriverNotLoaded, ...);
    `v2_supported=False` behaves like a driver without nvmlDeviceGetMemoryInfo_v2.
    """

    NVMLError = NVMLError
    NVMLError_Uninitialized = NVMLError_Uninitialized
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_DriverNotLoaded = NVMLError_DriverNotLoaded
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    NVMLError_FunctionNotFound = NVMLError_FunctionNotFound
    NVMLError_GpuIsLost = NVMLError_GpuIsLost
    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU
    nvmlMemory_v2 = nvmlMemory_v2

    def __init__(
        self,
        gpus: list[SimGpu] | None = None,
        *,
        init_error: int = NVML_SUCCESS,
        v2_supported: bool = True,
        driver_version: str = "580.00.00-sim",
    ) -> None:
        self.gpus = gpus if gpus is not None else [SimGpu()]
        for i, gpu in enumerate(self.gpus):
            gpu.uuid = gpu.uuid or f"GPU-00000000-0000-0000-0000-{i:012d}"
        self.init_error = init_error
        self.v2_supported = v2_supported
        self.driver_version = driver_version
        self.init_count = 0
        self._lock = threading.Lock()

    def _check(self) -> None:
        if self.init_count <= 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)

    def _gpu(self, handle: Any) -> SimGpu:
        self._check()
        gpu: SimGpu = handle.gpu
        if gpu.lost:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        return gpu

    def nvmlInit(self) -> None:
        """Fails with `init_error` when set, like a host without the library or driver."""
        if self.init_error:
            raise NVMLError(self.init_error)
        with self._lock:
            self.init_count += 1

    def nvmlShutdown(self) -> None:
        """Drops one init reference."""
        self._check()
        with self._lock:
            self.init_count -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        """The driver version string."""
        self._check()
        return self.driver_version

    def nvmlDeviceGetCount(self) -> int:
        """Number of GPUs."""
        self._check()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        """An opaque handle; a lost GPU fails here, as on real hardware."""
        self._check()
        if not 0 <= index < len(self.gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        if self.gpus[index].lost:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        return SimpleNamespace(gpu=self.gpus[index], index=index)

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        """GPU-... UUID string."""
        return self._gpu(handle).uuid

    def nvmlDeviceGetName(self, handle: Any) -> str:
        """Product name."""
        return self._gpu(handle).name

    def nvmlDeviceGetMemoryInfo(self, handle: Any, version: int | None = None) -> Any:
        """v1 (total/free/used, used including driver-reserved) or v2 (reserved apart)."""
        gpu = self._gpu(handle)
        free = gpu.total_bytes - gpu.used_bytes - gpu.reserved_bytes
        if not version:
            return SimpleNamespace(
                total=gpu.total_bytes, free=free, used=gpu.used_bytes + gpu.reserved_bytes
            )
        if not self.v2_supported:
            raise NVMLError(NVML_ERROR_FUNCTION_NOT_FOUND)
        return SimpleNamespace(
            version=version,
            total=gpu.total_bytes,
            reserved=gpu.reserved_bytes,
            free=free,
            used=gpu.used_bytes,
        )

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any:
        """gpu and memory utilisation percent."""
        return SimpleNamespace(gpu=self._gpu(handle).utilization, memory=0)

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        """Core temperature in C."""
        return self._gpu(handle).temperature

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[Any]:
        """Processes with a CUDA context on the GPU (usedGpuMemory None if unknown)."""
        gpu = self._gpu(handle)
        return [
            SimpleNamespace(pid=pid, usedGpuMemory=used, gpuInstanceId=0, computeInstanceId=0)
            for pid, used in gpu.processes.items()
        ]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: Any) -> list[Any]:
        """No graphics processes on a simulated GPU."""
        self._gpu(handle)
        return []


def parse_simulation(spec: str) -> SimNvml:
    """`SimNvml` from `SAGE_GPU_SIMULATE`: "N" (N GPUs of 80 GiB) or "NxG" (G GiB each)."""
    count, size = parse_gpu_simulation(spec)
    return SimNvml(
        [SimGpu(total_bytes=int(size * GiB), reserved_bytes=512 * MiB) for _ in range(count)]
    )
