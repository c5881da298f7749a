"""HTTP front of the simulator engine (a testing/benchmarking tool for the control plane).

It answers vLLM's OpenAI routes in vLLM's exact JSON and SSE shapes (errors included:
vLLM's `ErrorResponse`, see `vllm_error_body`) and exports vLLM's `/metrics` names and
labels, so the scheduler, the edge and benchmarks can run against it as if it were vLLM.
Latency comes from a continuous-batching model (see `_SimEngine._steps`).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import contextlib
import importlib.util
import logging
import os
import secrets
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from types import FrameType
from typing import Any, TypeVar
from urllib.parse import parse_qs

import msgspec
import orjson
import uvicorn
from prometheus_client import Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from sage.common.exceptions import (
    ConfigurationError,
    InternalError,
    InvalidRequestError,
    ModelNotFoundError,
    NotFoundError,
    SageError,
)
from sage.common.http.asgi import (
    App,
    ClientDisconnected,
    Handler,
    JSONResponse,
    Request,
    Response,
    StreamingResponse,
    sse_event,
)
from sage.common.utils.logging import configure_logging
from sage.engines.auth import add_api_key_argument, protect, resolve_api_key
from sage.engines.sim import anthropic
from sage.engines.sim.kv import (
    KV_LOAD_FAILURE_POLICIES,
    KV_ROLES,
    BlockStore,
    KvTransferRequest,
    PullOutcome,
    SharedStorage,
    SideChannel,
    parse_kv_transfer_params,
    prefill_reply_params,
    pull_blocks,
)
from sage.engines.sim.kv_publisher import KvEventPublisher
from sage.engines.sim.lora import SimLora
from sage.engines.sim.model import (
    OWNED_BY,
    AdmissionQueue,
    Generation,
    SimConfig,
    chat_prompt_text,
    count_tokens,
    detokenize,
    embedding_vector,
    generate_ids,
    pair_score,
    tokenize,
)
from sage.engines.sim.prefix_cache import PrefixCache
from sage.engines.sim.sglang import FLAVORS, sglang_registry
from sage.engines.vllm_metrics import VllmRequestMetrics
from sage.protocol.openai import (
    EngineChatCompletionRequest,
    EngineCompletionRequest,
    EngineResponsesRequest,
    EngineTokenizeRequest,
    ProtocolError,
    convert,
)

__all__ = ["create_app", "main", "vllm_error_body"]

log = logging.getLogger(__name__)


_DONE = b"data: [DONE]\n\n"
_CLIENT_GONE = 499  # nginx's "client closed request"; nobody reads it, the socket is gone
# The `type` vLLM's create_error_response gives each status; others get the status phrase,
# as vLLM's HTTPException handler does.
_ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    422: "UnprocessableEntityError",
    500: "InternalServerError",
    501: "NotImplementedError",
    503: "ServiceUnavailableError",
}
_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")
_VOCAB_SIZE = 2**31  # token ids the sim's tokenizer can give (model.tokenize)
# vLLM sends "vllm-<version>-<hash>"; the sim names itself.
_FINGERPRINT = f"{OWNED_BY}-fingerprint"


# vLLM's AuthenticationMiddleware answers a missing or wrong key with this, not an
# ErrorResponse (vllm/entrypoints/serve/middleware/authenticate.py).
VLLM_UNAUTHORIZED: dict[str, object] = {"error": "Unauthorized"}


class RequestSchemaError(InvalidRequestError):
    """A body that fails vLLM's pydantic request model (a missing or mistyped field), which
    vLLM's validation handler answers with type "Bad Request" and param "body.<field>",
    unlike the checks its serving code makes (type "BadRequestError", bare param)."""

    def __init__(self, field: str, kind: str, msg: str) -> None:
        loc = f"body.{field}"
        super().__init__(
            f"1 validation error:\n  {{'type': '{kind}', 'loc': '{loc}', 'msg': '{msg}'}}",
            param=loc,
        )


def vllm_error_body(
    message: str, status: int, param: str | None = None, kind: str | None = None
) -> dict[str, Any]:
    """vLLM's `ErrorResponse` (vllm/entrypoints/serve/engine/protocol.py): `code` is the
    HTTP status as an int and `type` names the error class (`BadRequestError`, ...), where
    OpenAI's API says `invalid_request_error` and a string code."""
    kind = kind or _ERROR_TYPES.get(status) or HTTPStatus(status).phrase
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _error_response(exc: SageError) -> Response:
    headers = []
    if exc.retry_after is not None:
        headers.append((b"retry-after", str(max(1, round(exc.retry_after))).encode()))
    # pydantic's errors get the status phrase as type (vLLM's validation_exception_handler)
    kind = HTTPStatus(exc.http_status).phrase if isinstance(exc, RequestSchemaError) else None
    body = vllm_error_body(exc.message, exc.http_status, exc.param, kind)
    return JSONResponse(body, exc.http_status, headers)


def _vllm_errors(handler: Handler) -> Handler:
    """`handler`, answering its errors with vLLM's error body instead of OpenAI's."""

    async def handle(request: Request) -> Response | StreamingResponse:
        try:
            return await handler(request)
        except SageError as exc:
            return _error_response(exc)
        except ClientDisconnected:
            raise
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            return JSONResponse(vllm_error_body("Internal server error", 500), 500)

    return handle


def _detail(status: int) -> Handler:
    """FastAPI's own answer, which vLLM gives for an unknown route (404) or method (405)."""
    body = orjson.dumps({"detail": HTTPStatus(status).phrase})

    async def handle(request: Request) -> Response:
        return Response(body, status, b"application/json")

    return handle


def _usage_details(job: _Job) -> dict[str, Any]:
    return {**job.usage(), "prompt_tokens_details": None, "completion_tokens_details": None}


def _transfer_fields(kv_params: dict[str, Any] | None) -> dict[str, Any]:
    """vLLM's trailing reply fields: the KV and encoder-cache transfer params (null unless
    this engine hands KV to a decoder) and per-request metrics (null)."""
    return {
        "kv_transfer_params": kv_params,
        "ec_transfer_params": None,
        "metrics": None,
    }


def _role_chunk(head: dict[str, Any], prompt_ids: list[int] | None = None) -> bytes:
    """vLLM's first chat stream event: the assistant role with empty content (and the
    prompt's token ids, when asked for with return_token_ids)."""
    return sse_event(
        orjson.dumps(
            {
                **head,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
                "prompt_token_ids": prompt_ids,
                "prompt_text": None,
            }
        )
    )


class _KvLoadFailedError(InternalError):
    """Remote KV could not be loaded and the policy is vLLM's default, fail."""


class _Metrics(VllmRequestMetrics):
    """vLLM's metric names on a registry private to one app, so apps can share a process."""

    def __init__(
        self, config: SimConfig, queue: AdmissionQueue, store: BlockStore, engine_id: str
    ) -> None:
        super().__init__(
            config.model,
            lambda: queue.running,
            lambda: queue.waiting,
            running_help="Requests in the running batch.",
            waiting_help="Requests waiting for a batch slot.",
            queue_help="Time spent waiting for a batch slot.",
            finish_reasons=("stop", "length"),
        )
        # No real KV cache: occupancy of the max_num_seqs slots stands in for it.
        self.gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage (simulated: slot occupancy).",
            lambda: queue.running / queue.capacity,
        )
        # PD serving: the KV exchange as each side sees it, so tests and dashboards can
        # tell a remote prefill from a local one.
        reg, label, values = self.registry, self.label, self.values
        self.gauge(
            "sage_sim:kv_blocks_held",
            "KV blocks a prefill engine holds for remote decoders.",
            lambda: store.held,
        )
        self.gauge(
            "sage_sim:kv_blocks_expired",
            "KV blocks freed because no decoder pulled them in time (cumulative).",
            lambda: store.expired_total,
        )
        self.gauge(
            "sage_sim:kv_blocks_pulled",
            "KV blocks remote decoders pulled from this engine (cumulative).",
            lambda: store.pulled_total,
        )
        Gauge(
            "sage_sim:engine_info",
            "This engine's PD role and KV engine id (always 1).",
            (*label, "role", "kv_role", "kv_engine_id"),
            registry=reg,
        ).labels(
            role=config.role, kv_role=KV_ROLES[config.role], kv_engine_id=engine_id, **values
        ).set(1)
        self.kv_params_sent = Counter(
            "sage_sim:kv_transfer_params_sent",
            "Prefill answers that returned kv_transfer_params for a remote decoder.",
            label,
            registry=reg,
        ).labels(**values)
        self.kv_params_received = Counter(
            "sage_sim:kv_transfer_params_received",
            "Decode requests with remote-prefill kv_transfer_params, by pull outcome; the "
            "prefill engine is named only when the pull succeeded.",
            (*label, "outcome", "remote_engine_id"),
            registry=reg,
        )
        # vLLM's names: prompt tokens a KV connector was asked for, and found elsewhere.
        self.external_queries = Counter(
            "vllm:external_prefix_cache_queries",
            "External prefix cache queries from KV connector cross-instance cache sharing, "
            "in terms of number of queried tokens.",
            label,
            registry=reg,
        ).labels(**values)
        self.external_hits = Counter(
            "vllm:external_prefix_cache_hits",
            "External prefix cache hits from KV connector cross-instance cache sharing, "
            "in terms of number of cached tokens.",
            label,
            registry=reg,
        ).labels(**values)
        self.kv_local_prefill = Counter(
            "sage_sim:kv_local_prefill_fallbacks",
            "Remote-prefill requests whose KV could not be loaded, so prefill ran locally "
            "(kv_load_failure_policy=recompute; vLLM's default, fail, ends them with an "
            "error instead).",
            label,
            registry=reg,
        ).labels(**values)


