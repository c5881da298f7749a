"""The NVML adapter against SimNvml (pynvml's functions and exceptions), the real pynvml's
failure on hosts without a driver, and SimNvml's exceptions against the real module's."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pynvml
import pytest

from sage.services.gpu_manager import sim_nvml
from sage.services.gpu_manager.nvml import GpuProcessInfo, NvmlReader
from sage.services.gpu_manager.sim_nvml import (
    NVML_ERROR_DRIVER_NOT_LOADED,
    NVML_ERROR_LIBRARY_NOT_FOUND,
    SimGpu,
    SimNvml,
)

GiB = 1 << 30
MiB = 1 << 20
REPO = Path(__file__).resolve().parents[3]


def test_readings_of_every_field() -> None:
    gpus = [
        SimGpu(
            name="NVIDIA H200",
            total_bytes=140 * GiB,
            used_bytes=30 * GiB,
            reserved_bytes=512 * MiB,
            utilization=87,
            temperature=61,
            processes={4242: 20 * GiB, 4343: None},
        ),
        SimGpu(total_bytes=80 * GiB),
    ]
    snap = NvmlReader(SimNvml(gpus, driver_version="580.1")).read()
    assert snap.nvml_available and snap.nvml_error == "" and snap.driver_version == "580.1"
    first, second = snap.gpus
    assert (first.index, second.index) == (0, 1)
    assert first.uuid.startswith("GPU-") and first.uuid != second.uuid
    assert first.name == "NVIDIA H200"
    # v2 readings: driver-reserved memory is neither used nor free (as nvidia-smi shows).
    assert first.memory_total_bytes == 140 * GiB
    assert first.memory_used_bytes == 30 * GiB
    assert first.memory_free_bytes == 140 * GiB - 30 * GiB - 512 * MiB
    assert (first.utilization_percent, first.temperature_celsius) == (87, 61)
    # usedGpuMemory None (not attributable, e.g. in containers) reads as 0.
    assert first.processes == (GpuProcessInfo(4242, 20 * GiB), GpuProcessInfo(4343, 0))
    assert second.processes == ()


def test_old_driver_without_memory_v2_falls_back_to_v1() -> None:
    gpu = SimGpu(total_bytes=80 * GiB, used_bytes=10 * GiB, reserved_bytes=1 * GiB)
    (reading,) = NvmlReader(SimNvml([gpu], v2_supported=False)).read().gpus
    assert reading.memory_used_bytes == 11 * GiB  # v1 folds reserved into used
    assert reading.memory_free_bytes == 69 * GiB


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (NVML_ERROR_LIBRARY_NOT_FOUND, "NVMLError_LibraryNotFound: NVML Shared Library Not Found"),
        (NVML_ERROR_DRIVER_NOT_LOADED, "NVMLError_DriverNotLoaded: Driver Not Loaded"),
    ],
)
def test_host_without_library_or_driver_reports_zero_gpus(code: int, reason: str) -> None:
    reader = NvmlReader(SimNvml(init_error=code))
    snap = reader.read()
    assert snap.gpus == () and not snap.nvml_available and snap.nvml_error == reason
    reader.close()  # nothing was initialised: no error


def test_driver_loaded_later_is_picked_up() -> None:
    nvml = SimNvml(init_error=NVML_ERROR_DRIVER_NOT_LOADED)
    reader = NvmlReader(nvml)
    assert not reader.read().nvml_available
    nvml.init_error = 0
    assert len(reader.read().gpus) == 1


def test_disabled_never_touches_nvml() -> None:
    nvml = SimNvml()
    snap = NvmlReader(nvml, disabled=True).read()
    assert not snap.nvml_available and "SAGE_DISABLE_NVML" in snap.nvml_error
    assert nvml.init_count == 0


def test_a_lost_gpu_is_reported_and_the_others_still_read() -> None:
    nvml = SimNvml([SimGpu(), SimGpu(lost=True), SimGpu()])
    snap = NvmlReader(nvml).read()
    assert snap.nvml_available
    assert [g.index for g in snap.gpus] == [0, 2]
    assert snap.nvml_error == "GPU 1: NVMLError_GpuIsLost: GPU is lost"


def test_missing_pynvml_package_is_a_reason_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    snap = NvmlReader().read()
    assert not snap.nvml_available and "nvidia-ml-py" in snap.nvml_error


def test_close_shuts_nvml_down_once() -> None:
    nvml = SimNvml()
    reader = NvmlReader(nvml)
    reader.read()
    reader.read()
    assert nvml.init_count == 1
    reader.close()
    reader.close()
    assert nvml.init_count == 0


@pytest.mark.skipif(Path("/dev/nvidia0").exists(), reason="host has an NVIDIA driver")
def test_real_pynvml_on_a_host_without_gpu() -> None:
    snap = NvmlReader().read()
    assert snap.gpus == () and not snap.nvml_available
    assert snap.nvml_error.startswith(("NVMLError_LibraryNotFound", "NVMLError_DriverNotLoaded"))


@pytest.mark.parametrize(
    "name",
    [
        "NVMLError_Uninitialized",
        "NVMLError_InvalidArgument",
        "NVMLError_NotSupported",
        "NVMLError_DriverNotLoaded",
        "NVMLError_LibraryNotFound",
        "NVMLError_FunctionNotFound",
        "NVMLError_GpuIsLost",
        "NVMLError_Unknown",
    ],
)
def test_sim_exceptions_match_pynvml(name: str) -> None:
    real_cls = getattr(pynvml, name)
    sim_cls = getattr(sim_nvml, name)
    code = real_cls().value
    assert sim_cls().value == code
    # NVMLError(code) picks the subclass; str() is pynvml's message for the code.
    real, sim = pynvml.NVMLError(code), sim_nvml.NVMLError(code)
    assert type(real).__name__ == type(sim).__name__ == name
    assert str(real) == str(sim)
    assert isinstance(sim, sim_nvml.NVMLError) and isinstance(sim, Exception)


def test_sim_constants_match_pynvml() -> None:
    assert sim_nvml.nvmlMemory_v2 == pynvml.nvmlMemory_v2
    assert sim_nvml.NVML_TEMPERATURE_GPU == pynvml.NVML_TEMPERATURE_GPU
    for fn in (
        "nvmlInit",
        "nvmlShutdown",
        "nvmlDeviceGetCount",
        "nvmlDeviceGetHandleByIndex",
        "nvmlDeviceGetUUID",
        "nvmlDeviceGetName",
        "nvmlDeviceGetMemoryInfo",
        "nvmlDeviceGetUtilizationRates",
        "nvmlDeviceGetTemperature",
        "nvmlDeviceGetComputeRunningProcesses",
        "nvmlDeviceGetGraphicsRunningProcesses",
        "nvmlSystemGetDriverVersion",
    ):
        assert callable(getattr(pynvml, fn)) and callable(getattr(SimNvml(), fn)), fn


def test_only_the_adapter_imports_pynvml() -> None:
    importers = [
        path.relative_to(REPO).as_posix()
        for root in ("services", "src/sage")
        for path in (REPO / root).rglob("*.py")
        if re.search(r"^\s*(import pynvml|from pynvml)", path.read_text(), re.MULTILINE)
    ]
    assert importers == ["services/gpu_manager/nvml.py"]
