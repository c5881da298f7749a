"""The queueing-policy interface: which waiting request runs next.

A policy only orders requests; admission limits, capacity and execution live in the
scheduler. One module per policy, registered by name (see __init__.py).
"""

from __future__ import annotations

import itertools
from collections.abc import MutableSequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol


class RequestClass(StrEnum):
    """What kind of work a request is (the seed's RequestClassifier classes)."""

    LLM_CHAT = "llm_chat"
    LLM_GENERATE = "llm_generate"
    EMBEDDING = "embedding"


_sequence = itertools.count()


@dataclass(eq=False)
class QueuedRequest:
    """One request waiting for an engine slot."""

    model: str
    request_class: RequestClass = RequestClass.LLM_CHAT
    tenant: str = "default"
    priority: int = 1  # 0 high, 1 normal, 2 low
    arrival: float = 0.0  # monotonic seconds
    deadline: float | None = None  # monotonic seconds by which it must finish (SLO)
    cost: float = 1.0  # estimated tokens, for fairness and shortest-job-first
    payload: Any = None  # what the dispatcher needs to run it
    seq: int = field(default_factory=lambda: next(_sequence))  # FIFO tie-break


def take_out(queue: MutableSequence[QueuedRequest] | None, item: QueuedRequest) -> bool:
    """Remove `item` from `queue` (None: no queue holds its kind); False if it was not in it.
    Every policy's `remove` comes down to this."""
    if queue is None:
        return False
    try:
        queue.remove(item)
    except ValueError:
        return False
    return True


class Shed(Exception):
    """A policy decided a request can no longer meet its SLO and must be refused."""

    def __init__(self, item: QueuedRequest, reason: str) -> None:
        super().__init__(reason)
        self.item = item
        self.reason = reason


class SchedulingPolicy(Protocol):
    """Orders waiting requests."""

    name: str

    def push(self, item: QueuedRequest) -> None:
        """Queue a request."""
        ...

    def pop(self, now: float) -> QueuedRequest | None:
        """The next request to run, or None when empty; may raise Shed for one request."""
        ...

    def remove(self, item: QueuedRequest) -> bool:
        """Drop a request whose caller went away; False if it was not queued."""
        ...

    def on_finish(self, item: QueuedRequest, tokens: float) -> None:
        """Account a finished request's real cost (fairness)."""
        ...

    def __len__(self) -> int: ...