class _DisconnectWatch:
    """Notices the client going away; the task reading `receive` starts only when needed.

    The zero-latency path never waits, so it never pays for the task.
    """

    __slots__ = ("_request", "_task")

    def __init__(self, request: Request) -> None:
        self._request = request
        self._task: asyncio.Task[None] | None = None

    def task(self) -> asyncio.Task[None]:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())
        return self._task

    async def _watch(self) -> None:
        with contextlib.suppress(Exception):
            await self._request.wait_disconnect()

    @property
    def gone(self) -> bool:
        return self._task is not None and self._task.done()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


@dataclass(frozen=True, slots=True)
class _Job:
    """A validated generation request: one Generation per choice."""

    model: str
    prompt_tokens: int
    generations: tuple[Generation, ...]
    stream: bool
    include_usage: bool
    pooling: bool = False  # an embedding request: prefill only, no generated tokens
    # Seconds from admission to the first token; None = a local prefill (ttft_ms). A decode
    # whose KV came from a prefill engine pays only one decode step.
    first_token_s: float | None = None
    # Each prompt's token ids, when the request asked for them (vLLM's return_token_ids).
    prompt_ids: tuple[tuple[int, ...], ...] | None = None

    def prompt_token_ids(self, index: int) -> list[int] | None:
        """Prompt `index`'s token ids as vLLM returns them, or None when not asked for."""
        return None if self.prompt_ids is None else list(self.prompt_ids[index])

    def token_ids(self, generation: Generation, step: int | None = None) -> list[int] | None:
        """A generation's token ids (or only those of `step`), or None when not asked for."""
        if self.prompt_ids is None:
            return None
        if step is None:
            return list(generation.token_ids)
        return [generation.token_ids[step]]

    @property
    def steps(self) -> int:
        return max(g.completion_tokens for g in self.generations)

    @property
    def completion_tokens(self) -> int:
        return sum(g.completion_tokens for g in self.generations)

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "completion_tokens": self.completion_tokens,
        }


# -- request validation: every error names the field -------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_LAX_BOOLS = {
    **dict.fromkeys(("1", "on", "t", "true", "y", "yes"), True),
    **dict.fromkeys(("0", "off", "f", "false", "n", "no"), False),
}


async def _json_object(request: Request) -> dict[str, Any]:
    body = await request.json()
    if not isinstance(body, dict):
        raise InvalidRequestError("request body must be a JSON object")
    return body


# pydantic's error (type, message) for a value of the wrong type, by the type wanted and
# the type given (msgspec's names): what vLLM's request models answer.
_PYDANTIC_TYPE_ERRORS: dict[str, tuple[str, str]] = {
    "int/str": (
        "int_parsing",
        "Input should be a valid integer, unable to parse string as an integer",
    ),
    "int/float": (
        "int_from_float",
        "Input should be a valid integer, got a number with a fractional part",
    ),
    "int": ("int_type", "Input should be a valid integer"),
    "float/str": (
        "float_parsing",
        "Input should be a valid number, unable to parse string as a number",
    ),
    "float": ("float_type", "Input should be a valid number"),
    "bool/str": ("bool_parsing", "Input should be a valid boolean, unable to interpret input"),
    "bool/int": ("bool_parsing", "Input should be a valid boolean, unable to interpret input"),
    "bool/float": ("bool_parsing", "Input should be a valid boolean, unable to interpret input"),
    "bool": ("bool_type", "Input should be a valid boolean"),
    "array": ("list_type", "Input should be a valid list"),
    "str": ("string_type", "Input should be a valid string"),
    "object": ("dict_type", "Input should be a valid dictionary"),
}


def _as_vllm(exc: ProtocolError) -> InvalidRequestError:
    """A protocol error as vLLM words it: a missing or mistyped field fails its pydantic
    model ("Bad Request", param body.<field>); a bad value fails its serving code's checks
    (the bare field)."""
    problem = exc.problem
    field = problem.param.replace("[", ".").replace("]", "")
    if problem.kind == "missing":
        return RequestSchemaError(field, "missing", "Field required")
    if problem.kind == "type":
        wanted = next((t for t in problem.expected.split(" | ") if t != "null"), "")
        kind, msg = _PYDANTIC_TYPE_ERRORS.get(
            f"{wanted}/{problem.got}",
            _PYDANTIC_TYPE_ERRORS.get(wanted, ("value_error", exc.message)),
        )
        return RequestSchemaError(field, kind, msg)
    return exc


def _read(body: dict[str, Any], cls: type[_R]) -> _R:
    """`body` as vLLM's pydantic model reads it (lax: "5" is 5, "yes" is true), validated by
    the shared protocol models, with vLLM's errors."""
    lax = {
        k: _LAX_BOOLS.get(v.lower(), v) if isinstance(v, str) else v
        for k, v in body.items()
        if k in _BOOL_FIELDS
    }
    try:
        return convert({**body, **lax} if lax else body, cls, lax=True)
    except ProtocolError as exc:
        raise _as_vllm(exc) from None


_R = TypeVar(
    "_R",
    EngineChatCompletionRequest,
    EngineCompletionRequest,
    EngineTokenizeRequest,
    EngineResponsesRequest,
)
# Top-level booleans read with pydantic's words for true and false ("yes", "off", ...).
_BOOL_FIELDS = frozenset({"stream", "return_token_ids", "ignore_eos", "echo"})


def _sampling(req: EngineChatCompletionRequest | EngineCompletionRequest) -> None:
    """What the sim refuses beyond the protocol: more than one choice."""
    if req.n not in (None, 1):
        raise InvalidRequestError("the simulator supports only n=1", param="n")


def _token_ids(value: Any, nested: bool = False) -> bool:
    """Whether `value` is a token-id prompt. A negative id fails vLLM's request model (ids
    are `int >= 0`; its first error is the flat list's, item 0 for a nested prompt); one
    past the vocabulary fails its renderer's check."""
    if not isinstance(value, list) or not value or not all(_is_int(t) for t in value):
        return False
    if min(value) < 0:
        if nested:
            raise RequestSchemaError("prompt.0", "int_type", "Input should be a valid integer")
        at = next(i for i, t in enumerate(value) if t < 0)
        raise RequestSchemaError(
            f"prompt.{at}", "greater_than_equal", "Input should be greater than or equal to 0"
        )
    if max(value) >= _VOCAB_SIZE:
        raise InvalidRequestError(f"Token id {max(value)} is out of vocabulary")
    return True


