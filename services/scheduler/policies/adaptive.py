"""adaptive (SAGE's name): FIFO while the queue is short, SLO-aware once it grows past a
threshold — ordering only matters (and only costs) under contention."""

from __future__ import annotations

from .base import QueuedRequest
from .fifo import FifoPolicy
from .slo_aware import Predictor, SloAwarePolicy


class AdaptivePolicy:
    """Switches between FIFO and EDF by queue depth."""

    name = "adaptive"

    def __init__(self, threshold: int = 8, predict: Predictor | None = None) -> None:
        self.threshold = threshold
        self._fifo = FifoPolicy()
        self._edf = SloAwarePolicy(predict, on_miss="demote")

    def push(self, item: QueuedRequest) -> None:
        self._fifo.push(item)
        self._edf.push(item)

    def pop(self, now: float) -> QueuedRequest | None:
        if len(self._fifo) > self.threshold:
            item = self._edf.pop(now)
            if item is not None:
                self._fifo.remove(item)
            return item
        item = self._fifo.pop(now)
        if item is not None:
            self._edf.remove(item)
        return item

    def remove(self, item: QueuedRequest) -> bool:
        removed = self._fifo.remove(item)
        self._edf.remove(item)
        return removed

    def on_finish(self, item: QueuedRequest, tokens: float) -> None:
        return None

    def __len__(self) -> int:
        return len(self._fifo)
