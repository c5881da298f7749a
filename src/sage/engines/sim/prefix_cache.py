"""The simulator's automatic prefix caching: vLLM's, reduced to what routing can see.

vLLM keeps the KV of whole prompt blocks (block_size tokens), each named by a hash chained
over every token before it, and reuses them for any later prompt that starts with the same
blocks; free blocks are evicted least recently used first. It counts prompt tokens queried
and found (`vllm:prefix_cache_queries_total`, `vllm:prefix_cache_hits_total`). Here a
bounded LRU of chained block hashes does the same per engine, so that routers that keep a
conversation on one engine see more hits, and less prefill time, than those that do not.
Not modelled: blocks pinned by running requests (every block is evictable), sharing
between requests that run at the same time.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from sage.common.exceptions import ConfigurationError

__all__ = ["PrefixCache"]


class PrefixCache:
    """An LRU of at most `capacity` blocks of `block_size` tokens each."""

    def __init__(self, block_size: int, capacity: int) -> None:
        if block_size < 1 or capacity < 1:
            raise ConfigurationError("prefix cache: block_size and capacity must be >= 1")
        self.block_size = block_size
        self.capacity = capacity
        self.queries = 0  # prompt tokens looked up
        self.hits = 0  # of them, found cached
        self._blocks: OrderedDict[int, None] = OrderedDict()

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
        for block in hashes:
            self._blocks[block] = None
            self._blocks.move_to_end(block)
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)
        cached = found * self.block_size
        self.queries += len(token_ids)
        self.hits += cached
        return cached

    def clear(self) -> None:
        """Forget every block (vLLM's /reset_prefix_cache)."""
        self._blocks.clear()