def _completion_prompts(prompt: Any) -> list[tuple[int, ...]]:
    """The token ids of each prompt of a completions request: texts are tokenized, token-id
    prompts (a list of ids, or a list of such lists) are taken as they are, as vLLM does."""
    if prompt is None:
        raise InvalidRequestError("prompt is required", param="prompt")
    if isinstance(prompt, str):
        return [tuple(tokenize(prompt))]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [tuple(tokenize(p)) for p in prompt]
        if _token_ids(prompt):
            return [tuple(prompt)]
        if all(_token_ids(p, nested=True) for p in prompt):
            return [tuple(p) for p in prompt]
    raise InvalidRequestError(
        "prompt must be a string, a list of strings, or token ids", param="prompt"
    )


def _prompt_key(token_ids: Sequence[int]) -> str:
    """A prompt's text as ExampleConnector storage keys it (one word per token)."""
    return " ".join(map(str, token_ids))


# -- the engine ----------------------------------------------------------------------------


class _SimEngine:
    """The routes of one simulator app; they share its config, batch slots and metrics."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.queue = AdmissionQueue(config.max_num_seqs)
        self.engine_id = config.kv_engine_id or str(uuid.uuid4())
        self.kv_store = BlockStore(config.kv_block_size, config.kv_hold_s)
        self.metrics = _Metrics(config, self.queue, self.kv_store, self.engine_id)
        # What /metrics serves: SGLang's gauges instead of vLLM's series in its flavor.
        self.exposed = (
            sglang_registry(config.model, self.queue, self._finished)
            if config.flavor == "sglang"
            else self.metrics.registry
        )
        self.side_channel = SideChannel(self._serve_pull)
        self.shared_storage = (
            SharedStorage(config.kv_shared_storage_path, config.kv_block_size)
            if config.kv_connector == "example"
            else None
        )
        self._created = int(time.time())
        # LoRA adapters loaded at run time (--enable-lora; see lora.py).
        self.lora = SimLora(config.max_lora_rank) if config.enable_lora else None
        # Automatic prefix caching (--prefix-cache-blocks; see prefix_cache.py).
        self.prefix_cache = (
            PrefixCache(
                config.kv_block_size,
                config.prefix_cache_blocks,
                events=bool(config.kv_events_endpoint),
            )
            if config.prefix_cache_blocks
            else None
        )
        self.kv_publisher: KvEventPublisher | None = None  # bound in start()
        reg, label, values = self.metrics.registry, self.metrics.label, self.metrics.values
        self.prefix_queries = Counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            label,
            registry=reg,
        ).labels(**values)
        self.prefix_hits = Counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            label,
            registry=reg,
        ).labels(**values)

    async def start(self) -> None:
        """Open the KV side channel of an engine that hands KV out (a busy port fails the
        start, as NIXL's does)."""
        if self.config.role != "decode" and self.shared_storage is None:
            await self.side_channel.start(
                self._side_channel_host(), self.config.kv_side_channel_port
            )
        if self.config.kv_events_endpoint:
            self.kv_publisher = KvEventPublisher(self.config.kv_events_endpoint)

    async def aclose(self) -> None:
        """Close the KV side channel and the KV-event publisher."""
        await self.side_channel.close()
        if self.kv_publisher is not None:
            self.kv_publisher.close()
            self.kv_publisher = None

    # ---- shared pieces

    def _model(self, body: dict[str, Any], pooling: bool = False) -> str:
        model = body.get("model")
        if model is None:
            return self.config.model
        if not isinstance(model, str):
            raise InvalidRequestError("model must be a string", param="model")
        if model not in self.config.served_names and not (self.lora and self.lora.serves(model)):
            if pooling:  # vLLM's pooling routes say less, and name no param
                raise NotFoundError(f"The model `{model}` does not exist.")
            aliases = ", ".join(self.config.served_names)
            raise ModelNotFoundError(
                model, message=f"The model `{model}` does not exist. Valid aliases: {aliases}."
            )
        return model

    def _max_tokens(self, requested: int | None, key: str, prompt_tokens: int, where: str) -> int:
        """The tokens to generate; the context-length refusals in vLLM 0.32's words."""
        limit = self.config.max_model_len
        room = limit - prompt_tokens
        if room < 1:
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens. However, your prompt "
                f"contains at least {prompt_tokens} input tokens, which exceeds this limit even "
                "without any output tokens. Please reduce the length of the input prompt. "
                f"(parameter=input_tokens, value={prompt_tokens})",
                param="input_tokens",
            )
        if requested is None:
            return min(self.config.max_tokens_default, room)
        if requested > limit:
            raise InvalidRequestError(
                f"{key}={requested} cannot be greater than max_model_len={limit}. Please "
                f"request fewer output tokens. (parameter={key}, value={requested})",
                param=key,
            )
        if requested > room:
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_tokens + requested} tokens ({prompt_tokens} in the {where}, "
                f"{requested} in the completion). Please reduce the length of the {where} "
                "or completion.",
                param=key,
            )
        return requested

    async def _steps(self, job: _Job, watch: _DisconnectWatch) -> AsyncGenerator[int, None]:
        """Yield token step numbers as they fall due; the batch slot is freed however this ends.

        The model: FIFO admission into at most max_num_seqs slots; once admitted, the first
        token comes after ttft_ms, and each later one after tpot_ms scaled by
        (1 + batch_slowdown * (running - 1)), read afresh per token since the batch changes.
        Deadlines are absolute, so event-loop jitter does not add up over a long answer.
        """
        config = self.config
        metrics = self.metrics
        loop = asyncio.get_running_loop()
        arrival = loop.time()
        ticket = self.queue.enqueue()
        produced = 0
        first_at = last_at = arrival
        completed = False
        try:
            if not ticket.done():
                await asyncio.wait((ticket, watch.task()), return_when=asyncio.FIRST_COMPLETED)
                if watch.gone or not ticket.done():
                    return
            admitted = loop.time()
            metrics.queue_time.observe(admitted - arrival)
            latency = config.has_latency
            first = job.first_token_s
            deadline = admitted + (config.ttft_ms / 1000.0 if first is None else first)
            for step in range(job.steps):
                if latency:
                    if step:
                        deadline += config.decode_step_s(self.queue.running)
                    if not await self._sleep_until(loop, deadline, watch):
                        return
                elif watch.gone:
                    return
                now = loop.time()
                if step:
                    metrics.inter_token.observe(now - last_at)
                last_at = now
                if step == 0:
                    first_at = last_at
                    metrics.ttft.observe(first_at - arrival)
                    metrics.prompt_tokens.inc(job.prompt_tokens)
                produced = step + 1
                yield step
            completed = True
        finally:
            self.queue.finish(ticket)
            if produced and not job.pooling:
                metrics.generation_tokens.inc(
                    sum(min(produced, g.completion_tokens) for g in job.generations)
                )
            if produced > 1:
                metrics.tpot.observe((last_at - first_at) / (produced - 1))
            if completed:
                metrics.e2e.observe(loop.time() - arrival)
                for generation in job.generations:
                    metrics.finished(generation.finish_reason)

    @staticmethod
    async def _sleep_until(
        loop: asyncio.AbstractEventLoop, deadline: float, watch: _DisconnectWatch
    ) -> bool:
        """Sleep until `deadline`, waking early if the client leaves; False if it left."""
        delay = deadline - loop.time()
        if delay > 0:
            await asyncio.wait((watch.task(),), timeout=delay)
        return not watch.gone

    async def _run_to_end(self, job: _Job, request: Request) -> bool:
        """Hold a slot for the whole answer; False when the client left first."""
        watch = _DisconnectWatch(request)
        produced = 0
        try:
            async with contextlib.aclosing(self._steps(job, watch)) as steps:
                async for _ in steps:
                    produced += 1
        finally:
            watch.close()
        return produced == job.steps

    def _id(self, prefix: str) -> str:
        return f"{prefix}-{secrets.token_hex(16)}"

    # ---- PD: vLLM's kv_transfer_params exchange

    def _kv_params(self, body: dict[str, Any], stream: bool, prompts: int) -> KvTransferRequest:
        """The request's kv_transfer_params, reduced to what this engine's kv_role honours:
        a producer (prefill) only sends KV, a consumer (decode) only receives it.
        ExampleConnector ignores them: its KV is found by prompt."""
        if self.shared_storage is not None:
            return KvTransferRequest()
        kv = parse_kv_transfer_params(body.get("kv_transfer_params"))
        if kv is None:
            return KvTransferRequest()
        role = self.config.role
        if kv.do_remote_decode and role != "decode":
            if stream:
                raise InvalidRequestError(
                    "kv_transfer_params.do_remote_decode needs stream=false",
                    param="kv_transfer_params.do_remote_decode",
                )
            if prompts != 1:
                raise InvalidRequestError(
                    "kv_transfer_params needs exactly one prompt", param="prompt"
                )
            return kv
        if kv.do_remote_prefill and role != "prefill":
            return kv
        return KvTransferRequest()

    async def _first_token_s(
        self, kv: KvTransferRequest, prompts: Sequence[str], prompt_tokens: int
    ) -> float | None:
        """Load the remote prefill's KV blocks; the decode-only first-token time when they
        came. When they were unknown, expired or unreachable: _KvLoadFailedError under
        vLLM's default policy (fail), None (prefill locally, counted) under recompute."""
        if self.shared_storage is not None:
            return await self._shared_first_token_s(self.shared_storage, prompts, prompt_tokens)
        if not kv.do_remote_prefill:
            return None
        outcome = await pull_blocks(kv)
        metrics = self.metrics
        metrics.external_queries.inc(prompt_tokens)
        if outcome is PullOutcome.OK:
            metrics.external_hits.inc(prompt_tokens)
        engine = kv.remote_engine_id if outcome is PullOutcome.OK else ""
        metrics.kv_params_received.labels(
            outcome=outcome.value, remote_engine_id=engine, **metrics.values
        ).inc()
        if outcome is PullOutcome.OK:
            return self.config.decode_step_s(self.queue.running + 1)
        where = {"outcome": outcome.value, "remote_engine_id": kv.remote_engine_id}
        if self.config.kv_load_failure_policy == "fail":
            log.warning("remote KV unavailable, failing the request", extra=where)
            metrics.finished("error")
            raise _KvLoadFailedError("Internal server error")
        metrics.kv_local_prefill.inc()
        log.warning("remote KV unavailable, prefilling locally", extra=where)
        return None

    async def _shared_first_token_s(
        self, storage: SharedStorage, prompts: Sequence[str], prompt_tokens: int
    ) -> float | None:
        """ExampleConnector: an engine that finds every prompt's KV in the shared folder
        loads it (one decode step to the first token); otherwise it prefills and stores it.
        Queries and hits count tokens, as vLLM's do."""
        metrics = self.metrics
        metrics.external_queries.inc(prompt_tokens)
        found = [await storage.load(p) for p in prompts]
        if all(found):
            metrics.external_hits.inc(sum(found))
            log.info("external cache hit", extra={"tokens": sum(found)})
            return self.config.decode_step_s(self.queue.running + 1)
        for prompt in prompts:
            await storage.save(prompt)
        return None

    def _local_prefill_s(self, prompt_ids: Sequence[Sequence[int]]) -> float | None:
        """Time to the first token of a local prefill: ttft_ms plus prefill_ms_per_token for
        each prompt token the prefix cache does not hold; None (plain ttft_ms) when neither
        is configured."""
        cache = self.prefix_cache
        if cache is None and not self.config.prefill_ms_per_token:
            return None
        uncached = 0
        for ids in prompt_ids:
            cached = 0
            if cache is not None:
                cached = cache.admit(ids)
                self.prefix_queries.inc(len(ids))
                self.prefix_hits.inc(cached)
            uncached += len(ids) - cached
        if cache is not None and self.kv_publisher is not None:
            self.kv_publisher.publish(cache.drain_events())
        return self.config.prefill_s(uncached)

    async def tokenize(self, request: Request) -> Response:
        """POST /tokenize (kv_events routing reads it, the gateway relays it): a chat's or a
        prompt's token ids as this engine reads them, in vLLM's reply shape."""
        body = await _json_object(request)
        self._model(body)
        req = _read(body, EngineTokenizeRequest)
        if req.messages is not None:
            text = chat_prompt_text(msgspec.to_builtins(req.messages))
        elif req.prompt is not None:
            text = req.prompt
        else:
            raise InvalidRequestError("prompt or messages is required", param="prompt")
        ids = tokenize(text)
        return JSONResponse(
            {
                "count": len(ids),
                "max_model_len": self.config.max_model_len,
                "tokens": ids,
                # one word a token; vLLM's strings are the tokenizer's pieces
                "token_strs": text.split() if body.get("return_token_strs") is True else None,
            }
        )

    async def detokenize(self, request: Request) -> Response:
        """POST /detokenize: token ids back to text by the sim's tokenizer, in vLLM's reply
        shape and with its errors (a bad id names its place, one past the vocabulary 400)."""
        body = await _json_object(request)
        self._model(body)
        tokens = body.get("tokens")
        if tokens is None:
            raise RequestSchemaError("tokens", "missing", "Field required")
        if not isinstance(tokens, list):
            raise RequestSchemaError("tokens", "list_type", "Input should be a valid list")
        for at, token in enumerate(tokens):
            if not _is_int(token):
                raise RequestSchemaError(
                    f"tokens.{at}", "int_type", "Input should be a valid integer"
                )
            if token < 0:
                raise RequestSchemaError(
                    f"tokens.{at}",
                    "greater_than_equal",
                    "Input should be greater than or equal to 0",
                )
        if tokens and max(tokens) >= _VOCAB_SIZE:
            raise InvalidRequestError(f"Token id {max(tokens)} is out of vocabulary")
        return JSONResponse({"prompt": detokenize(tokens)})

    async def _failed_stream(self, chat: bool, model: str) -> AsyncIterator[bytes]:
        """What vLLM streams when a request ends with finish_reason error (a failed KV
        load): chat's role chunk first, the error as an event, then [DONE]."""
        if chat:
            yield _role_chunk(
                {
                    "id": self._id("chatcmpl"),
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": model,
                }
            )
        yield sse_event(orjson.dumps(vllm_error_body("Internal server error", 500)))
        yield _DONE

    def _side_channel_host(self) -> str:
        return self.config.kv_side_channel_host or self.config.host

    def _serve_pull(
        self, engine_id: str, request_id: str | None, block_ids: tuple[int, ...]
    ) -> PullOutcome:
        """A decoder reads (and frees) blocks this engine holds, over the side channel."""
        if engine_id != self.engine_id:
            return PullOutcome.WRONG_ENGINE
        return self.kv_store.pull(block_ids, request_id)

    async def _kv_reply(
        self, kv: KvTransferRequest, prompt_tokens: int, request: Request, request_id: str
    ) -> dict[str, Any] | None:
        """The response's kv_transfer_params: the held blocks for a remote decoder, null
        otherwise (vLLM always sends the field)."""
        if kv.do_remote_decode:
            return await self._hand_off(prompt_tokens, request, request_id)
        return None

    async def _hand_off(
        self, prompt_tokens: int, request: Request, request_id: str
    ) -> dict[str, Any]:
        """Hold the prompt's KV blocks and describe them for a remote decoder: the address
        is the side channel's; a wildcard bind is named as the caller named this host."""
        host, port = await self.side_channel.start(
            self._side_channel_host(), self.config.kv_side_channel_port
        )
        if host in ("0.0.0.0", "::", ""):
            name, sep, number = request.headers.get("host", "").rpartition(":")
            host = name.strip("[]") if sep and number.isdigit() and name else "localhost"
        blocks = self.kv_store.hold(prompt_tokens, request_id)
        self.metrics.kv_params_sent.inc()
        return prefill_reply_params(self.engine_id, request_id, blocks, host, port, prompt_tokens)

    # ---- chat

    async def chat(self, request: Request) -> Response | StreamingResponse:
        """POST /v1/chat/completions."""
        return await self.chat_body(await _json_object(request), request)

    async def messages(self, request: Request) -> Response | StreamingResponse:
        """POST /v1/messages (Anthropic's API): run as a chat, as vLLM does; its errors in
        vLLM's Anthropic shape."""

        async def run(request: Request) -> Response | StreamingResponse:
            return await anthropic.messages(await _json_object(request), request, self.chat_body)

        return anthropic.anthropic_error_reply(await _vllm_errors(run)(request))

    async def chat_body(
        self, body: dict[str, Any], request: Request
    ) -> Response | StreamingResponse:
        """A chat request's body, already read (/v1/messages converts its own into one)."""
        model = self._model(body)
        req = _read(body, EngineChatCompletionRequest)
        _sampling(req)
        stream, include_usage = req.streaming, req.include_usage
        requested, key = req.token_limit
        # The sim's chat template adds nothing: with continue_final_message a final
        # assistant message is simply continued, as a prompt that ends with it would be.
        prompt = chat_prompt_text(msgspec.to_builtins(req.messages))
        prompt_ids = tokenize(prompt)
        prompt_tokens = len(prompt_ids)
        max_tokens = self._max_tokens(requested, key, prompt_tokens, "messages")
        generation = generate_ids(
            prompt_ids,
            max_tokens,
            self.config.seed if req.seed is None else req.seed,
            req.stop_strings,
            self.config.subword_tokens,
        )
        with_ids = (tuple(prompt_ids),) if req.return_token_ids else None
        kv = self._kv_params(body, stream, 1)
        try:
            first_token_s = await self._first_token_s(kv, (prompt,), prompt_tokens)
        except _KvLoadFailedError:
            if stream:  # vLLM has answered 200 already; the error comes as an event
                return StreamingResponse(self._failed_stream(True, model))
            raise
        if first_token_s is None:
            first_token_s = self._local_prefill_s((prompt_ids,))
        job = _Job(
            model,
            prompt_tokens,
            (generation,),
            stream,
            include_usage,
            False,
            first_token_s,
            with_ids,
        )
        if stream:
            return StreamingResponse(self._chat_chunks(job, request))
        if not await self._run_to_end(job, request):
            return Response(b"", _CLIENT_GONE)
        reply_id = self._id("chatcmpl")
        kv_params = await self._kv_reply(kv, prompt_tokens, request, reply_id)
        return JSONResponse(
            {
                "id": reply_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        # vLLM leaves tool_calls out when there are none
                        "message": {
                            "role": "assistant",
                            "content": generation.text,
                            "refusal": None,
                            "annotations": None,
                            "audio": None,
                            "function_call": None,
                            "reasoning": None,
                        },
                        "logprobs": None,
                        "finish_reason": generation.finish_reason,
                        "stop_reason": generation.stop_reason,
                        "token_ids": job.token_ids(generation),
                        "routed_experts": None,
                    }
                ],
                "service_tier": None,
                "system_fingerprint": _FINGERPRINT,
                "usage": _usage_details(job),
                "prompt_logprobs": None,
                "prompt_token_ids": job.prompt_token_ids(0),
                "prompt_text": None,
                **_transfer_fields(kv_params),
            }
        )

    async def _chat_chunks(self, job: _Job, request: Request) -> AsyncIterator[bytes]:
        """vLLM's chat SSE: role chunk, content deltas (the last with finish_reason),
        an optional usage chunk with no choices, then [DONE]."""
        generation = job.generations[0]
        head = {
            "id": self._id("chatcmpl"),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": job.model,
        }
        last = generation.completion_tokens - 1
        sent = 0
        watch = _DisconnectWatch(request)
        try:
            async with contextlib.aclosing(self._steps(job, watch)) as steps:
                async for step in steps:
                    if step == 0:
                        yield _role_chunk(head, job.prompt_token_ids(0))
                    choice: dict[str, Any] = {
                        "index": 0,
                        "delta": {"content": generation.pieces[step]},
                        "logprobs": None,
                        "finish_reason": None,
                        "token_ids": job.token_ids(generation, step),
                    }
                    chunk: dict[str, Any] = {**head, "choices": [choice]}
                    if step == last:
                        choice["finish_reason"] = generation.finish_reason
                        choice["stop_reason"] = generation.stop_reason
                        choice["token_ids"] = choice.pop("token_ids")  # vLLM's key order
                        if not job.include_usage:  # vLLM stamps the terminal chunk
                            chunk["system_fingerprint"] = _FINGERPRINT
                    yield sse_event(orjson.dumps(chunk))
                    sent += 1
        finally:
            watch.close()
        if sent < job.steps:
            return  # the client left; nobody is reading
        if job.include_usage:
            yield sse_event(
                orjson.dumps(
                    {
                        **head,
                        "choices": [],
                        "usage": job.usage(),
                        "system_fingerprint": _FINGERPRINT,
                    }
                )
            )
        yield _DONE

    # ---- responses (OpenAI's Responses API, as vLLM serves it)

    async def responses(self, request: Request) -> Response | StreamingResponse:
        """POST /v1/responses: text in, one assistant message out, generated as a chat."""
        body = await _json_object(request)
        model = self._model(body)
        req = _read(body, EngineResponsesRequest)
        if req.previous_response_id is not None:  # vLLM's store is off by default
            raise NotFoundError(f"Response with id '{req.previous_response_id}' not found.")
        prompt = chat_prompt_text(_response_messages(req))
        prompt_ids = tokenize(prompt)
        max_tokens = self._max_tokens(
            req.max_output_tokens, "max_output_tokens", len(prompt_ids), "messages"
        )
        generation = generate_ids(
            prompt_ids, max_tokens, self.config.seed, (), self.config.subword_tokens
        )
        job = _Job(
            model, len(prompt_ids), (generation,), req.streaming, False, False,
            self._local_prefill_s((prompt_ids,)),
        )  # fmt: skip
        shape = _ResponseShape(self._id("resp"), self._id("msg"), job, req)
        if req.streaming:
            return StreamingResponse(self._response_events(shape, request))
        if not await self._run_to_end(job, request):
            return Response(b"", _CLIENT_GONE)
        return JSONResponse(shape.response("completed"))

    async def _response_events(
        self, shape: _ResponseShape, request: Request
    ) -> AsyncIterator[bytes]:
        """vLLM's Responses event stream for one text message; it ends with
        response.completed (no [DONE])."""
        job = shape.job
        generation = job.generations[0]
        yield shape.event("response.created", response=shape.response("in_progress"))
        yield shape.event("response.in_progress", response=shape.response("in_progress"))
        yield shape.event("response.output_item.added", output_index=0, item=shape.message(None))
        yield shape.event("response.content_part.added", **shape.where(), part=shape.part(""))
        sent = 0
        watch = _DisconnectWatch(request)
        try:
            async with contextlib.aclosing(self._steps(job, watch)) as steps:
                async for step in steps:
                    delta = generation.pieces[step]
                    yield shape.event(
                        "response.output_text.delta", **shape.where(), delta=delta, logprobs=[]
                    )
                    sent += 1
        finally:
            watch.close()
        if sent < job.steps:
            return  # the client left; nobody is reading
        text = generation.text
        yield shape.event("response.output_text.done", **shape.where(), text=text, logprobs=[])
        yield shape.event("response.content_part.done", **shape.where(), part=shape.part(text))
        yield shape.event("response.output_item.done", output_index=0, item=shape.message(text))
        yield shape.event("response.completed", response=shape.response("completed"))

    # ---- completions

    async def completions(self, request: Request) -> Response | StreamingResponse:
        """POST /v1/completions (a list of prompts gives one choice per prompt)."""
        body = await _json_object(request)
        model = self._model(body)
        prompt_ids = _completion_prompts(body.get("prompt"))
        req = _read(body, EngineCompletionRequest)
        _sampling(req)
        stream, include_usage = req.streaming, req.include_usage
        requested = req.max_tokens
        seed = self.config.seed if req.seed is None else req.seed
        stop = req.stop_strings
        counts = [len(p) for p in prompt_ids]
        max_tokens = self._max_tokens(requested, "max_tokens", max(counts), "prompt")
        subword = self.config.subword_tokens
        generations = tuple(generate_ids(p, max_tokens, seed, stop, subword) for p in prompt_ids)
        with_ids = tuple(prompt_ids) if req.return_token_ids else None
        prompts = [_prompt_key(p) for p in prompt_ids]
        kv = self._kv_params(body, stream, len(prompts))
        try:
            first_token_s = await self._first_token_s(kv, prompts, sum(counts))
        except _KvLoadFailedError:
            if stream:
                return StreamingResponse(self._failed_stream(False, model))
            raise
        if first_token_s is None:
            first_token_s = self._local_prefill_s(prompt_ids)
        job = _Job(
            model, sum(counts), generations, stream, include_usage, False, first_token_s, with_ids
        )
        if stream:
            return StreamingResponse(self._completion_chunks(job, request))
        if not await self._run_to_end(job, request):
            return Response(b"", _CLIENT_GONE)
        reply_id = self._id("cmpl")
        kv_params = await self._kv_reply(kv, sum(counts), request, reply_id)
        return JSONResponse(
            {
                "id": reply_id,
                "object": "text_completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": i,
                        "text": g.text,
                        "logprobs": None,
                        "finish_reason": g.finish_reason,
                        "stop_reason": g.stop_reason,
                        "token_ids": job.token_ids(g),
                        "prompt_logprobs": None,
                        "prompt_token_ids": job.prompt_token_ids(i),
                        "routed_experts": None,
                    }
                    for i, g in enumerate(generations)
                ],
                "service_tier": None,
                "system_fingerprint": _FINGERPRINT,
                "usage": _usage_details(job),
                **_transfer_fields(kv_params),
            }
        )

    async def _completion_chunks(self, job: _Job, request: Request) -> AsyncIterator[bytes]:
        """vLLM's completions SSE: one chunk per choice per token, usage, then [DONE]."""
        head = {
            "id": self._id("cmpl"),
            "object": "text_completion",
            "created": int(time.time()),
            "model": job.model,
        }
        sent = 0
        watch = _DisconnectWatch(request)
        try:
            async with contextlib.aclosing(self._steps(job, watch)) as steps:
                async for step in steps:
                    for index, generation in enumerate(job.generations):
                        if step >= generation.completion_tokens:
                            continue
                        final = step == generation.completion_tokens - 1
                        chunk: dict[str, Any] = {
                            **head,
                            "choices": [
                                {
                                    "index": index,
                                    "text": generation.pieces[step],
                                    "logprobs": None,
                                    "finish_reason": generation.finish_reason if final else None,
                                    "stop_reason": generation.stop_reason if final else None,
                                    # vLLM sends a prompt's ids with its first chunk only
                                    "prompt_token_ids": job.prompt_token_ids(index)
                                    if step == 0
                                    else None,
                                    "token_ids": job.token_ids(generation, step),
                                }
                            ],
                        }
                        if final and not job.include_usage:
                            chunk["system_fingerprint"] = _FINGERPRINT
                        yield sse_event(orjson.dumps(chunk))
                    sent += 1
        finally:
            watch.close()
        if sent < job.steps:
            return
        if job.include_usage:
            yield sse_event(
                orjson.dumps(
                    {
                        **head,
                        "choices": [],
                        "usage": job.usage(),
                        "system_fingerprint": _FINGERPRINT,
                    }
                )
            )
        yield _DONE

    # ---- embeddings

    async def embeddings(self, request: Request) -> Response:
        """POST /v1/embeddings: hash-based unit vectors, after admission and ttft_ms."""
        body = await _json_object(request)
        model = self._model(body, pooling=True)
        texts = _embedding_inputs(body.get("input"))
        encoding = body.get("encoding_format")
        if encoding not in (None, "float", "base64"):
            raise InvalidRequestError(
                "encoding_format must be 'float' or 'base64'", param="encoding_format"
            )
        dimensions = body.get("dimensions")
        if dimensions is not None and dimensions != self.config.embedding_dim:
            raise InvalidRequestError(
                f"dimensions must be {self.config.embedding_dim} for this model",
                param="dimensions",
            )
        counts = [count_tokens(t) for t in texts]
        if max(counts) > self.config.max_model_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {self.config.max_model_len} tokens; "
                f"an input has {max(counts)}.",
                param="input",
            )
        # Prefill only: one step, no decode tokens.
        job = _Job(model, sum(counts), (Generation(("",), "stop"),), False, False, pooling=True)
        if not await self._run_to_end(job, request):
            return Response(b"", _CLIENT_GONE)
        data: list[dict[str, Any]] = []
        for index, text in enumerate(texts):
            vector = embedding_vector(text, self.config.embedding_dim, self.config.seed)
            embedding: list[float] | str = vector
            if encoding == "base64":
                packed = array.array("f", vector)
                if sys.byteorder != "little":  # pragma: no cover - OpenAI decodes little-endian
                    packed.byteswap()
                embedding = base64.b64encode(packed.tobytes()).decode("ascii")
            data.append({"index": index, "object": "embedding", "embedding": embedding})
        total = sum(counts)
        return JSONResponse(
            {
                "id": self._id("embd"),
                "object": "list",
                "created": int(time.time()),
                "model": model,
                "data": data,
                "usage": {
                    "prompt_tokens": total,
                    "total_tokens": total,
                    "completion_tokens": 0,
                    "prompt_tokens_details": None,
                },
            }
        )

    async def _cross_encode(
        self, request: Request, body: dict[str, Any], pairs: list[tuple[str, str]]
    ) -> tuple[str, list[float], int] | None:
        """Score (query, document) pairs as one pooling job (prefill only); None when the
        client left. Returns the model, the scores and the prompt tokens."""
        model = self._model(body, pooling=True)
        counts = [count_tokens(a) + count_tokens(b) for a, b in pairs]
        if max(counts) > self.config.max_model_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {self.config.max_model_len} tokens; "
                f"a pair has {max(counts)}."
            )
        job = _Job(model, sum(counts), (Generation(("",), "stop"),), False, False, pooling=True)
        if not await self._run_to_end(job, request):
            return None
        dim, seed = self.config.embedding_dim, self.config.seed
        return model, [pair_score(a, b, dim, seed) for a, b in pairs], sum(counts)

    async def rerank(self, request: Request) -> Response:
        """POST /rerank (and /v1/rerank, /v2/rerank): documents by relevance to the query,
        most relevant first, top_n of them (0: all), in vLLM's reply shape."""
        body = await _json_object(request)
        query = body.get("query")
        if query is None:
            raise RequestSchemaError("query", "missing", "Field required")
        if not isinstance(query, str):
            raise RequestSchemaError("query", "string_type", "Input should be a valid string")
        documents = _score_texts(body, "documents")
        top_n = body.get("top_n", 0)
        if not _is_int(top_n):
            raise RequestSchemaError("top_n", "int_type", "Input should be a valid integer")
        if top_n < 0:
            raise RequestSchemaError(
                "top_n", "greater_than_equal", "Input should be greater than or equal to 0"
            )
        scored = await self._cross_encode(request, body, [(query, d) for d in documents])
        if scored is None:
            return Response(b"", _CLIENT_GONE)
        model, scores, tokens = scored
        order = sorted(range(len(documents)), key=lambda i: -scores[i])
        if top_n:
            order = order[:top_n]
        return JSONResponse(
            {
                "id": self._id("rerank"),
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "results": [
                    {
                        "index": i,
                        "document": {"text": documents[i], "multi_modal": None},
                        "relevance_score": scores[i],
                    }
                    for i in order
                ],
            }
        )

    async def score(self, request: Request) -> Response:
        """POST /score (and /v1/score): a score for each text_1/text_2 pair, one text_1
        against every text_2 when it is one text, in vLLM's reply shape."""
        body = await _json_object(request)
        first = _score_texts(body, "text_1")
        second = _score_texts(body, "text_2")
        if len(first) == 1:
            first = first * len(second)
        elif len(first) != len(second):
            raise InvalidRequestError("Input lengths must be either 1:1, 1:N or N:N")
        scored = await self._cross_encode(request, body, list(zip(first, second, strict=True)))
        if scored is None:
            return Response(b"", _CLIENT_GONE)
        model, scores, tokens = scored
        return JSONResponse(
            {
                "id": self._id("score"),
                "object": "list",
                "created": int(time.time()),
                "model": model,
                "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
                "usage": {
                    "prompt_tokens": tokens,
                    "total_tokens": tokens,
                    "completion_tokens": 0,
                    "prompt_tokens_details": None,
                },
            }
        )

    # ---- plain routes

    async def models(self, request: Request) -> Response:
        """GET /v1/models: every served name, owned by sage-sim so nobody mistakes it, then
        the LoRA adapters loaded (`parent`: the model)."""
        response = JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": name,
                        "object": "model",
                        "created": self._created,
                        "owned_by": OWNED_BY,
                        "root": self.config.model,
                        "parent": None,
                        "max_model_len": self.config.max_model_len,
                        "permission": [
                            {
                                "id": f"modelperm-{name}",
                                "object": "model_permission",
                                "created": self._created,
                                "allow_create_engine": False,
                                "allow_sampling": True,
                                "allow_logprobs": True,
                                "allow_search_indices": False,
                                "allow_view": True,
                                "allow_fine_tuning": False,
                                "organization": "*",
                                "group": None,
                                "is_blocking": False,
                            }
                        ],
                    }
                    for name in self.config.served_names
                ],
            }
        )
        if self.lora is None:
            return response
        listed = orjson.loads(response.body)
        listed["data"] += self.lora.model_entries(listed["data"][0])
        return JSONResponse(listed)

    def _finished(self) -> float:
        """Requests finished so far (vLLM's request_success, every reason)."""
        return sum(
            sample.value
            for family in self.metrics.registry.collect()
            if family.name == "vllm:request_success"
            for sample in family.samples
            if sample.name == "vllm:request_success_total"
        )

    async def health(self, request: Request) -> Response:
        """GET /health: 200 with an empty body, as vLLM answers."""
        return Response(b"", 200, b"text/plain; charset=utf-8")

    async def version(self, request: Request) -> Response:
        """GET /version."""
        return JSONResponse({"version": OWNED_BY})

    async def prometheus(self, request: Request) -> Response:
        """GET /metrics (or /metrics/) in Prometheus text format; `?name[]=...` keeps only
        those series, as prometheus_client's app at vLLM's /metrics/ does (vLLM's /metrics
        ignores it; we honour it on both: a filter asked for is a filter meant)."""
        registry = self.exposed
        names = parse_qs(request.query.decode("latin-1")).get("name[]")
        page = generate_latest(registry.restricted_registry(names) if names else registry)
        return Response(page, 200, CONTENT_TYPE_LATEST.encode())


