"""Where the reservation ledger outlives the process: one JSON file, replaced atomically on
every change (one machine), or one etcd key per reservation (etcd mode, etcd_store.py);
the ledger sees either through `LedgerStore`."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("sage.gpu_manager.store")

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Reservation:
    """Memory on one GPU held for one engine."""

    engine_id: str
    gpu_index: int
    memory_bytes: int
    owner_pid: int = 0
    created_at: float = 0.0
    gpu_uuid: str = ""
    # Start time of the owner process when reserved: a reused pid is not the owner.
    owner_started_at: float = 0.0


class LedgerStore(Protocol):
    """What the ledger persists through. `save` returns only once the new state is durable
    (the RPC that changed it answers after), and raises leaving the old state readable."""

    @property
    def where(self) -> str:
        """Where the reservations are kept, for logs."""
        ...

    def load(self) -> list[Reservation]:
        """The saved reservations."""
        ...

    def save(self, reservations: list[Reservation]) -> None:
        """Replace what is saved with exactly these reservations."""
        ...

    def close(self) -> None:
        """Release what the store holds open."""
        ...


def reservation_of(raw: Any) -> Reservation:
    """A Reservation from its JSON object (as the file and etcd hold it); ValueError,
    KeyError or TypeError when it is not one."""
    if not isinstance(raw, dict):
        raise ValueError(f"reservation must be an object, got {type(raw).__name__}")
    return Reservation(
        engine_id=str(raw["engine_id"]),
        gpu_index=int(raw["gpu_index"]),
        memory_bytes=int(raw["memory_bytes"]),
        owner_pid=int(raw.get("owner_pid", 0)),
        created_at=float(raw.get("created_at", 0.0)),
        gpu_uuid=str(raw.get("gpu_uuid", "")),
        owner_started_at=float(raw.get("owner_started_at", 0.0)),
    )


class ReservationStore:
    """Reads and writes `gpu_reservations.json` (tmp file + fsync + os.replace), so a crash
    mid-write leaves the previous ledger, never a torn one."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def where(self) -> str:
        """The file's path."""
        return str(self.path)

    def close(self) -> None:
        """Nothing is held open between saves."""

    def load(self) -> list[Reservation]:
        """The saved reservations; an unreadable file is moved aside (logged) and read as empty,
        so a damaged file cannot keep the service down."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        try:
            doc = json.loads(text)
            if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION:
                raise ValueError(f"unknown format (version {doc.get('version')!r})")
            return [reservation_of(r) for r in doc.get("reservations", [])]
        except (ValueError, KeyError, TypeError) as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            log.error(
                "ignoring unreadable reservation file %s (moved to %s): %s", self.path, aside, exc
            )
            return []

    def save(self, reservations: list[Reservation]) -> None:
        """Replace the file with exactly these reservations."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"version": FORMAT_VERSION, "reservations": [asdict(r) for r in reservations]}
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(doc, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError):  # make the rename itself durable
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
