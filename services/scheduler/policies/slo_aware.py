"""SLO-aware: earliest deadline first, with shedding or demotion of hopeless requests.

The predicted latency of a request (from live metrics, injected as a callable) decides
whether it can still meet its deadline when it would start now; if not, it is shed
(refused with a clear error) or demoted behind every feasible request, per config.
Requests without a deadline go after all deadline-bearing ones, in arrival order.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

from .base import QueuedRequest, Shed

Predictor = Callable[[QueuedRequest], float]  # predicted seconds from start to finish


class SloAwarePolicy:
    """EDF over deadlines; infeasible requests are shed or demoted."""

    name = "slo_aware"

    def __init__(self, predict: Predictor | None = None, on_miss: str = "demote") -> None:
        if on_miss not in ("demote", "shed"):
            raise ValueError("on_miss must be demote or shed")
        self.predict: Predictor = predict or (lambda item: 0.0)
        self.on_miss = on_miss
        self._heap: list[tuple[float, int, QueuedRequest]] = []
        self._demoted: list[tuple[float, int, QueuedRequest]] = []
        self._removed: set[int] = set()
        self._size = 0

    def push(self, item: QueuedRequest) -> None:
        key = item.deadline if item.deadline is not None else float("inf")
        heapq.heappush(self._heap, (key, item.seq, item))
        self._size += 1

    def _next(self, heap: list[tuple[float, int, QueuedRequest]]) -> QueuedRequest | None:
        while heap:
            _, seq, item = heapq.heappop(heap)
            if seq in self._removed:
                self._removed.discard(seq)
                continue
            return item
        return None

    def pop(self, now: float) -> QueuedRequest | None:
        while True:
            item = self._next(self._heap)
            if item is None:
                break
            if item.deadline is not None and now + self.predict(item) > item.deadline:
                if self.on_miss == "shed":
                    self._size -= 1
                    raise Shed(item, "the request can no longer meet its latency SLO")
                heapq.heappush(self._demoted, (item.arrival, item.seq, item))
                continue
            self._size -= 1
            return item
        demoted = self._next(self._demoted)
        if demoted is not None:
            self._size -= 1
        return demoted

    def remove(self, item: QueuedRequest) -> bool:
        queued = any(i is item for _, _, i in self._heap) or any(
            i is item for _, _, i in self._demoted
        )
        if not queued or item.seq in self._removed:
            return False
        self._removed.add(item.seq)
        self._size -= 1
        return True

    def on_finish(self, item: QueuedRequest, tokens: float) -> None:
        return None

    def __len__(self) -> int:
        return self._size