def _response_messages(req: EngineResponsesRequest) -> list[dict[str, Any]]:
    """A Responses request's input as chat messages (instructions first, as a system turn);
    input_text / output_text parts count as text, other items (tool calls) add none."""
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        return [*messages, {"role": "user", "content": req.input}]
    for item in req.input:
        content = item.get("content")
        if isinstance(content, list):
            content = [
                {"type": "text", "text": part.get("text")}
                for part in content
                if isinstance(part, dict) and part.get("type") in ("input_text", "output_text")
            ]
        messages.append({"role": item.get("role", "user"), "content": content})
    return messages


class _ResponseShape:
    """The JSON of one Responses reply: the response object, its message, and its events
    (numbered in order, as vLLM's sequence_number)."""

    def __init__(
        self, response_id: str, item_id: str, job: _Job, req: EngineResponsesRequest
    ) -> None:
        self.response_id = response_id
        self.item_id = item_id
        self.job = job
        self.req = req
        self.created = int(time.time())
        self.sequence = 0

    def part(self, text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": None}

    def message(self, text: str | None) -> dict[str, Any]:
        """The assistant message item; `text` None while it is still being written."""
        return {
            "id": self.item_id,
            "type": "message",
            "role": "assistant",
            "status": "in_progress" if text is None else "completed",
            "content": [] if text is None else [self.part(text)],
        }

    def where(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "output_index": 0, "content_index": 0}

    def response(self, status: str) -> dict[str, Any]:
        """The response object; `status` "completed" once generated (then "incomplete" if
        the output limit cut it short, as vLLM reports it)."""
        job, req = self.job, self.req
        generation = job.generations[0]
        done = status == "completed"
        if done and generation.finish_reason == "length":
            status = "incomplete"
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created,
            "model": job.model,
            "status": status,
            "incomplete_details": (
                {"reason": "max_output_tokens"} if status == "incomplete" else None
            ),
            "error": None,
            "instructions": req.instructions,
            "metadata": req.metadata,
            "max_output_tokens": req.max_output_tokens,
            "temperature": req.temperature if req.temperature is not None else 1.0,
            "top_p": req.top_p if req.top_p is not None else 1.0,
            "tools": [],
            "tool_choice": "auto",
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "output": [self.message(generation.text)] if done else [],
            "usage": (
                {
                    "input_tokens": job.prompt_tokens,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": job.completion_tokens,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": job.prompt_tokens + job.completion_tokens,
                }
                if done
                else None
            ),
        }

    def event(self, kind: str, **fields: Any) -> bytes:
        """One named SSE event, as vLLM writes them."""
        data = orjson.dumps({"type": kind, "sequence_number": self.sequence, **fields})
        self.sequence += 1
        return b"event: " + kind.encode() + b"\n" + sse_event(data)


