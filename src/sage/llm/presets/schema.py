"""The preset file format (version 1): a named list of engines to run together.

Validated strictly (unknown keys are errors) because a typo such as `tensor_paralel`
would otherwise silently start an engine with the wrong resources.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

__all__ = ["BACKEND_NAMES", "NAME_PATTERN", "Preset", "PresetEngine"]

# Names end up in engine labels (`preset:<preset>/<engine>`) and on command lines.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# lifecycle's backends (services/lifecycle/backends, kept equal by a test) and `auto`: a
# misspelt backend fails when the preset is read, not engines later when it is applied.
BACKEND_NAMES = (
    "auto",
    "vllm",
    "sglang",
    "tei",
    "infinity",
    "embedding",
    "transformers",
    "sim",
    "external",
)


class PresetEngine(BaseModel):
    """One engine of a preset; fields mirror `sage llm engine start` flags."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    model: str = Field(min_length=1)
    kind: Literal["llm", "embedding"] = "llm"
    backend: str = Field(default="auto", min_length=1)
    tensor_parallel: int = Field(default=1, ge=1)
    pipeline_parallel: int = Field(default=1, ge=1)
    port: int | None = Field(default=None, ge=1, le=65535)
    label: str | None = Field(default=None, min_length=1)
    max_concurrent_requests: int | None = Field(default=None, ge=1)
    use_gpu: bool | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    extra_args: list[str] = Field(default_factory=list)
    # LoRA adapters can be loaded on it at run time (`sage llm engine adapter load`).
    lora: bool = False
    max_lora_rank: int | None = Field(default=None, ge=1, le=512)

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, backend: str) -> str:
        if backend.strip().lower() not in BACKEND_NAMES:
            raise PydanticCustomError(
                "unknown_backend",
                "unknown backend '{backend}'; choose one of {names}",
                {"backend": backend, "names": ", ".join(BACKEND_NAMES)},
            )
        return backend

    def engine_label(self, preset_name: str) -> str:
        """The label that identifies this engine as started by the preset."""
        return self.label or f"preset:{preset_name}/{self.name}"


class Preset(BaseModel):
    """A preset: `version: 1`, a name, and engines started in the listed order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1]
    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    engines: list[PresetEngine] = Field(min_length=1)

    @field_validator("engines")
    @classmethod
    def _unique_names(cls, engines: list[PresetEngine]) -> list[PresetEngine]:
        seen: dict[str, int] = {}
        for index, engine in enumerate(engines):
            if engine.name in seen:
                # ctx["index"] lets the loader point at the duplicate's own line.
                raise PydanticCustomError(
                    "duplicate_engine_name",
                    "duplicate engine name '{name}' (first used by engines[{first}])",
                    {"name": engine.name, "first": seen[engine.name], "index": index},
                )
            seen[engine.name] = index
        return engines
