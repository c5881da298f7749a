"""Who owns a reservation: is the owner process still running, and which processes are its.

The ledger asks through `ProcessProbe` so its rules are tested with a fake process table;
`PsutilProbe` is the real one.
"""

from __future__ import annotations

from typing import Protocol

import psutil


class ProcessProbe(Protocol):
    """Read-only view of the host's process table."""

    def started_at(self, pid: int) -> float | None:
        """Start time of a running process (seconds since the epoch); None if it is not
        running. Comparing start times tells a reused pid from the original owner."""
        ...

    def family(self, pid: int) -> frozenset[int]:
        """`pid` and its descendants (an engine's GPU memory is often held by its workers)."""
        ...


class PsutilProbe:
    """ProcessProbe over psutil; zombies count as gone."""

    def started_at(self, pid: int) -> float | None:
        """Start time, or None when the process is gone or a zombie."""
        if pid <= 0:
            return None
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return float(proc.create_time())
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return None
        except psutil.AccessDenied:
            return 0.0  # exists, start time unknown: treat as alive

    def family(self, pid: int) -> frozenset[int]:
        """`pid` and every descendant still running."""
        if pid <= 0:
            return frozenset()
        try:
            proc = psutil.Process(pid)
            return frozenset({pid, *(c.pid for c in proc.children(recursive=True))})
        except psutil.Error:
            return frozenset({pid})
