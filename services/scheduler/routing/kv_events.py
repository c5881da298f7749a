"""kv_events: route to the engine that holds the longest cached prefix, as its KV-cache
events say (llm-d's precise-prefix-cache scorer, in Python).

Lifecycle starts vLLM engines with a ZMQ KV-event publisher and registers its endpoint in
the engine's `kv_events_endpoint` label (an ipc:// socket under the stack's 0700 state dir
for a local engine). This router subscribes to every ready engine that has one and keeps a
KvBlockIndex (kv_index.py) of who holds which blocks.

A request's token ids are computed here when the scheduler can read the model's tokenizer
files (local_tokenizer.py: tokenizer.json and the chat template, applied as vLLM applies
them, as llm-d's precise prefix-cache scorer does in its router; found by the engine's model
id, a folder or a cached hub id, or its `tokenizer` label), else by POST /tokenize on
one of the model's publishing engines (vLLM's own tokenizer and chat template: a model on
another host, or a request the local copy does not cover). The first prompt of each kind
(chat, completion) per model is tokenized both ways; a local copy that disagrees with the
engine is not used again for that kind. Either way only while some engine of the model holds
blocks at all; a completion whose prompt is already token ids needs neither.
`sage:kv_tokenize_seconds{path}` says which path each request took and what it cost (on 2
busy cores, 700-1,700-token chats: the engine call 7-11 ms, local 3-5 ms; bench/RESULTS.md).

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
from .local_tokenizer import LocalTokenizers
from .prefix_aware import PrefixAwareRouter

log = logging.getLogger("sage.scheduler.kv_events")

# The label lifecycle sets to an engine's KV-event publisher (a ZMQ endpoint to connect to).
KV_EVENTS_LABEL = "kv_events_endpoint"
# Where the engine's tokenizer files are (a folder or hub id), when its model id does not say:
# an engine registered under a served name (vLLM's --served-model-name) or given --tokenizer.
TOKENIZER_LABEL = "tokenizer"
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
        tokenizers: LocalTokenizers | None = None,
    ) -> None:
        self.load = load or NoLoad()
        self.load_margin = load_margin
        self.tokenize_timeout_s = tokenize_timeout_s
        self.reconcile_interval_s = reconcile_interval_s
        self.index = KvBlockIndex()
        self.fallback = PrefixAwareRouter(self.load, load_margin=load_margin)
        self.decisions: Counter[str] = Counter()  # kv_hit, load_guard, fallback
        # annotate() calls that looked for the prompt's token ids, and their time, by the
        # path that gave them: local (our copy of the tokenizer), engine (/tokenize), none
        self.tokenize_calls: Counter[str] = Counter()
        self.tokenize_seconds: dict[str, float] = {}
        self.tokenizers = tokenizers if tokenizers is not None else LocalTokenizers()
        self.local_mismatches = 0  # local copies found to disagree with their engine
        self._local_checked: set[tuple[str, str]] = set()  # (model, chat|prompt) agreed
        self._local_off: set[tuple[str, str]] = set()  # (model, kind) that disagreed
        self._subscriptions: dict[str, _Subscription] = {}
        self._context: zmq.asyncio.Context | None = None
        self._http: Http1Pool | None = None
        self._reconciler: asyncio.Task[None] | None = None
        self._turn = itertools.count()
        self._preloads: set[asyncio.Future[Any]] = set()

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
        tokens, path = await self._token_ids(doc, holders)
        spent = time.perf_counter() - begun
        self.tokenize_seconds[path] = self.tokenize_seconds.get(path, 0.0) + spent
        self.tokenize_calls[path] += 1
        return replace(request, token_ids=tuple(tokens)) if tokens else request

    async def _token_ids(
        self, doc: dict[str, Any], engines: Sequence[EngineRecord]
    ) -> tuple[list[int], str]:
        """The prompt's token ids and where they came from (local, engine, ids, none)."""
        if doc.get("cache_salt") is not None:
            return [], "none"  # salted blocks are not indexed (kv_index.py)
        prompt = doc.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
            prompt = prompt[0]  # a batch: route by its first prompt, as prefix_aware does
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return prompt, "ids"
        special = doc.get("add_special_tokens", True) is not False  # vLLM's completion default
        if isinstance(doc.get("messages"), list):
            kind = "chat"
            body: dict[str, Any] = {k: doc[k] for k in _CHAT_FIELDS if k in doc}
        elif isinstance(prompt, str):
            kind = "prompt"
            body = {"prompt": prompt, "add_special_tokens": special}
        else:
            return [], "none"
        model = engines[0].labels.get(TOKENIZER_LABEL) or engines[0].model
        local = await self._local_ids(model, kind, doc, prompt, special)
        if local is not None and (model, kind) in self._local_checked:
            return local, "local"
        remote = await self._engine_ids(body, engines)
        if local is not None and remote:
            self._check_local(model, kind, local, remote)
        if remote:
            return remote, "engine"
        return (local, "local") if local else ([], "none")

    async def _local_ids(
        self, model: str, kind: str, doc: dict[str, Any], prompt: Any, special: bool
    ) -> list[int] | None:
        """The token ids by the scheduler's copy of `model`'s tokenizer; None when it has
        none, the copy disagreed with the engine before, or does not cover this request."""
        if (model, kind) in self._local_off:
            return None
        tokenizer = await self.tokenizers.get(model)
        if tokenizer is None:
            return None
        if kind == "prompt":
            return await self.tokenizers.encode(tokenizer, str(prompt), special)
        try:
            text = tokenizer.render_chat(doc)
        except Exception:  # the template refused the chat: the engine answers for it
            return None
        if text is None:
            return None
        return await self.tokenizers.encode(tokenizer, text, False)

    def _check_local(self, model: str, kind: str, local: list[int], remote: list[int]) -> None:
        if local == remote:
            self._local_checked.add((model, kind))
            log.info("local tokenizer agrees with the engine", extra={"model": model, "kind": kind})
            return
        self._local_off.add((model, kind))
        self.local_mismatches += 1
        at = next((i for i, (a, b) in enumerate(zip(local, remote, strict=False)) if a != b), None)
        log.warning(
            "local tokenizer disagrees with the engine; the engine tokenizes this kind",
            extra={
                "model": model,
                "kind": kind,
                "local_tokens": len(local),
                "engine_tokens": len(remote),
                "first_difference": at if at is not None else min(len(local), len(remote)),
            },
        )

    async def _engine_ids(self, body: dict[str, Any], engines: Sequence[EngineRecord]) -> list[int]:
        """POST /tokenize `body` to one of `engines` (in turn); [] when it fails."""
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
                self._preload(engine.labels.get(TOKENIZER_LABEL) or engine.model)
                log.info(
                    "subscribed to kv events", extra={"engine_id": engine_id, "endpoint": endpoint}
                )

    def _preload(self, model: str) -> None:
        """Load `model`'s local tokenizer now, so its first routed request does not wait."""
        loading = asyncio.ensure_future(self.tokenizers.get(model))
        self._preloads.add(loading)
        loading.add_done_callback(self._preloads.discard)

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
        for loading in list(self._preloads):
            loading.cancel()
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
        self.tokenizers.close()

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
            "Time finding a prompt's token ids for kv_events routing, by path: local (the "
            "scheduler's copy of the model's tokenizer), engine (its /tokenize), ids (given as "
            "token ids), none (not found).",
            labels=["path"],
        )
        for path in sorted(self.tokenize_calls):
            tokenized.add_metric((path,), self.tokenize_calls[path], self.tokenize_seconds[path])
        yield tokenized
        yield CounterMetricFamily(
            "sage:kv_local_tokenizer_mismatches",
            "Models (per chat / completion) whose local tokenizer gave other token ids than "
            "their engine's /tokenize: the engine tokenizes those since.",
            value=float(self.local_mismatches),
        )
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
