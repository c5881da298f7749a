"""Fair sharing across tenants with a virtual token counter (VTC, Sheng et al., OSDI '24).

Each tenant's counter grows by the tokens it is served; the tenant with the smallest counter
among those waiting goes next. A tenant that (re)joins is lifted to the smallest active
counter, so idle time cannot be banked to starve others later.
"""

from __future__ import annotations

from collections import deque

from .base import QueuedRequest, take_out


class FairPolicy:
    """Per-tenant queues served by smallest virtual token counter."""

    name = "fair"

    def __init__(self) -> None:
        self._queues: dict[str, deque[QueuedRequest]] = {}
        self.counters: dict[str, float] = {}
        self._size = 0

    def _active_min(self) -> float | None:
        waiting = [self.counters[t] for t, q in self._queues.items() if q]
        return min(waiting) if waiting else None

    def push(self, item: QueuedRequest) -> None:
        queue = self._queues.setdefault(item.tenant, deque())
        if not queue:
            floor = self._active_min()
            current = self.counters.get(item.tenant, 0.0)
            self.counters[item.tenant] = max(current, floor) if floor is not None else current
        queue.append(item)
        self._size += 1

    def pop(self, now: float) -> QueuedRequest | None:
        best: str | None = None
        for tenant, queue in self._queues.items():
            if queue and (
                best is None
                or (self.counters[tenant], queue[0].seq)
                < (self.counters[best], self._queues[best][0].seq)
            ):
                best = tenant
        if best is None:
            return None
        item = self._queues[best].popleft()
        self._size -= 1
        # Charge the estimate now (so a burst cannot all go out at the same counter) ...
        self.counters[best] += item.cost
        return item

    def remove(self, item: QueuedRequest) -> bool:
        if not take_out(self._queues.get(item.tenant), item):
            return False
        self._size -= 1
        return True

    def on_finish(self, item: QueuedRequest, tokens: float) -> None:
        # ... and correct it to what was really served.
        if item.tenant in self.counters:
            self.counters[item.tenant] += tokens - item.cost

    def __len__(self) -> int:
        return self._size
