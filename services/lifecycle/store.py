"""The persisted engine registry: one JSON file, replaced atomically on every change (one
machine), or one etcd key per engine under lifecycle/<node id>/engines/ (etcd mode).

A restarted lifecycle reads it to re-adopt engines that are still alive and to clean up the
rest, so nothing it started is forgotten.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .spec import EngineSpec

if TYPE_CHECKING:
    from sage.common.etcd import EtcdClient

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


class EngineRegistry(Protocol):
    """Where the manager keeps its records between lifecycle processes.

    `save` is synchronous because the manager saves from plain methods after every change;
    a store that is not local (etcd) queues the write and `flush` waits for it.
    """

    async def aload(self) -> list[EngineRecord]:
        """Every record saved (a store that cannot be reached is retried until it answers)."""
        ...

    def save(self, records: list[EngineRecord]) -> None:
        """Replace the saved records with `records`."""
        ...

    async def flush(self, timeout_s: float) -> bool:
        """Wait (at most `timeout_s`) until every save is stored; whether it is."""
        ...


class EngineStore:
    """Reads and atomically writes the registry file (the one-machine store)."""

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

    async def aload(self) -> list[EngineRecord]:
        """`load`, for the EngineRegistry protocol."""
        return self.load()

    async def flush(self, timeout_s: float) -> bool:
        """Nothing to wait for: `save` is durable when it returns."""
        return True


def record_bytes(record: EngineRecord) -> bytes:
    """One record as its etcd value: the JSON the registry file holds for it."""
    return json.dumps(record.to_json(), separators=(",", ":")).encode()


class EtcdEngineStore:
    """The registry in etcd: lifecycle/<node id>/engines/<engine id> = one record's JSON,
    with no lease (the records must outlive the process, like the file).

    `save` records what should be stored and wakes a writer task, which puts the records
    that changed and deletes those that are gone, in the background and again after a
    failure, so the manager never waits on etcd. The writer starts once `aload` has read
    what is stored (it must know which keys are there to delete the right ones); saves
    before that are kept and written after it.
    """

    def __init__(self, client: EtcdClient, prefix: str, *, retry_max_s: float = 2.0) -> None:
        self.client = client
        self.prefix = prefix
        self.retry_max_s = retry_max_s
        self._want: dict[str, bytes] = {}
        self._have: dict[str, bytes] = {}  # what etcd holds, as far as this process knows
        self._loaded = False
        self._dirty = asyncio.Event()
        self._clean = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None

    def _key(self, engine_id: str) -> str:
        return self.prefix + engine_id

    async def aload(self) -> list[EngineRecord]:
        """Every record under the prefix, retried until etcd answers; an unreadable record is
        logged and left as it is (never overwritten nor deleted by this process)."""
        tries = 0
        while True:
            try:
                kvs, _ = await self.client.get_prefix(self.prefix)
                break
            except Exception as exc:
                tries += 1
                if tries == 1:
                    log.error(
                        "etcd unreachable: engine registry not read yet, engines are "
                        "re-adopted once it answers (retrying)",
                        extra={"prefix": self.prefix, "error": str(exc)},
                    )
                await asyncio.sleep(min(self.retry_max_s, 0.2 * tries))
        if tries:
            log.info("engine registry read from etcd", extra={"tries": tries + 1})
        records: list[EngineRecord] = []
        for kv in kvs:
            key = kv.key.decode(errors="replace")
            try:
                record = EngineRecord.from_json(json.loads(kv.value))
            except (ValueError, KeyError, TypeError) as exc:
                log.error(
                    "engine record in etcd unreadable; left as it is",
                    extra={"key": key, "error": str(exc)},
                )
                continue
            self._have[key.removeprefix(self.prefix)] = kv.value
            records.append(record)
        self._loaded = True
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(
                self._write_forever(), name="lifecycle-etcd-registry"
            )
        self._dirty.set()
        return records

    def save(self, records: list[EngineRecord]) -> None:
        """Queue `records` as the whole registry (written by the writer task)."""
        self._want = {r.engine_id: record_bytes(r) for r in records}
        self._clean.clear()
        self._dirty.set()

    async def _apply(self) -> None:
        want = dict(self._want)
        for engine_id, value in want.items():
            if self._have.get(engine_id) != value:
                await self.client.put(self._key(engine_id), value)
                self._have[engine_id] = value
        for engine_id in [e for e in self._have if e not in want]:
            await self.client.delete(self._key(engine_id))
            self._have.pop(engine_id, None)

    async def _write_forever(self) -> None:
        failures = 0
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self._apply()
            except Exception as exc:
                failures += 1
                if failures == 1:
                    log.error(
                        "engine registry not written to etcd (retrying)",
                        extra={"prefix": self.prefix, "error": str(exc)},
                    )
                self._dirty.set()
                await asyncio.sleep(min(self.retry_max_s, 0.2 * failures))
                continue
            if failures:
                log.info("engine registry written to etcd again", extra={"prefix": self.prefix})
                failures = 0
            if self._want == self._have:
                self._clean.set()

    async def flush(self, timeout_s: float) -> bool:
        """Wait until etcd holds every save (False: not within `timeout_s`, or never read)."""
        if not self._loaded:
            return False
        try:
            await asyncio.wait_for(self._clean.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def aclose(self) -> None:
        """Stop the writer (the caller flushes first and closes the client)."""
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
