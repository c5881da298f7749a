"""The simulator's side of vLLM's disaggregated-prefill KV exchange (NixlConnector's wire format).

A proxy sends a request to a prefill engine with `kv_transfer_params.do_remote_decode`; the
prefill engine answers one token and returns `kv_transfer_params` naming the KV blocks it
holds, in vLLM 0.33 NixlConnector's shape (`prefill_reply_params`): the request and engine
ids, block ids as one list per KV-cache group, and the NIXL side channel's host and port
(not the HTTP address). The proxy passes those to a decode engine, which pulls the blocks
through that side channel and skips its own prefill. Here the blocks are ids in a
`BlockStore`, and the side channel is a line of JSON over TCP (`SideChannel`; vLLM's is a
ZMQ socket followed by an RDMA read). Nothing here knows about HTTP, so it is unit-tested
directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import orjson

from sage.common.exceptions import ConfigurationError, InvalidRequestError

__all__ = [
    "KV_LOAD_FAILURE_POLICIES",
    "KV_ROLES",
    "ROLES",
    "BlockStore",
    "KvTransferRequest",
    "PullOutcome",
    "SharedStorage",
    "SideChannel",
    "parse_kv_transfer_params",
    "prefill_reply_params",
    "pull_blocks",
]

ROLES = ("both", "prefill", "decode")
# vLLM's kv_role for each engine role: a producer only sends KV, a consumer only receives.
KV_ROLES = {"both": "kv_both", "prefill": "kv_producer", "decode": "kv_consumer"}
# vLLM's KVTransferConfig.kv_load_failure_policy values; its default is "fail" (the request
# ends with an error), "recompute" prefills locally instead.
KV_LOAD_FAILURE_POLICIES = ("fail", "recompute")
# NixlConnector's transfer mode: the decoder reads (pulls) the prefill's blocks.
TRANSFER_MODE = "pull"
_FIELD = "kv_transfer_params"
_MAX_LINE = 1 << 20  # one pull request or answer; a decoder never sends more


class PullOutcome(StrEnum):
    """How a decode engine's attempt to load remote KV blocks ended."""

    OK = "ok"
    UNKNOWN_BLOCKS = "unknown_blocks"  # never held here, or already pulled
    EXPIRED_BLOCKS = "expired_blocks"  # held, but freed after the hold timeout
    WRONG_ENGINE = "wrong_engine"  # remote_engine_id is not this engine
    UNREACHABLE = "unreachable"  # the prefill engine's side channel did not answer


@dataclass(frozen=True, slots=True)
class KvTransferRequest:
    """A request's validated `kv_transfer_params` (the fields NixlConnector reads)."""

    do_remote_decode: bool = False
    do_remote_prefill: bool = False
    remote_engine_id: str | None = None
    remote_request_id: str | None = None  # vLLM >= 0.33; absent in the older flat shape
    remote_block_ids: tuple[int, ...] = ()  # every KV-cache group's ids, in order
    remote_host: str | None = None
    remote_port: int | None = None


def _flag(params: dict[str, Any], key: str) -> bool:
    value = params.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequestError(
            f"{_FIELD}.{key} must be a boolean, got {value!r}", param=f"{_FIELD}.{key}"
        )
    return value


def _block_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _block_ids(value: Any) -> tuple[int, ...]:
    """Block ids as vLLM 0.33 sends them (one list per KV-cache group, `[[1, 2], [3]]`) or
    as older versions did (one flat list); empty when neither."""
    if not isinstance(value, list):
        return ()
    if all(_block_id(b) for b in value):
        return tuple(value)
    if all(isinstance(g, list) and all(_block_id(b) for b in g) for g in value):
        return tuple(b for group in value for b in group)
    return ()


