"""prefix_aware: send prompts sharing a prefix to the engine that has likely cached it.

Each engine gets an approximate index of the prompt prefixes routed to it: chained hashes
of 64-character blocks (block i's hash covers blocks 0..i), LRU-bounded. The engine with
the longest matching run of leading blocks wins, unless it is busier than the least-loaded
engine by more than `load_margin`, so one hot prefix cannot pile onto one engine.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from collections.abc import Sequence

from ..registry import EngineRecord
from .base import LoadView, NoLoad, RouteRequest, least_loaded


def block_hashes(prefix: str, block_chars: int = 64) -> list[int]:
    """Chained hashes of the whole `block_chars` blocks of `prefix` (a partial tail is
    ignored: engines cache whole blocks too)."""
    hashes: list[int] = []
    state = hashlib.blake2b(digest_size=8)
    for start in range(0, len(prefix) - block_chars + 1, block_chars):
        state.update(prefix[start : start + block_chars].encode())
        hashes.append(int.from_bytes(state.copy().digest(), "big"))
    return hashes


class PrefixIndex:
    """The block hashes one engine has seen, least recently used evicted first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def match(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of `hashes` this engine has seen."""
        matched = 0
        for h in hashes:
            if h not in self._blocks:
                break
            matched += 1
        return matched

    def add(self, hashes: Sequence[int]) -> None:
        """Record (and refresh) `hashes`, evicting the oldest beyond capacity."""
        blocks = self._blocks
        for h in hashes:
            blocks[h] = None
            blocks.move_to_end(h)
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)

    def __len__(self) -> int:
        return len(self._blocks)


class PrefixAwareRouter:
    """Longest cached prefix wins, guarded by load; least_loaded when nothing matches."""

    name = "prefix_aware"
    needs_prefix = True

    def __init__(
        self,
        load: LoadView | None = None,
        *,
        block_chars: int = 64,
        blocks_per_engine: int = 8192,
        load_margin: float = 4.0,
    ) -> None:
        self.load = load or NoLoad()
        self.block_chars = block_chars
        self.blocks_per_engine = blocks_per_engine
        self.load_margin = load_margin
        self._indexes: dict[str, dict[str, PrefixIndex]] = {}  # model → engine id → index
        self._turn = itertools.count()

    def _model_indexes(self, model: str, engines: Sequence[EngineRecord]) -> dict[str, PrefixIndex]:
        indexes = self._indexes.setdefault(model, {})
        live = {e.engine_id for e in engines}
        if not indexes.keys() <= live:  # an engine left: forget what it cached
            for engine_id in [k for k in indexes if k not in live]:
                del indexes[engine_id]
        return indexes

    def pick(self, request: RouteRequest, engines: Sequence[EngineRecord]) -> EngineRecord:
        """The engine with the longest cached prefix unless it is too busy."""
        least, least_load = least_loaded(engines, self.load, next(self._turn))
        hashes = block_hashes(request.prefix, self.block_chars)
        if not hashes:
            return least
        indexes = self._model_indexes(request.model, engines)
        best, best_match = least, 0
        for engine in engines:
            index = indexes.get(engine.engine_id)
            matched = index.match(hashes) if index is not None else 0
            if matched > best_match:
                best, best_match = engine, matched
        chosen = best
        if best_match and self.load.load(best.engine_id) - least_load > self.load_margin:
            chosen = least
        index = indexes.get(chosen.engine_id)
        if index is None:
            index = indexes[chosen.engine_id] = PrefixIndex(self.blocks_per_engine)
        index.add(hashes)
        return chosen
