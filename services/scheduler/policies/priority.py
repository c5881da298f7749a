"""Strict priority classes with aging: a waiting request gains one class per `aging_s`, so
low-priority work is delayed under load but never starved."""

from __future__ import annotations

from collections import deque

from .base import QueuedRequest, take_out


class PriorityPolicy:
    """Lowest effective class first (0 = high); FIFO inside a class."""

    name = "priority"

    def __init__(self, aging_s: float = 10.0) -> None:
        self.aging_s = aging_s
        self._classes: dict[int, deque[QueuedRequest]] = {}
        self._size = 0

    def push(self, item: QueuedRequest) -> None:
        self._classes.setdefault(item.priority, deque()).append(item)
        self._size += 1

    def _effective(self, item: QueuedRequest, now: float) -> float:
        waited = max(0.0, now - item.arrival)
        return item.priority - (waited / self.aging_s if self.aging_s > 0 else 0.0)

    def pop(self, now: float) -> QueuedRequest | None:
        # Heads are the oldest of their class, so comparing heads is enough.
        best: deque[QueuedRequest] | None = None
        best_key: tuple[float, int] | None = None
        for queue in self._classes.values():
            if queue:
                key = (self._effective(queue[0], now), queue[0].seq)
                if best_key is None or key < best_key:
                    best, best_key = queue, key
        if best is None:
            return None
        self._size -= 1
        return best.popleft()

    def remove(self, item: QueuedRequest) -> bool:
        if not take_out(self._classes.get(item.priority), item):
            return False
        self._size -= 1
        return True

    def on_finish(self, item: QueuedRequest, tokens: float) -> None:
        return None

    def __len__(self) -> int:
        return self._size
