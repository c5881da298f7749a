"""session_affinity: the same session key goes to the same engine (its KV cache is warm).

A consistent-hashing ring with virtual nodes: when an engine joins or leaves only the
sessions on its arcs (~1/N of them) move. Requests without a key go to the least loaded.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
from collections.abc import Sequence

from ..registry import EngineRecord
from .base import LoadView, NoLoad, RouteRequest
from .load_index import LoadIndexes

# Rings rebuilt per distinct engine set; a few cover every model in a typical deployment.
_MAX_RINGS = 64


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class HashRing:
    """Points on a 64-bit circle, `vnodes` per engine; a key belongs to the next point."""

    def __init__(self, engine_ids: Sequence[str], vnodes: int = 160) -> None:
        points = sorted(
            (_hash(f"{engine_id}#{i}"), engine_id)
            for engine_id in engine_ids
            for i in range(vnodes)
        )
        self._hashes = [h for h, _ in points]
        self._owners = [engine_id for _, engine_id in points]

    def owner(self, key: str) -> str:
        """The engine id owning `key`."""
        index = bisect.bisect(self._hashes, _hash(key)) % len(self._hashes)
        return self._owners[index]


class SessionAffinityRouter:
    """Consistent hashing on RouteRequest.session_key; least_loaded without a key."""

    name = "session_affinity"
    needs_prefix = False

    def __init__(self, load: LoadView | None = None, vnodes: int = 160) -> None:
        self.load = load or NoLoad()
        self.vnodes = vnodes
        self._rings: dict[tuple[str, ...], HashRing] = {}
        self._turn = itertools.count()
        self._indexes = LoadIndexes(self.load)
        # model → (the engine tuple last routed over, its ring, its engines by id): the
        # registry hands out the same tuple until an engine changes, so the ring's key
        # (sorted ids) and the owner lookup are not rebuilt per request.
        self._current: dict[
            str, tuple[Sequence[EngineRecord], HashRing, dict[str, EngineRecord]]
        ] = {}

    def _ring(self, engines: Sequence[EngineRecord]) -> HashRing:
        ids = tuple(sorted(e.engine_id for e in engines))
        ring = self._rings.get(ids)
        if ring is None:
            if len(self._rings) >= _MAX_RINGS:
                self._rings.clear()  # engine sets changed a lot; rebuild on demand
            ring = self._rings[ids] = HashRing(ids, self.vnodes)
        return ring

    def pick(self, request: RouteRequest, engines: Sequence[EngineRecord]) -> EngineRecord:
        """The session's engine on the ring, or the least loaded when there is no key."""
        if not request.session_key:
            return self._indexes.least(request.model, engines, next(self._turn))[0]
        if len(engines) == 1:
            return engines[0]
        if not isinstance(engines, tuple):
            owner = self._ring(engines).owner(request.session_key)
            return next(e for e in engines if e.engine_id == owner)
        current = self._current.get(request.model)
        if current is None or current[0] is not engines:
            current = (engines, self._ring(engines), {e.engine_id: e for e in engines})
            self._current[request.model] = current
        return current[2][current[1].owner(request.session_key)]