def _embedding_inputs(value: Any) -> list[str]:
    if value is None:
        raise InvalidRequestError("input is required", param="input")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(_is_int(t) for t in value):
            return [" ".join(map(str, value))]
        if all(isinstance(v, list) and v and all(_is_int(t) for t in v) for v in value):
            return [" ".join(map(str, v)) for v in value]
    raise InvalidRequestError(
        "input must be a string, a non-empty list of strings, or token ids", param="input"
    )


def _score_texts(body: dict[str, Any], field: str) -> list[str]:
    """A /rerank or /score text field (a string or a non-empty list of strings), with
    vLLM's validation errors."""
    value = body.get(field)
    if value is None:
        raise RequestSchemaError(field, "missing", "Field required")
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise RequestSchemaError(field, "list_type", "Input should be a valid list")
    for at, text in enumerate(value):
        if not isinstance(text, str):
            raise RequestSchemaError(
                f"{field}.{at}", "string_type", "Input should be a valid string"
            )
    if not value:
        raise InvalidRequestError(f"{field} must not be empty")
    return list(value)


def create_app(config: SimConfig) -> App:
    """The simulator's ASGI app; each app has its own slots and metrics registry."""
    engine = _SimEngine(config)
    app = App(on_startup=engine.start, on_shutdown=engine.aclose)
    routes: dict[str, tuple[str, Handler]] = {
        "/v1/chat/completions": ("POST", engine.chat),
        "/v1/completions": ("POST", engine.completions),
        "/v1/responses": ("POST", engine.responses),
        "/v1/messages": ("POST", engine.messages),
        "/v1/models": ("GET", engine.models),
        "/health": ("GET", engine.health),
        "/version": ("GET", engine.version),
        "/metrics": ("GET", engine.prometheus),
        "/metrics/": ("GET", engine.prometheus),  # vLLM's prometheus_client mount
    }
    if config.flavor == "sglang":
        routes["/health_generate"] = ("GET", engine.health)
    if config.embedding_dim > 0:
        routes["/v1/embeddings"] = ("POST", engine.embeddings)
        # A pooling model serves vLLM's cross-encoder routes too (each under its paths).
        for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
            routes[path] = ("POST", engine.rerank)
        for path in ("/score", "/v1/score"):
            routes[path] = ("POST", engine.score)
    # vLLM serves both whatever its flags; kv_events routing reads /tokenize.
    routes["/tokenize"] = ("POST", engine.tokenize)
    routes["/detokenize"] = ("POST", engine.detokenize)
    if engine.lora is not None:
        routes["/v1/load_lora_adapter"] = ("POST", engine.lora.load)
        routes["/v1/unload_lora_adapter"] = ("POST", engine.lora.unload)
    not_allowed = _detail(405)
    for path, (method, handler) in routes.items():
        app.add(method, path, _vllm_errors(handler))
        for other in _METHODS:
            if other != method:
                app.add(other, path, not_allowed)
    not_found = _detail(404)
    for method in _METHODS:
        app.add(method, "/*", not_found)
    return app


