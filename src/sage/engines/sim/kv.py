"""The simulator's side of vLLM's disaggregated-prefill KV exchange (NixlConnector's wire format).

A proxy sends a request to a prefill engine with `kv_transfer_params.do_remote_decode`; the
prefill engine answers one token and returns `kv_transfer_params` naming the KV blocks it
holds (`remote_engine_id`, `remote_block_ids`, `remote_host`, `remote_port`). The proxy passes
those to a decode engine, which pulls the blocks and skips its own prefill. Here the blocks
are ids in a `BlockStore`, and the "pull" is an HTTP call to the prefill engine's
`KV_PULL_PATH` (vLLM uses a NIXL side channel; the sim serves it on its HTTP port).
Nothing here knows about HTTP, so it is unit-tested directly.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sage.common.exceptions import ConfigurationError, InvalidRequestError

__all__ = [
    "KV_PULL_PATH",
    "KV_ROLES",
    "ROLES",
    "BlockStore",
    "KvTransferRequest",
    "PullOutcome",
    "parse_kv_transfer_params",
    "prefill_reply_params",
]

ROLES = ("both", "prefill", "decode")
# vLLM's kv_role for each engine role: a producer only sends KV, a consumer only receives.
KV_ROLES = {"both": "kv_both", "prefill": "kv_producer", "decode": "kv_consumer"}
# The sim's stand-in for NIXL's side channel, served on the engine's HTTP port.
KV_PULL_PATH = "/sim/kv/pull"
_FIELD = "kv_transfer_params"


class PullOutcome(StrEnum):
    """How a decode engine's attempt to load remote KV blocks ended."""

    OK = "ok"
    UNKNOWN_BLOCKS = "unknown_blocks"  # never held here, or already pulled
    EXPIRED_BLOCKS = "expired_blocks"  # held, but freed after the hold timeout
    WRONG_ENGINE = "wrong_engine"  # remote_engine_id is not this engine
    UNREACHABLE = "unreachable"  # the prefill engine did not answer the pull


@dataclass(frozen=True, slots=True)
class KvTransferRequest:
    """A request's validated `kv_transfer_params` (the fields NixlConnector reads)."""

    do_remote_decode: bool = False
    do_remote_prefill: bool = False
    remote_engine_id: str | None = None
    remote_block_ids: tuple[int, ...] = ()
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


def parse_kv_transfer_params(value: Any) -> KvTransferRequest | None:
    """Validate `kv_transfer_params` from a request body; None when absent.

    A decode request (`do_remote_prefill`) must name the engine, blocks, host and port to
    pull from; vLLM asserts on missing ones, the sim answers 400 naming the field.
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
    blocks = value.get("remote_block_ids")
    if (
        not isinstance(blocks, list)
        or not blocks
        or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in blocks)
    ):
        raise InvalidRequestError(
            f"{_FIELD}.remote_block_ids must be a non-empty list of block ids",
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
        remote_block_ids=tuple(blocks),
        remote_host=host,
        remote_port=port,
    )


def prefill_reply_params(
    engine_id: str, block_ids: tuple[int, ...], host: str, port: int
) -> dict[str, Any]:
    """The `kv_transfer_params` a prefill engine returns, as NixlConnector.request_finished
    builds them: the decode side reads them as its own `do_remote_prefill` request."""
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_block_ids": list(block_ids),
        "remote_engine_id": engine_id,
        "remote_host": host,
        "remote_port": port,
        "tp_size": 1,
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
        self._expired: deque[int] = deque(maxlen=self._EXPIRED_MEMORY)
        self._expired_set: set[int] = set()

    @property
    def held(self) -> int:
        """Blocks held now (expired ones are swept first)."""
        self._sweep()
        return len(self._held)

    def hold(self, prompt_tokens: int) -> tuple[int, ...]:
        """Allocate and hold the blocks of a prompt of `prompt_tokens` (at least one)."""
        self._sweep()
        count = max(1, math.ceil(prompt_tokens / self.block_size))
        expiry = self.clock() + self.hold_s
        ids = tuple(range(self._next_id, self._next_id + count))
        self._next_id += count
        for block_id in ids:
            self._held[block_id] = expiry
        return ids

    def pull(self, block_ids: tuple[int, ...]) -> PullOutcome:
        """A decoder reads the blocks; all must be held, then they are freed."""
        self._sweep()
        missing = [b for b in block_ids if b not in self._held]
        if missing:
            if any(b in self._expired_set for b in missing):
                return PullOutcome.EXPIRED_BLOCKS
            return PullOutcome.UNKNOWN_BLOCKS
        for block_id in block_ids:
            del self._held[block_id]
        self.pulled_total += len(block_ids)
        return PullOutcome.OK

    def _sweep(self) -> None:
        now = self.clock()
        while self._held:
            block_id, expiry = next(iter(self._held.items()))
            if expiry > now:
                return
            del self._held[block_id]
            self.expired_total += 1
            if len(self._expired) == self._expired.maxlen:
                self._expired_set.discard(self._expired[0])
            self._expired.append(block_id)
            self._expired_set.add(block_id)
