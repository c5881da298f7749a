"""FIFO: arrival order. The baseline every other policy is compared with."""

from __future__ import annotations

from collections import deque

from .base import QueuedRequest, take_out


class FifoPolicy:
    """First come, first served."""

    name = "fifo"

    def __init__(self) -> None:
        self._queue: deque[QueuedRequest] = deque()

    def push(self, item: QueuedRequest) -> None:
        self._queue.append(item)

    def pop(self, now: float) -> QueuedRequest | None:
        return self._queue.popleft() if self._queue else None

    def remove(self, item: QueuedRequest) -> bool:
        return take_out(self._queue, item)

    def on_finish(self, item: QueuedRequest, tokens: float) -> None:
        return None

    def __len__(self) -> int:
        return len(self._queue)
