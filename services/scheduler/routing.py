"""Instance routing: pick one engine among the ready ones for a model.

One small interface and one implementation per strategy, chosen by name from config.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Protocol

from sage.common.exceptions import ConfigurationError

from .registry import EngineRecord


class Router(Protocol):
    """Chooses the engine for one request."""

    name: str

    def pick(self, model: str, engines: Sequence[EngineRecord]) -> EngineRecord:
        """Return one of `engines` (never empty)."""
        ...


class RoundRobinRouter:
    """Rotates over the ready engines of each model independently."""

    name = "round_robin"

    def __init__(self) -> None:
        self._counters: dict[str, itertools.count[int]] = {}

    def pick(self, model: str, engines: Sequence[EngineRecord]) -> EngineRecord:
        """Next engine in turn for this model."""
        counter = self._counters.get(model)
        if counter is None:
            counter = self._counters.setdefault(model, itertools.count())
        return engines[next(counter) % len(engines)]


ROUTERS: dict[str, Callable[[], Router]] = {"round_robin": RoundRobinRouter}


def create_router(name: str) -> Router:
    """Build a router by its registered name."""
    try:
        return ROUTERS[name]()
    except KeyError:
        raise ConfigurationError(
            f"unknown router {name!r}; choose one of {sorted(ROUTERS)}", param="router"
        ) from None
