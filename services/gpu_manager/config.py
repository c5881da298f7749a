"""Settings only the GPU manager reads (SAGE_GPU_* and the Hugging Face cache variables).

Kept beside the service rather than in SageSettings because no other process uses them;
built once in `build_server` and passed down.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .sim_nvml import parse_simulation


class GpuManagerOptions(BaseSettings):
    """Ledger safety margin, reconcile interval, and where model files are looked up."""

    model_config = SettingsConfigDict(
        env_prefix="SAGE_GPU_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
    )

    # Per GPU, the ledger keeps back the larger of this fraction of total memory ...
    reserve_margin_fraction: float = Field(default=0.05, ge=0.0, lt=1.0)
    # ... and this many MiB.
    reserve_margin_mib: int = Field(default=512, ge=0)
    # Seconds between releases of reservations whose owner process is gone; 0 turns it off.
    reconcile_interval_s: float = Field(default=30.0, ge=0.0)
    # Simulated GPUs instead of NVML ("2x80": two of 80 GiB), for CPU-only hosts; empty: off.
    simulate: str = ""
    # Hugging Face hub cache, for estimating model memory from local files.
    hf_hub_cache: Path | None = Field(
        default=None, validation_alias=AliasChoices("hf_hub_cache", "HF_HUB_CACHE")
    )
    hf_home: Path | None = Field(default=None, validation_alias=AliasChoices("hf_home", "HF_HOME"))

    @field_validator("simulate")
    @classmethod
    def _simulation_spec(cls, value: str) -> str:
        if value:
            parse_simulation(value)  # a ValueError here names the setting
        return value

    def hub_cache_dirs(self) -> list[Path]:
        """Where hub snapshots live, most specific first."""
        if self.hf_hub_cache:
            return [self.hf_hub_cache.expanduser()]
        if self.hf_home:
            return [self.hf_home.expanduser() / "hub"]
        return [Path.home() / ".cache" / "huggingface" / "hub"]
