"""The simulator's model: deterministic text and vectors, and the continuous-batching slots.

Nothing here knows about HTTP, so tests can compute exactly what the simulator will answer
(`expected_text`) and drive the admission queue directly. The simulator is a testing and
benchmarking tool for the control plane, not an inference engine.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import functools
import hashlib
import math
import struct
import sys
import zlib
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sage.common.config.ports import SagePorts
from sage.common.exceptions import ConfigurationError

__all__ = [
    "OWNED_BY",
    "VOCABULARY",
    "AdmissionQueue",
    "Generation",
    "SimConfig",
    "chat_prompt_text",
    "count_tokens",
    "detokenize",
    "embedding_vector",
    "expected_text",
    "generate",
    "generate_ids",
    "pair_score",
    "tokenize",
]

OWNED_BY = "sage-sim"

# Output words are drawn from this list; one word is one token, so output length in
# tokens is exactly its whitespace word count.
VOCABULARY: tuple[str, ...] = (
    "the",
    "quick",
    "model",
    "token",
    "batch",
    "queue",
    "engine",
    "request",
    "latency",
    "stream",
    "answer",
    "signal",
    "vector",
    "kernel",
    "memory",
    "cache",
    "prefill",
    "decode",
    "router",
    "policy",
    "gateway",
    "replica",
    "shard",
    "tensor",
    "weight",
    "layer",
    "sample",
    "prompt",
    "context",
    "window",
    "scheduler",
    "budget",
    "deadline",
    "metric",
    "gauge",
    "counter",
    "histogram",
    "bucket",
    "trace",
    "span",
    "worker",
    "thread",
    "socket",
    "packet",
    "frame",
    "chunk",
    "buffer",
    "offset",
    "index",
    "value",
    "result",
    "output",
    "input",
    "simple",
    "steady",
    "rapid",
    "gentle",
    "bright",
    "calm",
    "clear",
    "eager",
    "fair",
    "keen",
)


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Settings of one simulator engine; latencies are in milliseconds."""

    model: str = "sim"
    aliases: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = SagePorts.BENCHMARK_LLM
    ttft_ms: float = 0.0
    tpot_ms: float = 0.0
    batch_slowdown: float = 0.0
    max_num_seqs: int = 256
    max_tokens_default: int = 16
    max_model_len: int = 4096
    seed: int = 0
    embedding_dim: int = 0
    # PD (disaggregated) serving: which side of vLLM's KV exchange this engine plays.
    role: str = "both"  # both | prefill | decode
    kv_engine_id: str = ""  # NixlConnector's engine id; "" = a random one per process
    kv_block_size: int = 16  # prompt tokens per KV block
    kv_hold_s: float = 480.0  # prefill keeps blocks this long for a decoder to pull
    # NIXL's side channel (vLLM: VLLM_NIXL_SIDE_CHANNEL_HOST/PORT), where decoders pull
    # from; "" = the HTTP host, 0 = a free port (vLLM's 5600 would clash between engines).
    kv_side_channel_host: str = ""
    kv_side_channel_port: int = 0
    # What a decode engine does when remote KV cannot be loaded: vLLM's default "fail"
    # (the request ends with a 500), or "recompute" (prefill locally).
    kv_load_failure_policy: str = "fail"
    # Which vLLM KV connector the engine plays: "nixl" (NixlConnector: the prefill reply's
    # kv_transfer_params name the blocks) or "example" (ExampleConnector: KV of prompt
    # prefixes, whole kv_block_size blocks, in kv_shared_storage_path, found by prompt, no
    # params in the reply).
    kv_connector: str = "nixl"
    kv_shared_storage_path: str = ""
    # Output tokens that continue the word before them (WordPiece's "##s"): replies then
    # do not re-tokenize to their own ids, as real tokenizers' often do not.
    subword_tokens: bool = False
    # Serve vLLM's runtime LoRA routes (vLLM's --enable-lora, runtime updating on).
    enable_lora: bool = False
    max_lora_rank: int = 16
    # Automatic prefix caching (prefix_cache.py): an LRU of this many kv_block_size blocks
    # (0: off), and the prefill time of each prompt token not found there, added to ttft_ms.
    prefix_cache_blocks: int = 0
    prefill_ms_per_token: float = 0.0
    # Publish the prefix cache's blocks as vLLM's KV-cache events on this ZMQ endpoint
    # (kv_publisher.py; vLLM's --kv-events-config); "" = none.
    kv_events_endpoint: str = ""
    # Which engine family's metrics and health routes to speak: vllm, or sglang (sglang.py).
    flavor: str = "vllm"
    served_names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        checks: list[tuple[bool, str]] = [
            (bool(self.model), "model must be a non-empty name"),
            (self.ttft_ms >= 0, "ttft_ms must be >= 0"),
            (self.tpot_ms >= 0, "tpot_ms must be >= 0"),
            (self.batch_slowdown >= 0, "batch_slowdown must be >= 0"),
            (self.max_num_seqs >= 1, "max_num_seqs must be >= 1"),
            (self.max_tokens_default >= 1, "max_tokens_default must be >= 1"),
            (self.max_model_len >= 1, "max_model_len must be >= 1"),
            (self.embedding_dim >= 0, "embedding_dim must be >= 0"),
            (0 <= self.port <= 65535, "port must be in 0..65535"),
            (self.role in ("both", "prefill", "decode"), "role must be both, prefill or decode"),
            (self.kv_block_size >= 1, "kv_block_size must be >= 1"),
            (self.max_lora_rank >= 1, "max_lora_rank must be >= 1"),
            (self.kv_hold_s > 0, "kv_hold_s must be > 0"),
            (self.prefix_cache_blocks >= 0, "prefix_cache_blocks must be >= 0"),
            (self.prefill_ms_per_token >= 0, "prefill_ms_per_token must be >= 0"),
            (
                not self.kv_events_endpoint or self.prefix_cache_blocks > 0,
                "kv_events_endpoint needs prefix_cache_blocks",
            ),
            (0 <= self.kv_side_channel_port <= 65535, "kv_side_channel_port must be 0..65535"),
            (
                self.kv_load_failure_policy in ("fail", "recompute"),
                "kv_load_failure_policy must be fail or recompute",
            ),
            (self.kv_connector in ("nixl", "example"), "kv_connector must be nixl or example"),
            (self.flavor in ("vllm", "sglang"), "flavor must be vllm or sglang"),
            (
                self.kv_connector != "example" or bool(self.kv_shared_storage_path),
                "kv_connector example needs kv_shared_storage_path",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigurationError(f"sim engine: {message}")
        # Served names: the model first, then aliases, without repeats.
        names = tuple(dict.fromkeys((self.model, *(a for a in self.aliases if a))))
        object.__setattr__(self, "served_names", names)

    @property
    def has_latency(self) -> bool:
        """False on the zero-latency path, where the simulator never sleeps."""
        return self.ttft_ms > 0 or self.tpot_ms > 0 or self.prefill_ms_per_token > 0

    def prefill_s(self, uncached_tokens: int) -> float:
        """Seconds from admission to the first token of a local prefill of this many
        prompt tokens not found in the prefix cache."""
        return (self.ttft_ms + self.prefill_ms_per_token * uncached_tokens) / 1000.0

    def decode_step_s(self, running: int) -> float:
        """Seconds one output token costs while `running` requests share the batch."""
        return self.tpot_ms / 1000.0 * (1.0 + self.batch_slowdown * max(0, running - 1))


@dataclass(frozen=True, slots=True)
class Generation:
    """One choice's output: `pieces[i]` is the text of token i (the last may be cut by stop)."""

    pieces: tuple[str, ...]
    finish_reason: str
    stop_reason: str | None = None
    token_ids: tuple[int, ...] = ()  # one per piece

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def completion_tokens(self) -> int:
        return len(self.pieces)


def count_tokens(text: str) -> int:
    """Prompt tokens as the simulator counts them: whitespace-separated words."""
    return len(text.split())


# Word pieces that continue the word before them, as WordPiece's "##s" does; only engines
# started with subword_tokens produce them. Their text glued to a word re-tokenizes as one
# other word, so a reply resumed from its text (not its ids) goes on differently.
SUFFIXES: tuple[str, ...] = ("s", "ing", "ed", "er")

# The sim's tokenizer: one word, one token. Output words have small ids of their own (so a
# reply's ids decode back to its words); any other word gets a stable hash id above them.
FIRST_WORD_ID = 100
FIRST_HASHED_ID = 1000
_HASHED_IDS = 2**31 - FIRST_HASHED_ID
_WORD_IDS = {word: FIRST_WORD_ID + i for i, word in enumerate(VOCABULARY)}
_OUTPUT = (*((w, " " + w) for w in VOCABULARY), *((s, s) for s in SUFFIXES))


@functools.lru_cache(maxsize=1 << 16)
def _word_id(word: str) -> int:
    found = _WORD_IDS.get(word)
    if found is not None:
        return found
    hashed = FIRST_HASHED_ID + zlib.crc32(word.encode("utf-8", "surrogatepass")) % _HASHED_IDS
    if len(_HASHED_WORDS) < _HASHED_WORDS_KEPT:
        _HASHED_WORDS.setdefault(hashed, word)
    return hashed


# Hashed ids back to the words that gave them, for /detokenize (a hash has no inverse):
# the first words this process tokenized, bounded; other hashed ids read as UNKNOWN_WORD.
_HASHED_WORDS: dict[int, str] = {}
_HASHED_WORDS_KEPT = 1 << 16
UNKNOWN_WORD = "<unk>"


def tokenize(text: str) -> list[int]:
    """The token ids of `text` as the simulator reads it (one per whitespace word)."""
    return list(map(_word_id, text.split()))


def detokenize(token_ids: Sequence[int]) -> str:
    """The text of token ids: output words spaced, suffixes glued to the word before, other
    words as tokenize met them (words joined by single spaces)."""
    pieces: list[str] = []
    for token in token_ids:
        index = token - FIRST_WORD_ID
        if 0 <= index < len(_OUTPUT):
            pieces.append(_OUTPUT[index][bool(pieces)])
        else:
            word = _HASHED_WORDS.get(token, UNKNOWN_WORD)
            pieces.append(" " + word if pieces else word)
    return "".join(pieces)


def _seed_bytes(seed: int) -> bytes:
    # Any int works as a seed; only its low 64 bits matter.
    return (seed & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little")


def _id_bytes(token_ids: Sequence[int]) -> bytes:
    # Ids as little-endian uint32 (the sim's ids are below 2**31), the same on every host.
    return struct.pack(f"<{len(token_ids)}I", *token_ids)


def generate_ids(
    prompt_ids: Sequence[int],
    max_tokens: int,
    seed: int = 0,
    stop: Sequence[str] | None = None,
    subword: bool = False,
) -> Generation:
    """The output for a prompt of token ids, one token at a time: each next token is a
    hash of every token before it (prompt and output), as a greedy model's would be, so a
    prompt that ends with part of a reply continues that reply exactly. Cut at `stop`;
    `subword` adds SUFFIXES to the output vocabulary."""
    # blake2b is stable across processes (hash() is salted) and hashes incrementally, so a
    # long prompt costs one C call and each step a copy of the running state.
    state = hashlib.blake2b(
        _id_bytes(prompt_ids), digest_size=8, person=b"sage-sim", salt=_seed_bytes(seed)
    )
    # A word after another output token is spaced from it; the first after prompt text is not.
    spaced = bool(prompt_ids) and FIRST_WORD_ID <= prompt_ids[-1] < FIRST_WORD_ID + len(_OUTPUT)
    choices = len(_OUTPUT) if subword else len(VOCABULARY)
    ids: list[int] = []
    pieces: list[str] = []
    for _ in range(max_tokens):
        index = int.from_bytes(state.digest(), "little") % choices
        token = FIRST_WORD_ID + index
        ids.append(token)
        pieces.append(_OUTPUT[index][spaced])
        spaced = True
        state.update(token.to_bytes(4, "little"))
    if stop:
        text = "".join(pieces)
        hits = [(text.find(s), s) for s in stop if s]
        hits = [(at, s) for at, s in hits if at >= 0]
        if hits:
            cut, stop_string = min(hits)
            kept: list[str] = []
            consumed = 0
            for piece in pieces:
                # The token that holds the start of the stop string is generated, then trimmed.
                kept.append(piece[: max(0, cut - consumed)])
                consumed += len(piece)
                if consumed > cut:
                    break
            return Generation(tuple(kept), "stop", stop_string, tuple(ids[: len(kept)]))
    return Generation(tuple(pieces), "length", None, tuple(ids))


def generate(
    prompt_text: str,
    max_tokens: int,
    seed: int = 0,
    stop: Sequence[str] | None = None,
    subword: bool = False,
) -> Generation:
    """The output for a text prompt: that of its token ids (see `generate_ids`)."""
    return generate_ids(tokenize(prompt_text), max_tokens, seed, stop, subword)


def expected_text(
    prompt_text: str,
    max_tokens: int,
    seed: int = 0,
    stop: Sequence[str] | None = None,
    subword: bool = False,
) -> str:
    """Exactly the text the simulator answers for this prompt text (for tests)."""
    return generate(prompt_text, max_tokens, seed, stop, subword).text


def chat_prompt_text(messages: Iterable[Mapping[str, Any]]) -> str:
    """The prompt text of chat messages: their text contents joined by newlines.

    Content may be a string or a list of parts; only `{"type": "text"}` parts count.
    """
    texts: list[str] = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(
                part["text"]
                for part in content
                if isinstance(part, dict)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
            )
    return "\n".join(texts)


def embedding_vector(text: str, dim: int, seed: int = 0) -> list[float]:
    """A deterministic unit vector for `text`: equal texts give equal vectors."""
    raw = hashlib.shake_256(_seed_bytes(seed) + text.encode("utf-8", "surrogatepass")).digest(
        dim * 2
    )
    values = array.array("h", raw)
    if sys.byteorder != "little":  # the same vector on every machine
        values.byteswap()
    norm = math.sqrt(sum(v * v for v in values))
    if norm == 0.0:  # pragma: no cover - needs an all-zero hash
        return [1.0] + [0.0] * (dim - 1)
    return [v / norm for v in values]


def pair_score(query: str, document: str, dim: int, seed: int = 0) -> float:
    """The sim's cross-encoder: the cosine of the two texts' bags of word vectors, mapped
    to 0..1 (a sigmoid's range, as vLLM's scores). Shared words score high, so a reranked
    list puts the documents that repeat the query's words first; deterministic."""

    def bag(text: str) -> list[float]:
        total = [0.0] * dim
        for word in text.lower().split():
            for i, v in enumerate(embedding_vector(word, dim, seed)):
                total[i] += v
        return total

    a, b = bag(query), bag(document)
    norms = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    if norms == 0.0:
        return 0.5
    return (1.0 + sum(x * y for x, y in zip(a, b, strict=True)) / norms) / 2.0


class AdmissionQueue:
    """FIFO admission with at most `capacity` requests running: vLLM's max_num_seqs slots.

    `enqueue` hands out a ticket (a future that resolves when the request is admitted);
    `finish` must be called exactly once per ticket, whether it was admitted or not, so an
    abandoned request never keeps a slot or a place in the queue.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ConfigurationError("capacity must be >= 1")
        self.capacity = capacity
        self.running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def enqueue(self) -> asyncio.Future[None]:
        """A ticket, already done when a slot was free and nobody was ahead."""
        ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.running < self.capacity and not self._waiters:
            self.running += 1
            ticket.set_result(None)
        else:
            self._waiters.append(ticket)
        return ticket

    def finish(self, ticket: asyncio.Future[None]) -> None:
        """Give back the slot of an admitted ticket, or withdraw a waiting one."""
        if ticket.done() and not ticket.cancelled():
            self.running -= 1
            self._admit_next()
            return
        ticket.cancel()
        with contextlib.suppress(ValueError):  # already skipped by _admit_next
            self._waiters.remove(ticket)

    def _admit_next(self) -> None:
        while self._waiters and self.running < self.capacity:
            ticket = self._waiters.popleft()
            if ticket.done():  # its waiter was cancelled; skip it
                continue
            self.running += 1
            ticket.set_result(None)
