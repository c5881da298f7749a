"""Applying a preset: start what is missing, keep what already runs, undo on failure.

Idempotent by label: every engine a preset starts carries the label
`preset:<preset>/<engine>` (or the engine's own `label`), so a second apply recognises
its engines and starts nothing new. Engines start one at a time, in file order, because
later engines often depend on GPU memory the earlier ones leave free.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from sage.common.exceptions import EngineStartError, SageError
from sage.llm.management import EngineInfo, EngineKind

from .schema import Preset, PresetEngine

__all__ = [
    "AppliedEngine",
    "ApplyEvent",
    "ApplyResult",
    "EngineControl",
    "PresetApplyError",
    "ProgressCallback",
    "apply_preset",
]

# An engine in one of these states already serves (or is about to): never start a twin.
PRESENT_STATUSES = frozenset({"RUNNING", "STARTING"})


class EngineControl(Protocol):
    """The part of ManagementClient that applying a preset needs."""

    def list_engines(self) -> list[EngineInfo]:
        """Every engine the control plane knows."""
        ...

    def start_engine(
        self,
        model_id: str,
        *,
        engine_kind: EngineKind = "llm",
        backend: str = "auto",
        tensor_parallel_size: int | None = None,
        pipeline_parallel_size: int | None = None,
        port: int | None = None,
        engine_label: str | None = None,
        max_concurrent_requests: int | None = None,
        use_gpu: bool | None = None,
        extra_args: Sequence[str] | None = None,
        metadata: Mapping[str, str] | None = None,
        enable_lora: bool = False,
        max_lora_rank: int | None = None,
    ) -> EngineInfo:
        """Start one engine and wait until it is ready."""
        ...

    def stop_engine(self, engine_id: str, drain: bool = False) -> EngineInfo:
        """Stop one engine."""
        ...


EventKind = Literal[
    "keep", "would_start", "starting", "started", "failed", "stopping", "stopped", "stop_failed"
]


@dataclass(frozen=True)
class ApplyEvent:
    """A step of an apply, for progress display: what happened to which preset engine."""

    kind: EventKind
    name: str
    spec: PresetEngine
    engine: EngineInfo | None = None
    error: str | None = None


ProgressCallback = Callable[[ApplyEvent], None]


@dataclass(frozen=True)
class AppliedEngine:
    """A preset engine and the running engine that stands for it."""

    name: str
    engine: EngineInfo

    def to_json(self) -> dict[str, Any]:
        """Plain data for `--json` output."""
        return {"name": self.name, "engine": self.engine.model_dump(mode="json")}


@dataclass
class ApplyResult:
    """What an apply did (or, with dry_run, would do)."""

    preset: Preset
    dry_run: bool = False
    kept: list[AppliedEngine] = field(default_factory=list)
    started: list[AppliedEngine] = field(default_factory=list)
    planned: list[PresetEngine] = field(default_factory=list)
    failed: str | None = None
    error: str | None = None
    rolled_back: list[str] = field(default_factory=list)
    rollback_errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no engine failed."""
        return self.failed is None

    def to_json(self) -> dict[str, Any]:
        """Plain data for `--json` output."""
        return {
            "preset": self.preset.name,
            "dry_run": self.dry_run,
            "ok": self.ok,
            "kept": [a.to_json() for a in self.kept],
            "started": [a.to_json() for a in self.started],
            "planned": [e.model_dump(mode="json") for e in self.planned],
            "failed": self.failed,
            "error": self.error,
            "rolled_back": self.rolled_back,
            "rollback_errors": self.rollback_errors,
        }


class PresetApplyError(EngineStartError):
    """An engine of the preset did not start; `result` says what was started and undone."""

    default_code = "preset_apply_failed"

    def __init__(self, message: str, result: ApplyResult) -> None:
        super().__init__(message, param=result.failed)
        self.result = result


def _matches(engine: EngineInfo, spec: PresetEngine, label: str) -> bool:
    return (
        engine.status in PRESENT_STATUSES
        and engine.model_id == spec.model
        and engine.engine_kind == spec.kind
        and engine.engine_label == label
    )


