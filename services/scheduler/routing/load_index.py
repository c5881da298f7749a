"""The least-loaded engine of a model in O(log engines) per request instead of a scan.

A min segment tree over the loads of one engine tuple (the registry hands out the same
tuple object until an engine changes), updated leaf by leaf when the load tracker reports
that one engine's load changed (EngineLoadTracker.subscribe). Answers exactly what
base.least_loaded's scan answers: the first engine, going round from `start`, whose load
equals the least load.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

from ..registry import EngineRecord
from .base import LoadView, least_loaded

# Trees kept per model: the registry's tuple plus, under PD, its prefill and decode pools.
TREES_PER_MODEL = 4


class SubscribableLoad(LoadView, Protocol):
    """A LoadView that says when an engine's load changed (EngineLoadTracker)."""

    def subscribe(self, listener: Callable[[str], None]) -> None:
        """Call `listener(engine_id)` after every change to that engine's load."""
        ...


class MinLoadTree:
    """Loads of `engines` by position, with the minimum of every power-of-two range."""

    __slots__ = ("_load", "_positions", "_size", "_tree", "engines")

    def __init__(self, engines: tuple[EngineRecord, ...], load: LoadView) -> None:
        self.engines = engines
        self._load = load
        self._positions = {e.engine_id: i for i, e in enumerate(engines)}
        size = 1
        while size < len(engines):
            size *= 2
        self._size = size
        tree = [math.inf] * (2 * size)
        for i, engine in enumerate(engines):
            tree[size + i] = load.load(engine.engine_id)
        for i in range(size - 1, 0, -1):
            tree[i] = min(tree[2 * i], tree[2 * i + 1])
        self._tree = tree

    def refresh(self, engine_id: str) -> None:
        """Re-read `engine_id`'s load (a no-op for an engine not in this tuple)."""
        position = self._positions.get(engine_id)
        if position is None:
            return
        tree = self._tree
        i = self._size + position
        tree[i] = self._load.load(engine_id)
        i >>= 1
        while i:
            value = min(tree[2 * i], tree[2 * i + 1])
            if tree[i] == value:
                return  # unchanged here, so unchanged above
            tree[i] = value
            i >>= 1

    def _first_at_most(self, lo: int, target: float) -> int:
        """The first position ≥ lo whose load is ≤ target; -1 when none."""
        tree, size = self._tree, self._size
        i = lo + size
        while True:
            if tree[i] <= target:
                while i < size:
                    i = 2 * i if tree[2 * i] <= target else 2 * i + 1
                return i - size
            while i & 1:  # a right child: the range after it starts further up
                i >>= 1
            if not i:
                return -1
            i += 1

    def least(self, start: int) -> tuple[EngineRecord, float]:
        """base.least_loaded(engines, load, start), from the tree."""
        n = len(self.engines)
        target = self._tree[1]
        position = self._first_at_most(start % n, target)
        if position < 0 or position >= n:
            position = self._first_at_most(0, target)
        return self.engines[position], target


class LoadIndexes:
    """MinLoadTrees for the engine tuples a router is asked about, kept current."""

    def __init__(self, load: LoadView) -> None:
        self.load = load
        self._trees: dict[str, list[MinLoadTree]] = {}
        subscribe = getattr(load, "subscribe", None)
        self.live = callable(subscribe)
        if self.live:
            load_with_events: SubscribableLoad = load  # type: ignore[assignment]
            load_with_events.subscribe(self._changed)

    def _changed(self, engine_id: str) -> None:
        for trees in self._trees.values():
            for tree in trees:
                tree.refresh(engine_id)

    def tree(self, model: str, engines: Sequence[EngineRecord]) -> MinLoadTree | None:
        """The tree for `engines`, built on first sight; None when it cannot be kept
        current (a load without change events, or a list that may be a one-off)."""
        if not self.live or not isinstance(engines, tuple):
            return None
        trees = self._trees.setdefault(model, [])
        for tree in trees:
            if tree.engines is engines:
                return tree
        tree = MinLoadTree(engines, self.load)
        trees.insert(0, tree)
        del trees[TREES_PER_MODEL:]  # the oldest: an engine set that changed since
        return tree

    def least(
        self, model: str, engines: Sequence[EngineRecord], start: int
    ) -> tuple[EngineRecord, float]:
        """base.least_loaded's answer, from a tree where one can be kept."""
        tree = self.tree(model, engines)
        if tree is None:
            return least_loaded(engines, self.load, start)
        return tree.least(start)
