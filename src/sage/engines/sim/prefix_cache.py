"""The simulator's automatic prefix caching: vLLM's, reduced to what routing can see.

vLLM keeps the KV of whole prompt blocks (block_size tokens), each named by a hash chained
over every token before it, and reuses them for any later prompt that starts with the same
blocks; free blocks are evicted least recently used first. It counts prompt tokens queried
and found (`vllm:prefix_cache_queries_total`, `vllm:prefix_cache_hits_total`). Here a
bounded LRU of chained block hashes does the same per engine, so that routers that keep a
conversation on one engine see more hits, and less prefill time, than those that do not.
Not modelled: blocks pinned by running requests (every block is evictable), sharing
between requests that run at the same time. With `events` on, the blocks stored and evicted
are kept as vLLM's KV-cache events (BlockStored / BlockRemoved / AllBlocksCleared, as maps)
for a publisher (kv_publisher.py) to send.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from sage.common.exceptions import ConfigurationError

__all__ = ["PrefixCache"]


class PrefixCache:
    """An LRU of at most `capacity` blocks of `block_size` tokens each."""

    def __init__(self, block_size: int, capacity: int, events: bool = False) -> None:
        if block_size < 1 or capacity < 1:
            raise ConfigurationError("prefix cache: block_size and capacity must be >= 1")
        self.block_size = block_size
        self.capacity = capacity
        self.queries = 0  # prompt tokens looked up
        self.hits = 0  # of them, found cached
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self._events: list[dict[str, Any]] | None = [] if events else None

    def drain_events(self) -> list[dict[str, Any]]:
        """The KV-cache events since the last call, oldest first (none when events are off)."""
        if not self._events:
            return []
        events, self._events = self._events, []
        return events

    def __len__(self) -> int:
        return len(self._blocks)

    def _hashes(self, token_ids: Sequence[int]) -> list[int]:
        size = self.block_size
        parent = 0
        hashes = []
        for start in range(0, len(token_ids) - size + 1, size):
            parent = hash((parent, tuple(token_ids[start : start + size])))
            hashes.append(parent)
        return hashes

    def admit(self, token_ids: Sequence[int]) -> int:
        """Look `token_ids` up, then keep its whole blocks; the tokens found cached.

        As in vLLM the last prompt token is always computed (its logits are needed), so a
        prompt found whole still misses the block that holds it."""
        hashes = self._hashes(token_ids)
        usable = (len(token_ids) - 1) // self.block_size if token_ids else 0
        found = 0
        for block in hashes[:usable]:
            if block not in self._blocks:
                break
            found += 1
        size = self.block_size
        for i, block in enumerate(hashes):
            if block not in self._blocks and self._events is not None:
                self._events.append(
                    {
                        "type": "BlockStored",
                        "block_hashes": [block],
                        "parent_block_hash": hashes[i - 1] if i else None,
                        "token_ids": list(token_ids[i * size : (i + 1) * size]),
                        "block_size": size,
                        "lora_id": None,
                        "medium": "CPU",
                        "lora_name": None,
                    }
                )
            self._blocks[block] = None
            self._blocks.move_to_end(block)
        while len(self._blocks) > self.capacity:
            gone, _ = self._blocks.popitem(last=False)
            if self._events is not None:
                self._events.append(
                    {"type": "BlockRemoved", "block_hashes": [gone], "medium": "CPU"}
                )
        cached = found * self.block_size
        self.queries += len(token_ids)
        self.hits += cached
        return cached

    def clear(self) -> None:
        """Forget every block (vLLM's /reset_prefix_cache)."""
        self._blocks.clear()
        if self._events is not None:
            self._events.append({"type": "AllBlocksCleared"})