def parse_kv_transfer_params(value: Any) -> KvTransferRequest | None:
    """Validate `kv_transfer_params` from a request body; None when absent.

    A decode request (`do_remote_prefill`) must name the engine, blocks, host and port to
    pull from; vLLM asserts on missing ones, the sim answers 400 naming the field. Both
    NixlConnector shapes are read: 0.33's (`remote_request_id`, grouped block ids, dcp/pp
    sizes, ...) and the older flat one; fields the sim has no use for are ignored.
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{_FIELD} must be an object", param=_FIELD)
    decode = _flag(value, "do_remote_decode")
    prefill = _flag(value, "do_remote_prefill")
    if decode and prefill:
        raise InvalidRequestError(
            f"{_FIELD}: do_remote_decode and do_remote_prefill cannot both be true", param=_FIELD
        )
    if not prefill:
        return KvTransferRequest(do_remote_decode=decode)
    engine_id = value.get("remote_engine_id")
    if not isinstance(engine_id, str) or not engine_id:
        raise InvalidRequestError(
            f"{_FIELD}.remote_engine_id must be a non-empty string for do_remote_prefill",
            param=f"{_FIELD}.remote_engine_id",
        )
    request_id = value.get("remote_request_id")
    if request_id is not None and (not isinstance(request_id, str) or not request_id):
        raise InvalidRequestError(
            f"{_FIELD}.remote_request_id must be a non-empty string",
            param=f"{_FIELD}.remote_request_id",
        )
    blocks = _block_ids(value.get("remote_block_ids"))
    if not blocks:
        raise InvalidRequestError(
            f"{_FIELD}.remote_block_ids must be a non-empty list of block ids (one list per "
            "KV-cache group, or one flat list)",
            param=f"{_FIELD}.remote_block_ids",
        )
    host = value.get("remote_host")
    if not isinstance(host, str) or not host:
        raise InvalidRequestError(
            f"{_FIELD}.remote_host must be a non-empty string", param=f"{_FIELD}.remote_host"
        )
    port = value.get("remote_port")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise InvalidRequestError(
            f"{_FIELD}.remote_port must be a port number, got {port!r}",
            param=f"{_FIELD}.remote_port",
        )
    return KvTransferRequest(
        do_remote_prefill=True,
        remote_engine_id=engine_id,
        remote_request_id=request_id,
        remote_block_ids=blocks,
        remote_host=host,
        remote_port=port,
    )


def prefill_reply_params(
    engine_id: str,
    request_id: str,
    block_ids: tuple[int, ...],
    host: str,
    port: int,
    prompt_tokens: int,
) -> dict[str, Any]:
    """The `kv_transfer_params` a prefill engine returns, key for key as vLLM 0.33's
    NixlConnector (pull mode) `request_finished` builds them for a single-GPU engine with
    one KV-cache group; the decode side reads them as its own `do_remote_prefill` request.
    `host`/`port` are the side channel's, never the HTTP address."""
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_block_ids": [list(block_ids)],
        "remote_engine_id": engine_id,
        "remote_request_id": request_id,
        "remote_host": host,
        "remote_port": port,
        "tp_size": 1,
        "dcp_size": 1,
        "pp_size": 1,
        "remote_num_tokens": prompt_tokens,
        # vLLM sets an expiry only for blocks pinned on a decode node (turn-2 readback).
        "remote_blocks_expiry_time": None,
        "remote_registration_generation": 0,
        "transfer_mode": TRANSFER_MODE,
    }


