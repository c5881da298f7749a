"""A preallocated KV cache of slots for the decode pass, and CUDA graphs of that pass.

Why (issue 23): on a GPU a small model's decode step is bound by the host launching
kernels, and the dynamic cache copies the batch's whole KV cache at every join and leave
(and, as torch.cat, at every step). Here each running sequence owns a slot (a row) of one
preallocated buffer and writes each new key and value at its own column, its own length:
no padding, no shifting. A join copies only the newcomer's prompt, a leave moves at most
one row into the hole it left (rows stay in slots 0..n-1), and with every tensor at a fixed
address the decode pass is captured once per batch-size bucket as a CUDA graph and then
replayed: one launch per step. Buckets are vLLM's (1, 2, 4, then multiples of 8); a batch
runs in the smallest bucket that holds it, the slots above its rows idle.

Only the decode pass uses the slots; prefill stays a plain forward pass (prompts of any
length), its cache copied into the newcomers' slots. Works for transformers' own models
with SDPA attention whose layers all keep full-attention keys and values of one shape
(`layout` says); others keep the dynamic cache.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["SlotBatch", "SlotLayout", "graph_size"]

log = logging.getLogger(__name__)

# Batch sizes a graph is captured for (vLLM's _BATCH_SIZES_TO_CAPTURE): a batch of n rows
# replays the smallest that holds it.
_SMALL_SIZES = (1, 2, 4)
_SIZE_STEP = 8
_MIN_COLUMNS = 64


def graph_size(rows: int, slots: int) -> int:
    """The bucket a batch of `rows` runs in (at most `slots`, the buffer's rows)."""
    size = next((s for s in _SMALL_SIZES if s >= rows), -(-rows // _SIZE_STEP) * _SIZE_STEP)
    return min(size, slots)


@dataclass(frozen=True)
class SlotLayout:
    """The shape of one layer's keys (values alike) per token, from a prefill's cache."""

    layers: int
    heads: int
    head_dim: int
    dtype: Any
    device: Any

    @staticmethod
    def of(kv: Sequence[tuple[Any, Any]]) -> SlotLayout | None:
        """The layout of a cache's (keys, values) per layer, or None when the layers differ
        (keys and values of another width, per-layer heads): those keep the dynamic cache."""
        if not kv:
            return None
        shapes = {(k.shape[1], k.shape[3], v.shape[1], v.shape[3], k.dtype) for k, v in kv}
        if len(shapes) != 1:
            return None
        heads, head_dim, v_heads, v_dim, dtype = shapes.pop()
        if (heads, head_dim) != (v_heads, v_dim):
            return None
        return SlotLayout(len(kv), int(heads), int(head_dim), dtype, kv[0][0].device)


class _SlotCache:
    """What the model's attention layers call instead of a transformers Cache (its `update`
    protocol): each row's new key and value go to its own column; the answer is every
    column of the rows (the attention mask hides those past each row's length)."""

    is_compileable = False

    def __init__(self, kv: Any, rows: int, index: Any) -> None:
        self._kv = kv
        self._rows = rows
        self._index = index  # [rows, heads, 1, head_dim]: each row's write column

    def update(
        self, key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[Any, Any]:
        keys = self._kv[layer_idx, 0, : self._rows]
        values = self._kv[layer_idx, 1, : self._rows]
        keys.scatter_(2, self._index, key_states)
        values.scatter_(2, self._index, value_states)
        return keys, values

    def get_seq_length(self, *args: Any, **kwargs: Any) -> int:
        return 0  # position ids are always passed: nothing derives them from this


class SlotBatch:
    """The slots' buffers (keys and values of every layer in one tensor, each row's length)
    and the decode pass over them, eager or as CUDA graphs.

    Sized by the engine's KV budget: `columns` is the widest sequence's reserve (prompt +
    max_tokens) rounded up to a power of two (fewer reallocations as widths vary) where the
    budget still holds the rows at that width, `slots` as many rows as the budget holds (at
    most max_num_seqs, at least the rows running); so slots x columns stays within the
    budget that lifecycle reserves memory for. Growing past either reallocates (rows kept)
    and drops the graphs, which are captured again on first use.
    """

    def __init__(
        self,
        model: Any,
        cache_key: str,
        layout: SlotLayout,
        *,
        kv_budget_tokens: int,
        max_rows: int,
        max_columns: int,
        graphs: bool,
    ) -> None:
        import torch

        self._torch = torch
        self._model = model
        self._cache_key = cache_key
        self.layout = layout
        self._budget = kv_budget_tokens
        self._max_rows = max(1, max_rows)
        self._max_columns = max_columns
        self.graphs = graphs and layout.device.type == "cuda"
        self.slots = 0
        self.columns = 0
        self._kv: Any = None  # [layers, 2, slots, heads, columns, head_dim]
        self._pos: Any = None  # [slots] each row's length = the column its next token takes
        self._tokens: Any = None  # [slots] each row's next input token
        self._column_ids: Any = None  # [columns] 0..columns-1, for the mask
        self._graphs: dict[int, Any] = {}
        self._outputs: dict[int, Any] = {}
        self._pool: Any = None

    # ---- the buffers

    def make_room(self, rows: int, widest: int, live: int) -> None:
        """Room for `rows` rows of up to `widest` columns; the first `live` rows are kept."""
        if rows <= self.slots and widest <= self.columns:
            return
        torch = self._torch
        columns = max(_MIN_COLUMNS, 1 << max(0, widest - 1).bit_length())
        # The admission rule keeps rows x widest within the budget: never round past it.
        columns = max(widest, min(columns, self._max_columns, self._budget // rows))
        slots = max(rows, min(self._max_rows, self._budget // columns))
        layout = self.layout
        kv = torch.zeros(
            (layout.layers, 2, slots, layout.heads, columns, layout.head_dim),
            dtype=layout.dtype,
            device=layout.device,
        )
        pos = torch.zeros(slots, dtype=torch.long, device=layout.device)
        if live:
            kept = min(columns, self.columns)
            kv[:, :, :live, :, :kept] = self._kv[:, :, :live, :, :kept]
            pos[:live] = self._pos[:live]
        log.debug(
            "KV slots: %d rows x %d columns (was %d x %d)", slots, columns, self.slots, self.columns
        )
        self._graphs, self._outputs = {}, {}  # they read the old buffers
        self._kv, self._pos = kv, pos
        self._tokens = torch.zeros(slots, dtype=torch.long, device=layout.device)
        self._column_ids = torch.arange(columns, device=layout.device)
        self.slots, self.columns = slots, columns
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None

    def join(self, placements: Sequence[tuple[int, int, int, int]], prefill_kv: Any) -> None:
        """Copy prefilled rows into their slots: (slot, prefill row, its left padding, its
        length) each, from the prefill cache's (keys, values) per layer."""
        torch = self._torch
        layout = self.layout
        # Every layer's keys and values of the newcomers in one tensor: one copy per row.
        stacked = torch.stack([t for pair in prefill_kv for t in pair])
        flat = self._kv.view(2 * layout.layers, self.slots, *self._kv.shape[3:])
        for slot, row, pad, length in placements:
            flat[:, slot, :, :length] = stacked[:, row, :, pad : pad + length]
        slots = torch.tensor([p[0] for p in placements], dtype=torch.long)
        lengths = torch.tensor([p[3] for p in placements], dtype=torch.long)
        self._pos.index_copy_(0, slots.to(layout.device), lengths.to(layout.device))

    def move(self, moves: Sequence[tuple[int, int, int]]) -> None:
        """Move rows to lower slots: (from, to, its length) each (rows stay contiguous)."""
        flat = self._kv.view(2 * self.layout.layers, self.slots, *self._kv.shape[3:])
        for source, target, length in moves:
            flat[:, target, :, :length] = flat[:, source, :, :length]
            self._pos[target] = self._pos[source]

    # ---- the decode pass

    def decode(self, tokens: Sequence[int]) -> Any:
        """One decode pass of rows 0..n-1 fed `tokens`; their last logits [n, vocabulary]."""
        torch = self._torch
        n = len(tokens)
        self._tokens[:n].copy_(torch.tensor(tokens, dtype=torch.long), non_blocking=True)
        if not self.graphs:
            return self._forward(n)
        size = graph_size(n, self.slots)
        graph = self._graphs.get(size)
        if graph is None:
            graph = self._capture(size)
            if graph is None:  # capture failed: eager from now on
                return self._forward(n)
        graph.replay()
        return self._outputs[size][:n]

    def _forward(self, size: int) -> Any:
        """The decode pass over slots 0..size-1 (what a graph captures): the mask lets each
        row see its own columns, up to and including the one its new token takes."""
        layout = self.layout
        pos = self._pos[:size]
        index = pos.view(size, 1, 1, 1).expand(size, layout.heads, 1, layout.head_dim)
        mask = (self._column_ids[None, :] <= pos[:, None])[:, None, None, :]
        output = self._model(
            input_ids=self._tokens[:size, None],
            attention_mask=mask,
            position_ids=pos[:, None],
            use_cache=True,
            **{self._cache_key: _SlotCache(self._kv, size, index)},
        )
        # Idle slots above the batch's rows advance too: clamped, they stay in bounds.
        pos.add_(1).clamp_(max=self.columns - 1)
        return output["logits"][:, -1, :]

    def _capture(self, size: int) -> Any:
        """Capture the decode pass of `size` rows as a CUDA graph (None if that fails)."""
        torch = self._torch
        saved = self._pos.clone()
        try:
            with torch.cuda.device(self.layout.device):
                # One eager pass first, on a side stream (lazy initialisation, cuBLAS
                # workspaces); it writes the rows' next columns, which the replay rewrites.
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    self._forward(size)
                torch.cuda.current_stream().wait_stream(stream)
                self._pos.copy_(saved)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                    output = self._forward(size)
        except Exception as exc:  # an op that cannot be captured: eager decode instead
            log.warning("CUDA graph capture failed, decoding without graphs: %s", exc)
            self.graphs = False
            self._graphs, self._outputs = {}, {}
            self._pos.copy_(saved)
            return None
        self._graphs[size] = graph
        self._outputs[size] = output
        log.debug("captured the decode pass for %d rows", size)
        return graph
