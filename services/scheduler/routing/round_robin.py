"""round_robin: rotate over the ready engines of each model independently."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from ..registry import EngineRecord
from .base import RouteRequest


class RoundRobinRouter:
    """Rotates over the ready engines of each model; ignores load, session and prompt."""

    name = "round_robin"
    needs_prefix = False

    def __init__(self) -> None:
        self._counters: dict[str, itertools.count[int]] = {}

    def pick(self, request: RouteRequest, engines: Sequence[EngineRecord]) -> EngineRecord:
        """Next engine in turn for this model."""
        counter = self._counters.get(request.model)
        if counter is None:
            counter = self._counters.setdefault(request.model, itertools.count())
        return engines[next(counter) % len(engines)]
