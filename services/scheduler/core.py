"""The scheduler's request path: resolve engines → route → execute, with failover.

Protobuf stays in server.py; this module works on bytes and dataclasses so it is
unit-tested without gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

import orjson

from sage.common.exceptions import (
    ModelNotFoundError,
    NotFoundError,
    SageError,
    ServiceUnavailableError,
    UpstreamError,
)
from sage.common.limits import check_embedding_tokens

from .adapters import AdapterPlacer
from .admission import AdmissionController
from .breaker import CircuitBreakers
from .executor import EngineDisconnectedError, EngineUnreachableError
from .load import EngineLoadTracker
from .metrics import SchedulerMetrics
from .policies import QueuedRequest
from .ratelimit import TenantLimits, TenantRateLimiter
from .registry import EngineKind, EngineRecord, EngineRegistry, EngineState
from .resume import StreamResume
from .routing import Router, RouteRequest, failover_order, failover_view, prompt_prefix
from .routing.pd import PdRouter

log = logging.getLogger("sage.scheduler")


@dataclass(frozen=True)
class TokenUsage:
    """Token counts reported by the engine."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass(frozen=True)
class GenerateResult:
    """A non-streamed reply: the engine's raw JSON, who served it, and its token usage."""

    body: bytes
    engine: EngineRecord
    usage: TokenUsage


@dataclass(frozen=True)
class EmbedResult:
    """Vectors in input order (packed little-endian float32, sage.common.float32), plus usage
    and the engines that produced them."""

    vectors: list[bytes]
    usage: TokenUsage
    engine_ids: list[str]


class EmbeddingBackend(Protocol):
    """Where EMBEDDING requests go (the embedding service's batcher)."""

    async def embed_batch(
        self, model: str, inputs: Sequence[str], engines: Sequence[EngineRecord], dimensions: int
    ) -> EmbedResult:
        """Embed `inputs` on one of `engines`."""
        ...

    async def abort_engines(self, engines: Sequence[EngineRecord], reason: str) -> int:
        """Cut the batches under way to `engines` (lost with their node), so they go to
        another engine; how many were cut."""
        ...


class EngineExecutor(Protocol):
    """How the scheduler calls an engine (executor.HttpExecutionCoordinator over HTTP). A
    refused connection raises EngineUnreachableError and a dropped one
    EngineDisconnectedError (both may go to another engine); an engine's error reply raises
    the SageError it maps to."""

    async def post_json(self, engine: EngineRecord, path: str, body: bytes) -> bytes:
        """The engine's JSON reply to `body` POSTed at `path`."""
        ...

    def stream_sse(self, engine: EngineRecord, path: str, body: bytes) -> AsyncIterator[bytes]:
        """The engine's SSE `data:` payloads, up to and not including `[DONE]`."""
        ...

    def abort(self, engine: EngineRecord, reason: str) -> int:
        """Cut every call under way to `engine` as if its connection broke (each raises
        EngineDisconnectedError); how many were cut."""
        ...


@dataclass
class Counters:
    """Running totals for GetStatus."""

    in_flight: int = 0
    requests_total: int = 0
    requests_failed: int = 0


def usage_of(body: bytes) -> TokenUsage:
    """Usage from an OpenAI response body; zeros when absent or unparsable."""
    try:
        doc: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return TokenUsage()
    usage = doc.get("usage") if isinstance(doc, dict) else None
    if not isinstance(usage, dict):
        return TokenUsage()
    return TokenUsage(
        # input_/output_tokens: the Responses API's names for the same counts
        int(usage.get("prompt_tokens") or usage.get("input_tokens") or 0),
        int(usage.get("completion_tokens") or usage.get("output_tokens") or 0),
        int(usage.get("total_tokens") or 0),
    )