class BlockStore:
    """KV blocks a prefill engine keeps for remote decoders: freed when pulled, or after
    `hold_s` (vLLM's VLLM_NIXL_ABORT_REQUEST_TIMEOUT) when no decoder came for them."""

    _EXPIRED_MEMORY = 65536  # recently expired ids remembered, to tell expired from unknown

    def __init__(
        self, block_size: int, hold_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if block_size < 1:
            raise ConfigurationError("kv block size must be >= 1")
        if hold_s <= 0:
            raise ConfigurationError("kv hold time must be > 0")
        self.block_size = block_size
        self.hold_s = hold_s
        self.clock = clock
        self.expired_total = 0
        self.pulled_total = 0
        self._next_id = 0
        self._held: OrderedDict[int, float] = OrderedDict()  # block id -> expiry, oldest first
        self._owner: dict[int, str] = {}  # block id -> the request it was prefilled for
        self._expired: deque[int] = deque(maxlen=self._EXPIRED_MEMORY)
        self._expired_set: set[int] = set()

    @property
    def held(self) -> int:
        """Blocks held now (expired ones are swept first)."""
        self._sweep()
        return len(self._held)

    def hold(self, prompt_tokens: int, request_id: str = "") -> tuple[int, ...]:
        """Allocate and hold the blocks of a prompt of `prompt_tokens` (at least one) for
        the request `request_id`."""
        self._sweep()
        count = max(1, math.ceil(prompt_tokens / self.block_size))
        expiry = self.clock() + self.hold_s
        ids = tuple(range(self._next_id, self._next_id + count))
        self._next_id += count
        for block_id in ids:
            self._held[block_id] = expiry
            self._owner[block_id] = request_id
        return ids

    def pull(self, block_ids: tuple[int, ...], request_id: str | None = None) -> PullOutcome:
        """A decoder reads the blocks; all must be held (for `request_id`, when the decoder
        names it, as vLLM 0.33 does), then they are freed."""
        self._sweep()
        missing = [b for b in block_ids if b not in self._held]
        if missing:
            if any(b in self._expired_set for b in missing):
                return PullOutcome.EXPIRED_BLOCKS
            return PullOutcome.UNKNOWN_BLOCKS
        if request_id is not None and any(self._owner[b] != request_id for b in block_ids):
            return PullOutcome.UNKNOWN_BLOCKS
        for block_id in block_ids:
            del self._held[block_id]
            del self._owner[block_id]
        self.pulled_total += len(block_ids)
        return PullOutcome.OK

    def _sweep(self) -> None:
        now = self.clock()
        while self._held:
            block_id, expiry = next(iter(self._held.items()))
            if expiry > now:
                return
            del self._held[block_id]
            self._owner.pop(block_id, None)
            self.expired_total += 1
            if len(self._expired) == self._expired.maxlen:
                self._expired_set.discard(self._expired[0])
            self._expired.append(block_id)
            self._expired_set.add(block_id)


# -- the side channel: where decoders pull from --------------------------------------------

PullHandler = Callable[[str, str | None, tuple[int, ...]], PullOutcome]


class SideChannel:
    """The prefill side's stand-in for NIXL's side channel: a TCP listener of its own (vLLM:
    VLLM_NIXL_SIDE_CHANNEL_HOST/PORT), apart from the HTTP port, answering one JSON line
    `{"engine_id", "request_id", "block_ids"}` with `{"outcome"}`. Like NIXL's, it takes
    no API key; it serves simulated block ids only."""

    def __init__(self, handler: PullHandler) -> None:
        self._handler = handler
        self._server: asyncio.Server | None = None
        self._lock = asyncio.Lock()
        self.host = ""
        self.port = 0

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on host:port (0: a free port) once; returns the bound (host, port)."""
        async with self._lock:
            if self._server is None:
                self._server = await asyncio.start_server(self._serve, host, port, limit=_MAX_LINE)
                bound = self._server.sockets[0].getsockname()
                self.host, self.port = host, int(bound[1])
        return self.host, self.port

    async def close(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            outcome = self._answer(line)
            writer.write(orjson.dumps({"outcome": outcome.value}) + b"\n")
            await writer.drain()
        except (OSError, TimeoutError, ValueError):
            pass  # a caller that went away or sent too much gets nothing
        finally:
            writer.close()

    def _answer(self, line: bytes) -> PullOutcome:
        try:
            doc: Any = orjson.loads(line)
        except orjson.JSONDecodeError:
            return PullOutcome.UNKNOWN_BLOCKS
        if not isinstance(doc, dict):
            return PullOutcome.UNKNOWN_BLOCKS
        engine_id, request_id = doc.get("engine_id"), doc.get("request_id")
        blocks = doc.get("block_ids")
        if (
            not isinstance(engine_id, str)
            or not (request_id is None or isinstance(request_id, str))
            or not isinstance(blocks, list)
            or not all(_block_id(b) for b in blocks)
        ):
            return PullOutcome.UNKNOWN_BLOCKS
        return self._handler(engine_id, request_id, tuple(blocks))


async def pull_blocks(kv: KvTransferRequest, timeout_s: float = 5.0) -> PullOutcome:
    """Pull `kv`'s blocks from the prefill engine's side channel (the decode side)."""
    host, port = kv.remote_host or "", kv.remote_port or 0
    payload = {
        "engine_id": kv.remote_engine_id,
        "request_id": kv.remote_request_id,
        "block_ids": list(kv.remote_block_ids),
    }
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port, limit=_MAX_LINE)
            try:
                writer.write(orjson.dumps(payload) + b"\n")
                await writer.drain()
                doc: Any = orjson.loads(await reader.readline())
            finally:
                writer.close()
        return PullOutcome(doc["outcome"])
    except (OSError, TimeoutError, ValueError, TypeError, KeyError):
        return PullOutcome.UNREACHABLE


class SharedStorage:
    """ExampleConnector's stand-in: KV of prompt prefixes as files under one folder that
    several engines share, named by a hash of the prefix. As in vLLM's ExampleConnector,
    the prefix is the prompt's first `hit_tokens` tokens (whole blocks, the last token
    excluded), every engine stores prompts it prefilled and loads any it finds, whatever its
    kv_role ("External Cache Hit"), and the reply carries no kv_transfer_params."""

    def __init__(self, path: str, block_size: int) -> None:
        self.path = Path(path)
        self.block_size = block_size

    def hit_tokens(self, prompt: str) -> int:
        """Tokens a hit loads: vLLM's align_to_block_size(len(prompt) - 1)."""
        return max(0, (len(prompt.split()) - 2) // self.block_size * self.block_size)

    def _file(self, prompt: str) -> Path | None:
        tokens = self.hit_tokens(prompt)
        if tokens == 0:
            return None
        prefix = " ".join(prompt.split()[:tokens])
        return self.path / hashlib.sha256(prefix.encode()).hexdigest()

    async def save(self, prompt: str) -> None:
        """Store `prompt`'s (simulated) KV; a prompt shorter than a block has none."""
        target = self._file(prompt)
        if target is None:
            return

        def write() -> None:
            self.path.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"kv")

        await asyncio.to_thread(write)

    async def load(self, prompt: str) -> int:
        """Tokens of `prompt` found in the folder (0: none)."""
        target = self._file(prompt)
        if target is None or not await asyncio.to_thread(target.is_file):
            return 0
        return self.hit_tokens(prompt)
