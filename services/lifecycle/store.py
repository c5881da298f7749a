"""The persisted engine registry: one JSON file, replaced atomically on every change.

A restarted lifecycle reads it to re-adopt engines that are still alive and to clean up the
rest, so nothing it started is forgotten.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .spec import EngineSpec

log = logging.getLogger("sage.lifecycle")

STARTING, READY, STOPPING, STOPPED, FAILED = "starting", "ready", "stopping", "stopped", "failed"
LIVE_STATES = (STARTING, READY, STOPPING)


@dataclass
class EngineRecord:
    """Everything lifecycle knows about one engine, as persisted."""

    engine_id: str
    spec: EngineSpec
    backend: str
    base_url: str
    host: str
    port: int
    pid: int = 0
    state: str = STARTING
    log_path: str = ""
    started_at: float = field(default_factory=time.time)
    gpu_ids: list[int] = field(default_factory=list)
    restart_count: int = 0
    error: str = ""
    crash_times: list[float] = field(default_factory=list)
    health_path: str = "/health"
    labels: dict[str, str] = field(default_factory=dict)  # the launch plan's (LaunchPlan)
    # LoRA adapters loaded on the engine, name → path (re-loaded after a crash restart).
    adapters: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict."""
        doc = asdict(self)
        doc["spec"] = asdict(self.spec)
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> EngineRecord:
        """Inverse of to_json; unknown keys (from newer versions) are ignored."""
        spec_fields = {f.name for f in fields(EngineSpec)}
        spec_doc = {k: v for k, v in doc["spec"].items() if k in spec_fields}
        for key in ("extra_args", "aliases"):
            spec_doc[key] = tuple(spec_doc.get(key) or ())
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in doc.items() if k in names and k != "spec"}
        return cls(spec=EngineSpec(**spec_doc), **values)


class EngineStore:
    """Reads and atomically writes the registry file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> list[EngineRecord]:
        """Every record; a corrupt file is moved aside (and logged), never fatal."""
        try:
            doc = json.loads(self.path.read_text())
            return [EngineRecord.from_json(item) for item in doc.get("engines", [])]
        except FileNotFoundError:
            return []
        except (ValueError, KeyError, TypeError) as exc:
            aside = self.path.with_suffix(f".corrupt-{int(time.time())}")
            with contextlib.suppress(OSError):
                self.path.rename(aside)
            log.error(
                "engine registry unreadable, moved aside",
                extra={"path": str(aside), "error": str(exc)},
            )
            return []

    def save(self, records: list[EngineRecord]) -> None:
        """Write all records (tmp file + fsync + rename: a crash leaves old or new, never half)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        data = json.dumps({"version": 1, "engines": [r.to_json() for r in records]}, indent=1)
        with open(tmp, "w") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