@contextlib.contextmanager
def _route_named(engine: EngineRecord, path: str) -> Iterator[None]:
    """An engine without the route `path` (a 404 that is not an OpenAI error about the
    model: a framework's "Not Found") becomes a NotFoundError naming the engine and path;
    any other error passes unchanged (a refused connection still fails over)."""
    try:
        yield
    except (EngineUnreachableError, EngineDisconnectedError):
        raise
    except UpstreamError as exc:
        # engine_error's words for a non-OpenAI 404
        if "returned HTTP 404" not in exc.message:
            raise
        raise NotFoundError(
            f"engine {engine.engine_id} ({engine.backend or 'unknown backend'}) "
            f"does not serve {path}"
        ) from None


def _engine_id(engine: EngineRecord) -> str:
    return engine.engine_id


_UNPARSED: Any = object()


class RequestBody:
    """A request's JSON bytes and, on first use, their parsed value: one parse per hop
    however many steps read it (prefix routing, stream resume, alias renaming)."""

    __slots__ = ("_doc", "raw")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._doc: Any = _UNPARSED

    def doc(self) -> Any:
        """The parsed value, shared: read it, never change it (None: not JSON)."""
        if self._doc is _UNPARSED:
            try:
                self._doc = orjson.loads(self.raw)
            except orjson.JSONDecodeError:
                self._doc = None
        return self._doc


_INT32_MAX = 2**31 - 1


def _count(value: Any, default: int) -> int:
    """A non-negative whole number from a body field, else `default` (bool is not one)."""
    return (
        value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default
    )


