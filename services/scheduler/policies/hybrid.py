"""HybridSchedulingPolicy (SAGE's `hybrid`): embeddings go straight on (they are batched by
the embedding service and cost little), LLM requests through the chosen inner policy."""

from __future__ import annotations

from collections import deque

from .base import QueuedRequest, RequestClass, SchedulingPolicy


class HybridPolicy:
    """EMBEDDING first in arrival order; LLM_CHAT / LLM_GENERATE via `inner`."""

    name = "hybrid"

    def __init__(self, inner: SchedulingPolicy) -> None:
        self.inner = inner
        self._embeddings: deque[QueuedRequest] = deque()

    def push(self, item: QueuedRequest) -> None:
        if item.request_class is RequestClass.EMBEDDING:
            self._embeddings.append(item)
        else:
            self.inner.push(item)

    def pop(self, now: float) -> QueuedRequest | None:
        if self._embeddings:
            return self._embeddings.popleft()
        return self.inner.pop(now)

    def remove(self, item: QueuedRequest) -> bool:
        if item.request_class is RequestClass.EMBEDDING:
            try:
                self._embeddings.remove(item)
            except ValueError:
                return False
            return True
        return self.inner.remove(item)

    def on_finish(self, item: QueuedRequest, tokens: float) -> None:
        if item.request_class is not RequestClass.EMBEDDING:
            self.inner.on_finish(item, tokens)

    def __len__(self) -> int:
        return len(self._embeddings) + len(self.inner)
