"""power_of_two: sample two engines at random, take the less loaded (Mitzenmacher's p2c).

Nearly as balanced as least_loaded, but avoids herding when load readings are stale: many
schedulers reading the same numbers do not all pick the same engine.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from ..registry import EngineRecord
from .base import LoadView, NoLoad, RouteRequest


class PowerOfTwoRouter:
    """Two distinct random candidates; the less loaded wins (the first drawn on a tie)."""

    name = "power_of_two"
    needs_prefix = False

    def __init__(self, load: LoadView | None = None, rng: random.Random | None = None) -> None:
        self.load = load or NoLoad()
        self._rng = rng or random.Random()

    def pick(self, request: RouteRequest, engines: Sequence[EngineRecord]) -> EngineRecord:
        """The less loaded of two distinct random engines."""
        n = len(engines)
        if n == 1:
            return engines[0]
        i, j = self._rng.sample(range(n), 2)
        a, b = engines[i], engines[j]
        return b if self.load.load(b.engine_id) < self.load.load(a.engine_id) else a