def estimate_tokens(parsed: RequestBody) -> int:
    """Tokens a generation request may use: ~4 body bytes per prompt token + max tokens x n.

    Made once, here, for every caller (the edge or a direct gRPC client): it is charged to
    the tenant's tokens-per-minute up front (corrected with the engine's reported usage
    once a non-streamed reply is back) and is the request's cost for fair queueing.
    """
    doc = parsed.doc()
    fields = doc if isinstance(doc, dict) else {}
    limit = (
        _count(fields.get("max_completion_tokens"), 0)
        or _count(fields.get("max_tokens"), 0)
        or _count(fields.get("max_output_tokens"), 0)  # the Responses API's
    )
    return min(_INT32_MAX, len(parsed.raw) // 4 + limit * max(1, _count(fields.get("n"), 1)))


def _for_engine(
    body: bytes, model: str, engine: EngineRecord, parsed: RequestBody | None = None
) -> bytes:
    """The body to send: unchanged unless the client used an alias of the engine's model
    (`parsed`: `body` already parsed, when it is)."""
    if model == engine.model or model in engine.adapters:  # vLLM routes an adapter by name
        return body
    doc = parsed.doc() if parsed is not None and parsed.raw is body else None
    if not isinstance(doc, dict):
        doc = orjson.loads(body)
        doc["model"] = engine.model
        return orjson.dumps(doc)
    return orjson.dumps({**doc, "model": engine.model})  # the shared value stays as it was


class _Next(Enum):
    """What a stream does after its engine failed."""

    RETRY = "retry"  # the next engine starts over, or continues what the client has
    DONE = "done"  # the client had the whole reply; only [DONE] was lost
    CLOSE = "close"  # the token budget is spent: a closing chunk ends the reply
    FAIL = "fail"  # the engine's error is the request's
    STRANDED = "stranded"  # output went out and no engine is left to continue it


class _StreamProgress:
    """One streamed request across its engine attempts: what the next engine is sent and
    how its payloads reach the client. Fresh until a payload goes out (a failure then
    starts over elsewhere), streaming after, resumed once another engine continues the
    reply (its payloads rewritten into the first stream's, see resume.py)."""

    __slots__ = (
        "begun",
        "body",
        "last",
        "model",
        "parsed",
        "path",
        "resume",
        "resumed",
        "ttft_s",
    )

    def __init__(
        self,
        path: str,
        model: str,
        body: bytes,
        parsed: RequestBody,
        resume: StreamResume | None,
        begun: float,
    ) -> None:
        self.path = path
        self.model = model  # as the client named it (maybe an alias)
        self.body = body  # as routed (a PD decode leg's, when there was one)
        self.parsed = parsed  # the client's body
        self.resume = resume  # None: the reply cannot be continued once it has begun
        self.resumed = False
        self.begun = begun
        self.ttft_s: float | None = None  # set when the first payload goes out
        self.last = b""  # the last payload the client was sent

    @property
    def started(self) -> bool:
        """Whether the client has been sent anything."""
        return self.ttft_s is not None

    def request(self, engine: EngineRecord) -> tuple[str, bytes]:
        """The path and body for `engine`: the request, or the rest of the reply."""
        resume = self.resume
        if self.resumed and resume is not None:
            leg, sent = resume.continuation(engine)
            return leg, _for_engine(sent, self.model, engine)
        sent = _for_engine(self.body, self.model, engine, self.parsed)
        if resume is not None:  # token ids, to resume exactly if need be
            sent = resume.asking_ids(sent, engine)
        return self.path, sent

    def to_client(self, payload: bytes) -> bytes | None:
        """An engine's payload as the client is to see it (None: not sent)."""
        resume = self.resume
        if resume is not None:
            if self.resumed:
                rewritten = resume.rewrite(payload)
                if rewritten is None:
                    return None
                payload = rewritten
            else:
                payload = resume.absorb(payload)
        if self.ttft_s is None:
            self.ttft_s = time.monotonic() - self.begun
        self.last = payload
        return payload

    def after_failure(self, last_try: bool) -> _Next:
        """The next step once the current engine failed (`last_try`: no engine is left)."""
        if not self.started:
            return _Next.FAIL if last_try else _Next.RETRY
        resume = self.resume
        if resume is None:
            return _Next.FAIL
        if resume.finished:
            return _Next.DONE
        if resume.exhausted:
            return _Next.CLOSE
        if last_try:
            return _Next.STRANDED
        self.resumed = True
        return _Next.RETRY

    def closing_chunk(self) -> bytes:
        """The chunk that ends a reply whose token budget ran out mid-stream."""
        assert self.resume is not None  # CLOSE comes only from a tracked reply
        self.last = self.resume.closing_chunk()
        return self.last


class Scheduler:
    """Routes chat, completion and embedding requests to ready engines."""

    def __init__(
        self,
        registry: EngineRegistry,
        router: Router,
        executor: EngineExecutor,
        embedding_backend: EmbeddingBackend | None = None,
        rate_limiter: TenantRateLimiter | None = None,
        admission: AdmissionController | None = None,
        load: EngineLoadTracker | None = None,
        breakers: CircuitBreakers | None = None,
        metrics: SchedulerMetrics | None = None,
        embedding_max_tokens: int = 0,
        adapters: AdapterPlacer | None = None,
    ) -> None:
        self.registry = registry
        self.router = router
        self.load = load or EngineLoadTracker()  # the router's LoadView should be this one
        self.executor = executor
        self.embedding_backend = embedding_backend
        self.rate_limiter = rate_limiter or TenantRateLimiter()
        self.admission = admission or AdmissionController()
        self.counters = Counters()
        self.breakers = breakers or CircuitBreakers()
        self.metrics = metrics or SchedulerMetrics(breakers=self.breakers)
        if self.metrics.in_flight is None:
            self.metrics.in_flight = self.load.in_flight_by_engine
        if self.metrics.loads is None:
            self.metrics.loads = self.load.loads
        if self.metrics.capacities is None:
            self.metrics.capacities = self._capacities
        self.pd = PdRouter(self.router, self.metrics.registry)  # prefill/decode pairs
        # model → (the registry tuple last routed over, its engines by id), for _any_full.
        self._members: dict[str, tuple[Sequence[EngineRecord], dict[str, EngineRecord]]] = {}
        # Most tokens one embedding request may carry (0: no cap); see sage.common.limits.
        self.embedding_max_tokens = embedding_max_tokens
        # Loads a LoRA adapter no ready engine has when a request names it (None: never).
        self.adapters = adapters
        self._background: set[asyncio.Task[None]] = set()  # embedding aborts under way

    async def _ready_llm(self, model: str) -> Sequence[EngineRecord]:
        """Ready chat engines for `model`; a LoRA adapter no engine has loaded is loaded
        first (bounded, see adapters.py). Called once the plain lookup failed."""
        if self.adapters is None or self.registry.adapter(model) is None:
            return self.registry.ready_for(model, EngineKind.LLM)
        return await self.adapters.engines_for(model)

    def _capacities(self) -> dict[str, int]:
        """Every ready chat engine's admission cap (0: uncapped)."""
        return {
            e.engine_id: self.admission.engine_capacity(e) if self.admission.limited else 0
            for e in self.registry.engines()
            if e.kind is EngineKind.LLM and e.state is EngineState.READY
        }

    def engines_lost(self, engines: Sequence[EngineRecord], reason: str) -> int:
        """`engines` went with their node (NodeTable.on_lost): cut the calls under way to
        them as if their connections broke, so each fails over or resumes on another engine
        now instead of waiting out the request timeout on a host that may never answer.
        Returns how many calls were cut."""
        cut = sum(self.executor.abort(engine, reason) for engine in engines)
        if cut:
            log.warning(
                "cut %d engine calls under way to a lost node's engines (%s); they fail over",
                cut,
                ", ".join(e.engine_id for e in engines),
                extra={"reason": reason},
            )
        embedders = [e for e in engines if e.kind is EngineKind.EMBEDDING]
        if embedders and self.embedding_backend is not None:
            # The embedding service calls those engines itself (it batches for them).
            task = asyncio.get_running_loop().create_task(self._abort_batches(embedders, reason))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return cut

    async def _abort_batches(self, engines: Sequence[EngineRecord], reason: str) -> None:
        assert self.embedding_backend is not None
        try:
            cut = await self.embedding_backend.abort_engines(engines, reason)
        except SageError as exc:  # an older or unreachable service: its batches time out
            log.warning(
                "could not cut the embedding batches to a lost node's engines",
                extra={"error": str(exc), "reason": reason},
            )
            return
        if cut:
            log.warning(
                "cut %d embedding batches under way to a lost node's engines (%s)",
                cut,
                ", ".join(e.engine_id for e in engines),
                extra={"reason": reason},
            )

    def _left_routing(self, engine: EngineRecord) -> bool:
        """Whether `engine` is no longer a ready engine: its node was lost (its calls were
        just cut, and a new connection to a host cut off waits out the connect timeout) or
        it was drained since the request was routed. Asked only when failing over."""
        try:
            ready = self.registry.ready_for(engine.model, engine.kind)
        except SageError:
            return True
        return all(e.engine_id != engine.engine_id for e in ready)

    async def wait_idle(self, engine_id: str, timeout_s: float) -> int:
        """Wait until nothing this scheduler routed to `engine_id` is in flight (at most
        `timeout_s`); returns how many still are. A request counts from the moment it is
        routed, before the engine has seen it: the engine's own gauges miss those, and a
        drain that trusted only them would stop an engine with requests on their way."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:  # polled: the tracker is a plain counter, updated around engine calls
            left = self.load.in_flight(engine_id)
            if not left or time.monotonic() >= deadline:
                return left
            await asyncio.sleep(0.05)

    def _admit(self, limits: TenantLimits | None, tokens: int) -> int:
        """Charge the tenant's buckets (RateLimitError when over); returns tokens charged."""
        if limits is None or not limits.limited:
            return 0
        self.rate_limiter.admit(limits, tokens)
        return tokens

    async def _route(
        self, model: str, path: str, parsed: RequestBody, session_key: str, cost: float
    ) -> tuple[bytes, Sequence[EngineRecord]]:
        """The body to send and the engines to try: for a model with prefill and decode
        engines, the prefill leg runs here first (routing/pd.py); else the routed engine,
        then the others for failover."""
        # Engines whose circuit breaker is open are left out (see breaker.py).
        engines = self.breakers.routable(self.registry.ready_for(model, EngineKind.LLM), _engine_id)
        # Only prefix-aware routers need the body parsed.
        prefix = prompt_prefix(parsed.doc()) if self.router.needs_prefix else ""

        async def prefill(engine: EngineRecord, leg: bytes) -> bytes:
            if not self.breakers.begin(engine.engine_id):
                raise EngineUnreachableError(f"engine {engine.engine_id}: circuit open")
            with self.load.track(engine.engine_id), self.breakers.guard(engine.engine_id):
                return await self.executor.post_json(engine, path, _for_engine(leg, model, engine))

        route = RouteRequest(model, session_key, prefix, cost)
        # A router needing I/O before it picks (base.Annotating: kv_events' token ids).
        annotate = getattr(self.router, "annotate", None)
        if annotate is not None and engines:
            route = await annotate(route, parsed.doc(), engines)
        plan = await self.pd.plan(route, parsed.raw, engines, prefill)
        if plan is None:
            return parsed.raw, self._with_room_first(route, engines)
        return plan.body, plan.candidates

    def _any_full(self, model: str, engines: Sequence[EngineRecord]) -> bool | None:
        """Whether one of `engines` is at its in-flight cap, looking only at the engines
        with requests in flight (an idle engine has room: every cap is at least 1), so the
        cost follows the requests in flight, not the engines registered. None when
        `engines` is not a registry tuple (a breaker-filtered list): the caller scans."""
        if not isinstance(engines, tuple):
            return None
        cached = self._members.get(model)
        if cached is None or cached[0] is not engines:
            cached = self._members[model] = (engines, {e.engine_id: e for e in engines})
        members = cached[1]
        capacity = self.admission.engine_capacity
        for engine_id, count in self.load.busy().items():
            engine = members.get(engine_id)
            if engine is not None and count >= capacity(engine):
                return True
        return False

    def _with_room_first(
        self, route: RouteRequest, engines: Sequence[EngineRecord]
    ) -> Sequence[EngineRecord]:
        """The router's order, among engines below their in-flight cap first: admission
        let the request in because the model has a free slot, so it must not wait on a
        busy engine while another has room. Full engines stay as failover candidates."""
        if not self.admission.limited or len(engines) < 2:
            return failover_view(self.router, route, engines)
        if self._any_full(route.model, engines) is False:
            return failover_view(self.router, route, engines)  # every engine has room
        room = [
            e
            for e in engines
            if self.load.in_flight(e.engine_id) < self.admission.engine_capacity(e)
        ]
        if not room or len(room) == len(engines):
            return failover_order(self.router, route, engines)
        ordered = failover_order(self.router, route, room)
        first = {e.engine_id for e in ordered}
        return ordered + [e for e in engines if e.engine_id not in first]

    async def generate(
        self,
        model: str,
        body: bytes,
        path: str,
        limits: TenantLimits | None = None,
        ticket: QueuedRequest | None = None,
        session_key: str = "",
    ) -> GenerateResult:
        """Run one chat or completion (`path` says which), not streamed, to its reply; fails
        over while engines refuse connections."""
        parsed = RequestBody(body)
        estimate = estimate_tokens(parsed)
        charged = self._admit(limits, estimate)
        self.counters.requests_total += 1
        self.counters.in_flight += 1
        ticket = ticket or QueuedRequest(model=model)
        ticket.cost = float(estimate)
        begun = time.monotonic()
        try:
            try:
                engines: Sequence[EngineRecord] = self.registry.ready_for(model, EngineKind.LLM)
            except ModelNotFoundError:
                engines = await self._ready_llm(model)
            ticket.model = engines[0].model  # an alias shares its model's lane and windows
            # Capacity counts only engines routing may use (an open breaker's are not).
            async with self.admission.slot(ticket, self.breakers.routable(engines, _engine_id)):
                body, candidates = await self._route(model, path, parsed, session_key, ticket.cost)
                for i, engine in enumerate(candidates):
                    last_try = i == len(candidates) - 1
                    if i and not last_try and self._left_routing(engine):
                        continue  # failing over: not to an engine lost (or drained) meanwhile
                    if not self.breakers.begin(engine.engine_id, force=last_try):
                        continue
                    try:
                        with (
                            self.load.track(engine.engine_id),
                            self.breakers.guard(engine.engine_id),
                            _route_named(engine, path),
                        ):
                            reply = await self.executor.post_json(
                                engine, path, _for_engine(body, model, engine, parsed)
                            )
                        usage = usage_of(reply)
                        if charged and limits is not None:
                            self.rate_limiter.settle(limits, charged, usage.total_tokens)
                        self.admission.finished(ticket, usage.total_tokens)
                        self.metrics.observe(
                            ticket,
                            engine.engine_id,
                            time.monotonic() - begun,
                            completion_tokens=usage.completion_tokens,
                        )
                        return GenerateResult(reply, engine, usage)
                    except (EngineUnreachableError, EngineDisconnectedError) as exc:
                        # Nothing reached the client yet, so the whole request can go again.
                        if i == len(candidates) - 1:
                            raise
                        self.metrics.failover("unary")
                        log.warning(
                            "engine unreachable, failing over"
                            if isinstance(exc, EngineUnreachableError)
                            else "engine dropped the connection, failing over",
                            extra={"engine_id": engine.engine_id, "error": str(exc)},
                        )
                raise AssertionError("unreachable")  # candidates is never empty
        except BaseException:
            self.counters.requests_failed += 1
            self.metrics.failed()
            raise
        finally:
            self.counters.in_flight -= 1

    async def engine_call(
        self,
        model: str,
        path: str,
        body: bytes,
        limits: TenantLimits | None = None,
        kind: EngineKind = EngineKind.LLM,
    ) -> GenerateResult:
        """POST `body` to `path` on a ready engine of `model` of `kind` (chat engines for
        /tokenize and /detokenize, embedding engines, where cross-encoders are served, for
        /rerank and /score): a quick call that generates nothing, so it skips the queue and
        the latency stats, fails over while engines refuse connections, and an engine without
        the route (a 404 that is not about the model) is a NotFoundError naming both."""
        self._admit(limits, len(body) // 4 + 1)
        try:
            engines: Sequence[EngineRecord] = self.registry.ready_for(model, kind)
        except ModelNotFoundError:
            if kind is not EngineKind.LLM:
                raise
            engines = await self._ready_llm(model)
        candidates = self.breakers.routable(engines, _engine_id) or engines
        for i, engine in enumerate(candidates):
            try:
                with self.load.track(engine.engine_id), _route_named(engine, path):
                    reply = await self.executor.post_json(
                        engine, path, _for_engine(body, model, engine)
                    )
                return GenerateResult(reply, engine, TokenUsage())
            except (EngineUnreachableError, EngineDisconnectedError):
                if i == len(candidates) - 1:
                    raise
                self.metrics.failover("unary")
        raise AssertionError("unreachable")  # ready_for never returns an empty list

    async def generate_stream(
        self,
        model: str,
        body: bytes,
        path: str,
        limits: TenantLimits | None = None,
        ticket: QueuedRequest | None = None,
        session_key: str = "",
    ) -> AsyncIterator[tuple[bytes, EngineRecord]]:
        """Run one streamed chat or completion: its engine SSE payloads one by one, failing
        over to another engine when one is unreachable, or dies mid-stream (then the next
        continues the text already sent)."""
        # What the client saw is tracked from its own body, not a PD decode leg's
        # (the leg's KV params are single-use).
        parsed = RequestBody(body)
        estimate = estimate_tokens(parsed)
        charged = self._admit(limits, estimate)
        self.counters.requests_total += 1
        self.counters.in_flight += 1
        ticket = ticket or QueuedRequest(model=model)
        ticket.cost = float(estimate)
        begun = time.monotonic()
        try:
            try:
                engines: Sequence[EngineRecord] = self.registry.ready_for(model, EngineKind.LLM)
            except ModelNotFoundError:
                engines = await self._ready_llm(model)
            ticket.model = engines[0].model  # an alias shares its model's lane and windows
            # Capacity counts only engines routing may use (an open breaker's are not).
            async with self.admission.slot(ticket, self.breakers.routable(engines, _engine_id)):
                resume = StreamResume.for_document(path, parsed.doc())
                body, candidates = await self._route(model, path, parsed, session_key, ticket.cost)
                progress = _StreamProgress(path, model, body, parsed, resume, begun)
                clean = False
                for i, engine in enumerate(candidates):  # one attempt per engine
                    last_try = i == len(candidates) - 1
                    if i and not last_try and self._left_routing(engine):
                        continue  # failing over: not to an engine lost (or drained) meanwhile
                    if not self.breakers.begin(engine.engine_id, force=last_try):
                        continue
                    leg, sent = progress.request(engine)
                    produced = False
                    try:
                        with (
                            self.load.track(engine.engine_id),
                            self.breakers.guard(engine.engine_id) as call,
                            _route_named(engine, leg),
                        ):
                            async for payload in self.executor.stream_sse(engine, leg, sent):
                                if not produced:
                                    produced = True
                                    call.succeeded()  # failing before the first byte counts
                                out = progress.to_client(payload)
                                if out is not None:
                                    yield out, engine
                        clean = True
                        break
                    except (EngineUnreachableError, EngineDisconnectedError) as exc:
                        if produced:
                            # The guard settled at the first byte; the break is still a fault.
                            self.breakers.record_exception(engine.engine_id, exc)
                        mid_stream = progress.started
                        step = progress.after_failure(last_try)
                        if step is _Next.FAIL:
                            raise
                        if step is _Next.STRANDED:
                            raise UpstreamError(
                                f"engine {engine.engine_id} failed mid-stream and no other "
                                f"ready engine of model {model!r} is left to continue it"
                            ) from exc
                        if step is _Next.DONE:
                            break
                        if step is _Next.CLOSE:
                            yield progress.closing_chunk(), engine
                            break
                        self.metrics.failover("stream" if mid_stream else "stream_start")
                        log.warning(
                            "engine failed mid-stream, continuing on another"
                            if mid_stream
                            else "engine unreachable, failing over"
                            if isinstance(exc, EngineUnreachableError)
                            else "engine dropped the connection, failing over",
                            extra={
                                "engine_id": engine.engine_id,
                                "error": str(exc),
                                "resumed_tokens": resume.produced if resume else 0,
                            },
                        )
                self.admission.finished(ticket, charged or ticket.cost)
                last = progress.last
                self.metrics.observe(
                    ticket,
                    engine.engine_id,
                    time.monotonic() - begun,
                    ttft_s=progress.ttft_s,
                    completion_tokens=usage_of(last).completion_tokens if clean and last else 0,
                )
        except BaseException:
            self.counters.requests_failed += 1
            self.metrics.failed()
            raise
        finally:
            self.counters.in_flight -= 1

    async def embed(
        self,
        model: str,
        inputs: Sequence[str],
        dimensions: int,
        limits: TenantLimits | None = None,
    ) -> EmbedResult:
        """Send an embedding request to the embedding backend with this model's engines;
        a request over the token cap is refused before it is charged or sent on."""
        tokens = check_embedding_tokens(inputs, self.embedding_max_tokens)
        charged = self._admit(limits, tokens + 1)
        self.counters.requests_total += 1
        self.counters.in_flight += 1
        try:
            engines = self.registry.ready_for(model, EngineKind.EMBEDDING)
            if self.embedding_backend is None:
                raise ServiceUnavailableError("the embedding service is not configured")
            result = await self.embedding_backend.embed_batch(model, inputs, engines, dimensions)
            if charged and limits is not None:
                self.rate_limiter.settle(limits, charged, result.usage.total_tokens)
            return result
        except BaseException:
            self.counters.requests_failed += 1
            raise
        finally:
            self.counters.in_flight -= 1