# -- command line --------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn's server, logging one line with the bound address once it listens."""

    def __init__(self, config: uvicorn.Config, sim: SimConfig) -> None:
        super().__init__(config)
        self.sim = sim

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.servers or not self.servers[0].sockets:
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        log.info(
            "sim engine listening (testing/benchmarking tool, not a real model)",
            extra={
                "url": f"http://{host}:{port}",
                "model": self.sim.model,
                "served_names": ",".join(self.sim.served_names),
                "ttft_ms": self.sim.ttft_ms,
                "tpot_ms": self.sim.tpot_ms,
                "max_num_seqs": self.sim.max_num_seqs,
                "role": self.sim.role,
            },
        )


def _parser() -> argparse.ArgumentParser:
    defaults = SimConfig()
    parser = argparse.ArgumentParser(
        prog="python -m sage.engines.sim",
        description="vLLM-compatible simulator engine: a testing/benchmarking tool for the "
        "SAGE control plane (no model, deterministic text, modelled latency).",
    )
    parser.add_argument("--model", default=defaults.model, help="served model name")
    parser.add_argument(
        "--served-model-name",
        dest="aliases",
        action="extend",
        nargs="+",
        default=[],
        metavar="NAME",
        help="extra served name (repeatable)",
    )
    parser.add_argument("--host", default=defaults.host)
    parser.add_argument("--port", type=int, default=defaults.port, help="0 picks a free port")
    parser.add_argument("--ttft-ms", type=float, default=defaults.ttft_ms)
    parser.add_argument("--tpot-ms", type=float, default=defaults.tpot_ms)
    parser.add_argument(
        "--batch-slowdown",
        type=float,
        default=defaults.batch_slowdown,
        help="extra TPOT fraction per additional running request",
    )
    parser.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs)
    parser.add_argument(
        "--prefix-cache-blocks",
        type=int,
        default=defaults.prefix_cache_blocks,
        help="model automatic prefix caching: an LRU of this many --kv-block-size blocks "
        "(0: off); exports vllm:prefix_cache_queries/hits",
    )
    parser.add_argument(
        "--prefill-ms-per-token",
        type=float,
        default=defaults.prefill_ms_per_token,
        help="prefill ms per prompt token not in the prefix cache (added to --ttft-ms)",
    )
    parser.add_argument(
        "--kv-events-endpoint",
        default=defaults.kv_events_endpoint,
        help="publish the prefix cache's blocks as vLLM's KV-cache events on this ZMQ "
        "endpoint (ipc://PATH or tcp://*:PORT; needs --prefix-cache-blocks)",
    )
    parser.add_argument("--max-tokens-default", type=int, default=defaults.max_tokens_default)
    parser.add_argument("--max-model-len", type=int, default=defaults.max_model_len)
    parser.add_argument(
        "--embedding-dim",
        type=int,
        default=defaults.embedding_dim,
        help="serve /v1/embeddings with vectors of this size (0: off)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    # vLLM's flag names: serve HTTPS (engines whose URLs leave a private network).
    parser.add_argument("--ssl-certfile", default=None, help="PEM certificate: serve HTTPS")
    parser.add_argument("--ssl-keyfile", default=None, help="PEM key for --ssl-certfile")
    parser.add_argument(
        "--role",
        default=defaults.role,
        choices=["both", "prefill", "decode"],
        help="PD serving: prefill answers kv_transfer_params for a remote decoder, decode "
        "loads a remote prefill's KV blocks, both does either (vLLM kv_role kv_both)",
    )
    parser.add_argument("--kv-engine-id", default="", help="KV engine id (default: random)")
    parser.add_argument("--kv-block-size", type=int, default=defaults.kv_block_size)
    parser.add_argument(
        "--kv-hold-s",
        type=float,
        default=defaults.kv_hold_s,
        help="seconds a prefill engine keeps KV blocks for a decoder to pull",
    )
    parser.add_argument(
        "--kv-side-channel-host",
        default=os.environ.get("VLLM_NIXL_SIDE_CHANNEL_HOST", ""),
        help="host of the KV side channel decoders pull from (default: "
        "$VLLM_NIXL_SIDE_CHANNEL_HOST, else --host)",
    )
    parser.add_argument(
        "--kv-side-channel-port",
        type=int,
        default=int(os.environ.get("VLLM_NIXL_SIDE_CHANNEL_PORT", "0")),
        help="port of the KV side channel (default: $VLLM_NIXL_SIDE_CHANNEL_PORT, else a free one)",
    )
    parser.add_argument(
        "--kv-load-failure-policy",
        default=defaults.kv_load_failure_policy,
        choices=KV_LOAD_FAILURE_POLICIES,
        help="remote KV that cannot be loaded: fail the request (vLLM's default) or "
        "recompute (prefill locally)",
    )
    parser.add_argument(
        "--kv-connector",
        default=defaults.kv_connector,
        choices=["nixl", "example"],
        help="vLLM KV connector to play in PD serving: nixl (kv_transfer_params name the "
        "blocks) or example (ExampleConnector: KV in --kv-shared-storage-path, by prompt)",
    )
    parser.add_argument(
        "--kv-shared-storage-path",
        default="",
        help="folder ExampleConnector engines share (its shared_storage_path)",
    )
    parser.add_argument(
        "--enable-lora",
        action="store_true",
        help="serve /v1/load_lora_adapter and /v1/unload_lora_adapter, as vLLM does with "
        "--enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING",
    )
    parser.add_argument("--max-lora-rank", type=int, default=defaults.max_lora_rank)
    parser.add_argument(
        "--subword-tokens",
        action="store_true",
        help="output tokens that continue the word before them (like WordPiece's ##s), so "
        "a reply's text does not re-tokenize to its own token ids",
    )
    parser.add_argument(
        "--startup-delay-s",
        type=float,
        default=0.0,
        help="wait this long before listening, as a real engine loading its weights does "
        "(tests of what users see while engines start)",
    )
    parser.add_argument(
        "--flavor",
        default=defaults.flavor,
        choices=FLAVORS,
        help="engine family to speak: vllm, or sglang (SGLang's /metrics names and "
        "/health_generate)",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper
    )
    add_api_key_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulator until SIGTERM/SIGINT; returns the process exit status."""
    parser = _parser()
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        sim = SimConfig(
            model=args.model,
            aliases=tuple(args.aliases),
            host=args.host,
            port=args.port,
            ttft_ms=args.ttft_ms,
            tpot_ms=args.tpot_ms,
            batch_slowdown=args.batch_slowdown,
            max_num_seqs=args.max_num_seqs,
            max_tokens_default=args.max_tokens_default,
            max_model_len=args.max_model_len,
            seed=args.seed,
            embedding_dim=args.embedding_dim,
            role=args.role,
            kv_engine_id=args.kv_engine_id,
            kv_block_size=args.kv_block_size,
            kv_hold_s=args.kv_hold_s,
            kv_side_channel_host=args.kv_side_channel_host,
            kv_side_channel_port=args.kv_side_channel_port,
            kv_load_failure_policy=args.kv_load_failure_policy,
            kv_connector=args.kv_connector,
            kv_shared_storage_path=args.kv_shared_storage_path,
            subword_tokens=args.subword_tokens,
            enable_lora=args.enable_lora,
            max_lora_rank=args.max_lora_rank,
            prefix_cache_blocks=args.prefix_cache_blocks,
            prefill_ms_per_token=args.prefill_ms_per_token,
            kv_events_endpoint=args.kv_events_endpoint,
            flavor=args.flavor,
        )
    except ConfigurationError as exc:
        parser.error(exc.message)
    configure_logging("sim-engine", args.log_level)
    if args.startup_delay_s > 0:
        time.sleep(args.startup_delay_s)  # SIGTERM's default action still ends us here
    # Decoders pull KV over the side channel (its own port), so only /health is open here.
    # vLLM's AuthenticationMiddleware refuses with exactly this body
    app = protect(create_app(sim), resolve_api_key(args.api_key), {"/health"}, VLLM_UNAUTHORIZED)
    server = _Server(
        uvicorn.Config(
            app,
            host=sim.host,
            port=sim.port,
            loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
            http="httptools",
            access_log=False,
            log_config=None,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=5,
            ssl_certfile=args.ssl_certfile,
            ssl_keyfile=args.ssl_keyfile,
        ),
        sim,
    )

    def on_term(signum: int, frame: FrameType | None) -> None:
        # uvicorn handles SIGTERM while it runs and re-raises it afterwards; this handler
        # turns that re-raise (or a signal that lands before uvicorn is up) into a clean stop.
        server.should_exit = True

    signal.signal(signal.SIGTERM, on_term)
    server.run()
    return 0 if server.started else 1
