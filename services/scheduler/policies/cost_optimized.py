"""cost_optimized (SAGE's name): shortest job first by estimated tokens, with aging so long
requests still run; maximises completed requests per second under load."""

from __future__ import annotations

from .base import QueuedRequest, take_out


class CostOptimizedPolicy:
    """Smallest (estimated tokens - age credit) first."""

    name = "cost_optimized"

    def __init__(self, tokens_per_second_of_wait: float = 50.0) -> None:
        # Each second of waiting counts as this many tokens less, bounding starvation.
        self.credit = tokens_per_second_of_wait
        self._items: list[QueuedRequest] = []

    def push(self, item: QueuedRequest) -> None:
        self._items.append(item)

    def pop(self, now: float) -> QueuedRequest | None:
        if not self._items:
            return None
        best = min(self._items, key=lambda i: (i.cost - self.credit * (now - i.arrival), i.seq))
        self._items.remove(best)
        return best

    def remove(self, item: QueuedRequest) -> bool:
        return take_out(self._items, item)

    def on_finish(self, item: QueuedRequest, tokens: float) -> None:
        return None

    def __len__(self) -> int:
        return len(self._items)
