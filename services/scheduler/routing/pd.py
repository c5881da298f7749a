"""PD (prefill/decode disaggregated) routing, with vLLM's `kv_transfer_params` exchange.

When a model has ready engines with role prefill AND role decode, a chat or completion
request runs in two legs, as vLLM's disaggregated-serving proxies do (toy_proxy_server.py
for NixlConnector): the prefill engine gets the request with `max_tokens=1`, `stream=false`
and `kv_transfer_params={"do_remote_decode": true, ...}`; its reply's `kv_transfer_params`
(NixlConnector: remote engine and request ids, block ids per KV-cache group, the NIXL side
channel's host and port, ... in whichever version's shape) go verbatim with the original
request to a decode engine, which loads those KV blocks instead of prefilling, and answers
(streamed or not). Connectors that return no params (ExampleConnector, shared storage:
the KV is found by prompt) get the client's request as is on the decode leg.

If the prefill leg fails before answering, the original request goes to a decode (or both)
engine that prefills itself, so the client still gets its answer. Engines with role both
serve whole requests; a model without a prefill/decode pair is routed as usual.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter

from sage.common.exceptions import InvalidRequestError, ModelNotFoundError, SageError

from ..executor import EngineUnreachableError
from ..registry import EngineRecord
from .base import Router, RouteRequest, failover_order

log = logging.getLogger("sage.scheduler.pd")

# What vLLM's proxies send the prefill engine: "decode happens elsewhere, keep the KV".
PREFILL_KV_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


@dataclass(frozen=True)
class PdPools:
    """A model's ready engines split by role."""

    prefill: tuple[EngineRecord, ...]
    decode: tuple[EngineRecord, ...]
    both: tuple[EngineRecord, ...]

    @property
    def disaggregated(self) -> bool:
        """True when requests go prefill-then-decode."""
        return bool(self.prefill and self.decode)


def split_roles(engines: Sequence[EngineRecord]) -> PdPools:
    """Group engines by role (unknown roles count as both)."""
    prefill = tuple(e for e in engines if e.role == "prefill")
    decode = tuple(e for e in engines if e.role == "decode")
    both = tuple(e for e in engines if e.role not in ("prefill", "decode"))
    return PdPools(prefill, decode, both)


def _document(body: bytes) -> dict[str, Any]:
    try:
        doc: Any = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidRequestError("request body must be a JSON object")
    return doc


def prefill_body(body: bytes) -> bytes:
    """The prefill leg's body: one token, not streamed, asking the engine to keep the KV."""
    doc = _document(body)
    doc["kv_transfer_params"] = dict(PREFILL_KV_PARAMS)
    doc["stream"] = False
    doc["max_tokens"] = 1
    if "max_completion_tokens" in doc:
        doc["max_completion_tokens"] = 1
    doc.pop("min_tokens", None)  # vLLM refuses min_tokens > max_tokens
    doc.pop("stream_options", None)
    return orjson.dumps(doc)


def kv_params_of(reply: bytes) -> dict[str, Any] | None:
    """The `kv_transfer_params` of a prefill reply; None when it has none (the engine has
    no KV connector, or it is not a producer)."""
    try:
        doc: Any = orjson.loads(reply)
    except orjson.JSONDecodeError:
        return None
    params = doc.get("kv_transfer_params") if isinstance(doc, dict) else None
    return params if isinstance(params, dict) and params else None


def decode_body(body: bytes, params: dict[str, Any]) -> bytes:
    """The decode leg's body: the client's request plus the prefill's `kv_transfer_params`."""
    doc = _document(body)
    doc["kv_transfer_params"] = params
    return orjson.dumps(doc)


# Runs the prefill leg on one engine and returns its raw JSON reply (the scheduler wraps
# the executor with load tracking and circuit breakers).
PrefillCall = Callable[[EngineRecord, bytes], Awaitable[bytes]]


@dataclass(frozen=True)
class PdPlan:
    """What the scheduler sends and where: the body for the decode leg (the client's body
    when the prefill failed) and the engines to try for it, routed one first."""

    body: bytes
    candidates: list[EngineRecord]
    prefill_engine: EngineRecord | None
    kv_params: dict[str, Any] | None


class PdRouter:
    """Plans prefill-then-decode for models with both pools; counts how the legs went."""

    def __init__(self, router: Router, registry: CollectorRegistry | None = None) -> None:
        self.router = router
        self.requests = Counter(
            "sage:scheduler_pd_requests",
            "Requests routed prefill-then-decode, by how the prefill leg ended: kv_transfer "
            "(decode got the prefill's kv_transfer_params), no_kv_params (the prefill "
            "answered without them), prefill_failed (decode prefilled itself).",
            ["model", "outcome"],
            registry=registry,
        )
        # model → (the registry tuple last split, its pools): asked on every request, the
        # split would otherwise cost O(engines) per request for models that never use PD.
        self._pools: dict[str, tuple[Sequence[EngineRecord], PdPools]] = {}

    def _pools_of(self, model: str, engines: Sequence[EngineRecord]) -> PdPools:
        """split_roles(engines), reused while `engines` is the same registry tuple (tuples
        of frozen records do not change; any other sequence is split afresh)."""
        if not isinstance(engines, tuple):
            return split_roles(engines)
        cached = self._pools.get(model)
        if cached is None or cached[0] is not engines:
            cached = self._pools[model] = (engines, split_roles(engines))
        return cached[1]

    async def plan(
        self,
        request: RouteRequest,
        body: bytes,
        engines: Sequence[EngineRecord],
        call_prefill: PrefillCall,
    ) -> PdPlan | None:
        """Run the prefill leg and plan the decode leg; None when the model has no
        prefill/decode pair (route as usual).

        An unreachable prefill engine passes the leg to the next one; any other failure
        sends the client's request to decode as is (it prefills itself). Client errors
        (400s) are raised: the decode engine would refuse the same request.
        """
        pools = self._pools_of(request.model, engines)
        if not pools.disaggregated:
            return None
        decode = [*failover_order(self.router, request, pools.decode), *pools.both]
        leg = prefill_body(body)
        for engine in failover_order(self.router, request, pools.prefill):
            try:
                reply = await call_prefill(engine, leg)
            except (InvalidRequestError, ModelNotFoundError):
                raise
            except SageError as exc:
                log.warning(
                    "prefill leg failed, decoding with a local prefill",
                    extra={"engine_id": engine.engine_id, "error": str(exc)},
                )
                if isinstance(exc, EngineUnreachableError):
                    continue
                break
            params = kv_params_of(reply)
            if params is None:
                self.requests.labels(request.model, "no_kv_params").inc()
                return PdPlan(body, decode, engine, None)
            self.requests.labels(request.model, "kv_transfer").inc()
            return PdPlan(decode_body(body, params), decode, engine, params)
        self.requests.labels(request.model, "prefill_failed").inc()
        return PdPlan(body, decode, None, None)