def _start(client: EngineControl, preset: Preset, spec: PresetEngine, label: str) -> EngineInfo:
    metadata = {"preset": preset.name, "preset_engine": spec.name, **spec.metadata}
    return client.start_engine(
        spec.model,
        engine_kind=spec.kind,
        backend=spec.backend,
        tensor_parallel_size=spec.tensor_parallel,
        pipeline_parallel_size=spec.pipeline_parallel,
        port=spec.port,
        engine_label=label,
        max_concurrent_requests=spec.max_concurrent_requests,
        use_gpu=spec.use_gpu,
        extra_args=spec.extra_args or None,
        metadata=metadata,
        enable_lora=spec.lora,
        max_lora_rank=spec.max_lora_rank,
    )


def _rollback(client: EngineControl, result: ApplyResult, progress: ProgressCallback) -> None:
    """Stop what this apply started, newest first (the reverse of the start order)."""
    for applied in reversed(result.started):
        spec = next(e for e in result.preset.engines if e.name == applied.name)
        progress(ApplyEvent("stopping", applied.name, spec, applied.engine))
        try:
            stopped = client.stop_engine(applied.engine.engine_id)
        except SageError as exc:
            result.rollback_errors.append(f"{applied.engine.engine_id}: {exc.message}")
            progress(ApplyEvent("stop_failed", applied.name, spec, applied.engine, exc.message))
            continue
        result.rolled_back.append(applied.engine.engine_id)
        progress(ApplyEvent("stopped", applied.name, spec, stopped))


def _noop(event: ApplyEvent) -> None:
    del event


def apply_preset(
    preset: Preset,
    client: EngineControl,
    *,
    dry_run: bool = False,
    rollback: bool = True,
    progress: ProgressCallback | None = None,
) -> ApplyResult:
    """Make every engine of `preset` run; raises PresetApplyError naming the engine that failed.

    Engines already present (same model, kind and label, RUNNING or STARTING) are kept.
    On a failure the engines this call started are stopped again unless `rollback` is
    False; engines it kept are never touched.
    """
    notify = progress or _noop
    result = ApplyResult(preset=preset, dry_run=dry_run)
    existing = client.list_engines()
    claimed: set[str] = set()
    for spec in preset.engines:
        label = spec.engine_label(preset.name)
        match = next(
            (e for e in existing if e.engine_id not in claimed and _matches(e, spec, label)),
            None,
        )
        if match is not None:
            claimed.add(match.engine_id)
            result.kept.append(AppliedEngine(spec.name, match))
            notify(ApplyEvent("keep", spec.name, spec, match))
            continue
        if dry_run:
            result.planned.append(spec)
            notify(ApplyEvent("would_start", spec.name, spec))
            continue
        notify(ApplyEvent("starting", spec.name, spec))
        try:
            engine = _start(client, preset, spec, label)
            if engine.status not in PRESENT_STATUSES:
                # It died while starting (the API may report FAILED rather than an error).
                raise EngineStartError(
                    engine.error or f"engine {engine.engine_id} is {engine.status}"
                )
        except SageError as exc:
            result.failed = spec.name
            result.error = exc.message
            notify(ApplyEvent("failed", spec.name, spec, error=exc.message))
            if rollback:
                _rollback(client, result, notify)
            raise PresetApplyError(_failure_message(result, spec, rollback), result) from exc
        claimed.add(engine.engine_id)
        result.started.append(AppliedEngine(spec.name, engine))
        notify(ApplyEvent("started", spec.name, spec, engine))
    return result


def _failure_message(result: ApplyResult, spec: PresetEngine, rollback: bool) -> str:
    message = (
        f"preset {result.preset.name!r}: engine {spec.name!r} ({spec.model}) failed to start: "
        f"{result.error}"
    )
    if rollback:
        if result.rolled_back:
            message += f"; stopped the engines this apply started: {', '.join(result.rolled_back)}"
        if result.rollback_errors:
            message += f"; could not stop: {'; '.join(result.rollback_errors)}"
    elif result.started:
        ids = ", ".join(a.engine.engine_id for a in result.started)
        message += f"; left running (--no-rollback): {ids}"
    return message
