"""least_loaded: the engine with the fewest requests in flight and queued."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from ..registry import EngineRecord
from .base import LoadView, NoLoad, RouteRequest, least_loaded


class LeastLoadedRouter:
    """Picks the engine with the lowest load; ties rotate so idle engines share the work."""

    name = "least_loaded"
    needs_prefix = False

    def __init__(self, load: LoadView | None = None) -> None:
        self.load = load or NoLoad()
        self._turn = itertools.count()

    def pick(self, request: RouteRequest, engines: Sequence[EngineRecord]) -> EngineRecord:
        """The least-loaded engine."""
        return least_loaded(engines, self.load, next(self._turn))[0]
