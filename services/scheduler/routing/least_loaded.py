"""least_loaded: the engine with the fewest requests in flight and queued."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from ..registry import EngineRecord
from .base import LoadView, NoLoad, RouteRequest
from .load_index import LoadIndexes


class LeastLoadedRouter:
    """Picks the engine with the lowest load; ties rotate so idle engines share the work.
    With the scheduler's load tracker the pick reads a per-model min-tree (load_index.py),
    O(log engines); other loads are scanned."""

    name = "least_loaded"
    needs_prefix = False

    def __init__(self, load: LoadView | None = None) -> None:
        self.load = load or NoLoad()
        self._turn = itertools.count()
        self._indexes = LoadIndexes(self.load)

    def pick(self, request: RouteRequest, engines: Sequence[EngineRecord]) -> EngineRecord:
        """The least-loaded engine."""
        return self._indexes.least(request.model, engines, next(self._turn))[0]
