"""Which engine holds which KV-cache blocks, learned from vLLM's KV-cache events.

vLLM (`--kv-events-config`, ZMQ publisher) sends multipart messages `[topic, seq (8 bytes,
big-endian), msgpack EventBatch]`; a batch is `[ts, [event, ...], data_parallel_rank]` and an
event a tagged map: `BlockStored` (block_hashes, parent_block_hash, token_ids of those whole
blocks, block_size, lora_name, extra_keys...), `BlockRemoved` (block_hashes) or
`AllBlocksCleared`.

vLLM's own block hashes depend on its hash function and on a seed that is random per process
unless PYTHONHASHSEED is set, so the scheduler cannot recompute them for a request. Since
BlockStored carries the token ids, the index keys blocks by a chained hash of our own over
token-id blocks (`chain_hashes`), and keeps each engine's vLLM hash -> our hash map so
BlockRemoved works. A request's token ids hashed the same way then find, per engine, how
many leading blocks it holds (llm-d's precise-prefix-cache scorer indexes the same events;
it recomputes vLLM's hashes instead, which needs the engines' hash seed fixed).

Only plain text blocks of the base model are indexed: a block whose hash also covers a LoRA
adapter, multimodal input or a cache salt (lora_name / extra_keys set) is skipped, as is one
of a second KV-cache group (hybrid models).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

ROOT_HASH = 0  # the parent of a sequence's first block
_decoder = msgspec.msgpack.Decoder()


def chain_hashes(token_ids: Sequence[int], block_size: int, parent: int = ROOT_HASH) -> list[int]:
    """Our hash of each whole `block_size` block of `token_ids`, each covering the blocks
    before it (a partial tail block is ignored: engines cache whole blocks only). Python's
    hash of a tuple of ints is not salted per process, so every process agrees."""
    hashes: list[int] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(token_ids[start : start + block_size])))
        hashes.append(parent)
    return hashes


@dataclass(slots=True)
class EngineBlocks:
    """One engine's cached blocks: vLLM's hash -> ours (one content, one hash in either),
    the (medium, vLLM hash) entries it holds, and how many media hold each of our hashes
    (a block may sit on GPU and on an offload tier at once)."""

    block_size: int = 0  # learned from its first BlockStored
    ours: dict[Hashable, int] = field(default_factory=dict)
    entries: set[tuple[Hashable, Hashable]] = field(default_factory=set)
    held: dict[int, int] = field(default_factory=dict)
    last_seq: int = -1


@dataclass(slots=True)
class IndexStats:
    """Counts for logs and tests: events applied, blocks skipped, sequence gaps seen."""

    stored: int = 0
    removed: int = 0
    cleared: int = 0
    skipped: int = 0  # blocks not indexed (adapter/multimodal/salted, or parent unknown)
    gaps: int = 0  # batches missing before the one received (events lost)


class KvBlockIndex:
    """Block hash -> engines holding it, per engine updated from its event stream."""

    def __init__(self) -> None:
        self._engines: dict[str, EngineBlocks] = {}
        self._owners: dict[int, set[str]] = {}
        self.stats = IndexStats()

    def engines(self) -> list[str]:
        """Engines that have published at least one event batch (and not been dropped)."""
        return list(self._engines)

    def block_count(self, engine_id: str) -> int:
        """How many distinct blocks `engine_id` holds as far as its events say."""
        blocks = self._engines.get(engine_id)
        return len(blocks.held) if blocks is not None else 0

    def block_size(self, engine_id: str) -> int:
        """The engine's block size (0 before its first BlockStored)."""
        blocks = self._engines.get(engine_id)
        return blocks.block_size if blocks is not None else 0

    def drop_engine(self, engine_id: str) -> None:
        """Forget everything `engine_id` held (engine gone, restarted or cache cleared)."""
        blocks = self._engines.pop(engine_id, None)
        if blocks is not None:
            self._release_all(engine_id, blocks)

    def apply_message(self, engine_id: str, frames: Sequence[bytes]) -> None:
        """Apply one multipart message as vLLM's ZMQ publisher sends it."""
        if len(frames) < 2:
            return
        seq = int.from_bytes(frames[-2], "big") if len(frames) >= 3 else -1
        self.apply_batch(engine_id, _decoder.decode(frames[-1]), seq)

    def apply_batch(self, engine_id: str, batch: Any, seq: int = -1) -> None:
        """Apply a decoded EventBatch `[ts, events, dp_rank]` (`seq`: its sequence number;
        a publisher that starts again from 0 is a new engine process: its old blocks go)."""
        blocks = self._engines.get(engine_id)
        if blocks is None:
            blocks = self._engines[engine_id] = EngineBlocks()
        if seq >= 0:
            if 0 <= seq <= blocks.last_seq:  # restarted publisher: a fresh, empty cache
                self._release_all(engine_id, blocks)
                blocks = self._engines[engine_id] = EngineBlocks()
            elif blocks.last_seq >= 0 and seq > blocks.last_seq + 1:
                self.stats.gaps += 1
            blocks.last_seq = seq
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            return
        events = batch[1]
        if not isinstance(events, list):
            return
        for event in events:
            if isinstance(event, dict):
                self._apply_event(engine_id, blocks, event)

    def _apply_event(self, engine_id: str, blocks: EngineBlocks, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "BlockStored":
            self._stored(engine_id, blocks, event)
        elif kind == "BlockRemoved":
            self._removed(engine_id, blocks, event)
        elif kind == "AllBlocksCleared":
            self.stats.cleared += 1
            self._release_all(engine_id, blocks)
            blocks.ours.clear()
            blocks.entries.clear()
            blocks.held.clear()

    def _stored(self, engine_id: str, blocks: EngineBlocks, event: dict[str, Any]) -> None:
        hashes = event.get("block_hashes") or []
        tokens = event.get("token_ids") or []
        size = event.get("block_size") or 0
        medium = event.get("medium")
        if (
            not isinstance(size, int)
            or size <= 0
            or event.get("lora_name") is not None
            or event.get("lora_id") is not None
            or any(key is not None for key in event.get("extra_keys") or ())
            or event.get("group_idx") not in (None, 0)
            or len(tokens) < len(hashes) * size
        ):
            self.stats.skipped += len(hashes)
            return
        blocks.block_size = size
        parent_hash = event.get("parent_block_hash")
        if parent_hash is None:
            parent = ROOT_HASH
        else:
            found = blocks.ours.get(parent_hash)
            if found is None:  # its parent's event was lost: the chain cannot be rebuilt
                self.stats.skipped += len(hashes)
                return
            parent = found
        ours = chain_hashes(tokens[: len(hashes) * size], size, parent)
        for vllm_hash, our_hash in zip(hashes, ours, strict=True):
            key = (medium, vllm_hash)
            if key in blocks.entries:
                continue
            blocks.entries.add(key)
            blocks.ours[vllm_hash] = our_hash
            count = blocks.held.get(our_hash, 0)
            blocks.held[our_hash] = count + 1
            if not count:
                self._owners.setdefault(our_hash, set()).add(engine_id)
            self.stats.stored += 1

    def _removed(self, engine_id: str, blocks: EngineBlocks, event: dict[str, Any]) -> None:
        medium = event.get("medium")
        for vllm_hash in event.get("block_hashes") or ():
            key = (medium, vllm_hash)
            our_hash = blocks.ours.get(vllm_hash)
            if key not in blocks.entries or our_hash is None:
                continue
            blocks.entries.discard(key)
            self.stats.removed += 1
            left = blocks.held.get(our_hash, 0) - 1
            if left > 0:
                blocks.held[our_hash] = left
                continue
            del blocks.ours[vllm_hash]
            self._release(engine_id, blocks, our_hash)

    def _release(self, engine_id: str, blocks: EngineBlocks, our_hash: int) -> None:
        blocks.held.pop(our_hash, None)
        owners = self._owners.get(our_hash)
        if owners is not None:
            owners.discard(engine_id)
            if not owners:
                del self._owners[our_hash]

    def _release_all(self, engine_id: str, blocks: EngineBlocks) -> None:
        for our_hash in blocks.held:
            owners = self._owners.get(our_hash)
            if owners is not None:
                owners.discard(engine_id)
                if not owners:
                    del self._owners[our_hash]

    def longest_prefix(self, hashes: Sequence[int], engine_ids: Iterable[str]) -> dict[str, int]:
        """For each of `engine_ids`, how many leading blocks of `hashes` it holds (engines
        holding none are left out)."""
        alive = set(engine_ids)
        matched: dict[str, int] = {}
        for depth, block in enumerate(hashes, 1):
            owners = self._owners.get(block)
            if not owners:
                break
            alive &= owners
            if not alive:
                break
            for engine_id in alive:
                matched[engine_id] = depth
        return matched
