"""HTTP front of the transformers engine: vLLM's OpenAI routes, JSON/SSE shapes and metrics.

Generation runs in one thread that decodes every admitted request together (batching.py),
prompt rendering and tokenising in another, so the event loop only moves bytes. A client
that disconnects sets its request's cancel flag; its sequence leaves the batch before the
next decode step.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import orjson
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from sage.common.exceptions import (
    ConfigurationError,
    InternalError,
    InvalidRequestError,
    ModelNotFoundError,
    SageError,
)
from sage.common.http.asgi import App, JSONResponse, Request, Response, StreamingResponse, sse_event
from sage.common.http.server import serve_app
from sage.common.utils.logging import configure_logging
from sage.engines.auth import add_api_key_argument, protect, resolve_api_key

from .batching import BatchRunner, Runner, Submission
from .core import CoreFacts, CoreProcess
from .model import (
    KV_CACHE_MODES,
    CausalLM,
    EngineConfig,
    Outcome,
    Prompts,
    SamplingParams,
    load_tokenizer,
)
from .protocol import Sampling, parse_chat, parse_completion

__all__ = ["create_app", "main"]

log = logging.getLogger(__name__)

OWNED_BY = "sage-transformers"
_DONE = b"data: [DONE]\n\n"
_CLIENT_GONE = 499  # nobody reads it: the client has gone


def _stream_error(exc: Exception) -> bytes:
    """An SSE event carrying the OpenAI error JSON for a failure after the stream began."""
    if isinstance(exc, SageError):
        error = exc
    else:
        log.error("generation failed mid-stream", exc_info=exc)
        error = InternalError("generation failed; see the engine log")
    return sse_event(orjson.dumps(error.to_openai()))


class _Engine:
    """The routes of one engine app; they share the model, the worker and the metrics.

    Given a loaded model (tests), it steps in a thread of this process. Otherwise the model
    lives in a generation process of its own (core.py) and this one only serves HTTP.
    """

    def __init__(
        self, config: EngineConfig, model: CausalLM | None = None, log_level: str = "INFO"
    ) -> None:
        self.config = config
        self.names = config.names
        self.runner: Runner
        self.prompts: CausalLM | Prompts
        if model is not None:
            self.runner = BatchRunner.for_engine(model, config, model.max_model_len)
            self.prompts = model
            self.facts = CoreFacts(
                device=str(getattr(model, "device", "cpu")),  # a stand-in model may lack them
                dtype=str(getattr(model, "dtype", "")),
                max_model_len=model.max_model_len,
                vocab_size=model.vocab_size,
                can_batch=model.can_batch,
                warm_up_s=0.0,
                decode=str(getattr(model, "decode_mode", "dynamic")),
            )
        else:
            prompts = Prompts(load_tokenizer(config))  # fails fast, before the weights load
            self.runner = CoreProcess(config, log_level=log_level)
            self.prompts, self.facts = prompts, self.runner.facts
        self.max_model_len = self.facts.max_model_len
        self.vocab_size = self.facts.vocab_size
        # Tokenising is CPU work too; its own thread keeps 400s fast while a long answer
        # holds the generation thread.
        self._prep = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self._created = int(time.time())

    async def close(self) -> None:
        await asyncio.to_thread(self.runner.close)
        self._prep.shutdown(wait=False, cancel_futures=True)

    # ---- shared pieces

    def _check_model(self, model: str | None) -> str:
        if model is None:
            return self.names[0]
        if model not in self.names:
            raise ModelNotFoundError(model)
        return model

    async def _in_prep(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._prep, fn)

    def _params(self, sampling: Sampling, prompt_tokens: int, where: str) -> SamplingParams:
        limit = self.max_model_len
        room = limit - prompt_tokens
        if room < 1:
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens. However, your "
                f"{where} has {prompt_tokens} tokens. Please reduce the length of the {where}.",
                param=where,
            )
        max_tokens = sampling.max_tokens
        if max_tokens is None:
            default = self.config.max_tokens_default
            max_tokens = min(room, default) if default > 0 else room
        elif max_tokens > room:
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the "
                f"{where}, {max_tokens} in the completion). Please reduce the length of the "
                f"{where} or completion.",
                param=sampling.max_tokens_field,
            )
        bad = [i for i in sampling.stop_token_ids if i >= self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"stop_token_ids {bad} are outside the vocabulary of {self.vocab_size}",
                param="stop_token_ids",
            )
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            seed=sampling.seed,
            stop=sampling.stop,
            stop_token_ids=sampling.stop_token_ids,
            ignore_eos=sampling.ignore_eos,
            min_tokens=min(sampling.min_tokens, max_tokens),
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
        )

    async def _events(
        self, prompt_ids: tuple[int, ...], params: SamplingParams, *, stream: bool = True
    ) -> AsyncGenerator[str | Outcome, None]:
        """Text pieces as the batch releases them (none unless `stream`), then the Outcome.

        However this generator ends (finished, client gone, cancelled), the request's cancel
        flag is set on the way out, so its sequence leaves the batch within one step.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | Outcome | BaseException] = asyncio.Queue()

        def put(item: str | Outcome | BaseException) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody listens
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def done(future: Future[Outcome]) -> None:
            error = future.exception()
            put(error if error is not None else future.result())

        submission: Submission | None = None
        try:
            submission = self.runner.submit(prompt_ids, params, put if stream else None)
            submission.future.add_done_callback(done)
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Outcome):
                    return
        finally:
            if submission is not None:
                submission.cancel()

    async def _collect(
        self, request: Request, prompts: Sequence[tuple[int, ...]], params: SamplingParams
    ) -> list[Outcome] | None:
        """Run every prompt to the end; None when the client disconnects first."""

        async def one(prompt_ids: tuple[int, ...]) -> Outcome:
            async with contextlib.aclosing(
                self._events(prompt_ids, params, stream=False)
            ) as events:
                async for item in events:
                    if isinstance(item, Outcome):
                        return item
            raise InternalError("generation ended without an outcome")

        async def run_all() -> list[Outcome]:
            # Every prompt at once: they join the batch together.
            return list(await asyncio.gather(*(one(p) for p in prompts)))

        work = asyncio.ensure_future(run_all())
        watch = asyncio.ensure_future(request.wait_disconnect())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()  # cancels the await inside _events: its finally sets the flag
                with contextlib.suppress(asyncio.CancelledError):
                    await work
        if work.cancelled():
            return None
        return work.result()

    def _id(self, prefix: str) -> str:
        return f"{prefix}-{secrets.token_hex(16)}"

    @staticmethod
    def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
        }

    # ---- chat

    async def chat(self, request: Request) -> Response | StreamingResponse:
        """POST /v1/chat/completions."""
        parsed = parse_chat(await request.body())
        model = self._check_model(parsed.model)

        def prepare() -> tuple[int, ...]:
            text = self.prompts.render_chat(parsed.messages)
            return tuple(self.prompts.encode(text, add_special_tokens=False))

        prompt_ids: tuple[int, ...] = await self._in_prep(prepare)
        params = self._params(parsed.sampling, len(prompt_ids), "messages")
        if parsed.sampling.stream:
            return StreamingResponse(
                self._chat_chunks(model, prompt_ids, params, parsed.sampling.include_usage)
            )
        outcomes = await self._collect(request, [prompt_ids], params)
        if outcomes is None:
            return Response(b"", _CLIENT_GONE)
        outcome = outcomes[0]
        return JSONResponse(
            {
                "id": self._id("chatcmpl"),
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": outcome.text, "tool_calls": []},
                        "logprobs": None,
                        "finish_reason": outcome.finish_reason,
                        "stop_reason": outcome.stop_reason,
                    }
                ],
                "usage": {
                    **self._usage(outcome.prompt_tokens, outcome.completion_tokens),
                    "prompt_tokens_details": None,
                },
                "prompt_logprobs": None,
            }
        )

    async def _chat_chunks(
        self,
        model: str,
        prompt_ids: tuple[int, ...],
        params: SamplingParams,
        include_usage: bool,
    ) -> AsyncIterator[bytes]:
        """vLLM's chat SSE: role chunk, content deltas, a last delta with finish_reason,
        an optional usage chunk with no choices, then [DONE]."""
        head = {
            "id": self._id("chatcmpl"),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }

        def chunk(delta: dict[str, Any], finish: Outcome | None = None) -> bytes:
            choice: dict[str, Any] = {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": finish.finish_reason if finish else None,
            }
            if finish is not None:
                choice["stop_reason"] = finish.stop_reason
            return sse_event(orjson.dumps({**head, "choices": [choice]}))

        yield chunk({"role": "assistant", "content": ""})
        try:
            async with contextlib.aclosing(self._events(prompt_ids, params)) as events:
                async for item in events:
                    if isinstance(item, str):
                        yield chunk({"content": item})
                        continue
                    yield chunk({"content": item.tail}, item)
                    if include_usage:
                        usage = self._usage(item.prompt_tokens, item.completion_tokens)
                        yield sse_event(orjson.dumps({**head, "choices": [], "usage": usage}))
        except Exception as exc:  # the status line is sent: report in-band, as vLLM does
            yield _stream_error(exc)
        yield _DONE

    # ---- completions

    async def completions(self, request: Request) -> Response | StreamingResponse:
        """POST /v1/completions (a list of prompts gives one choice per prompt, in turn)."""
        parsed = parse_completion(await request.body())
        model = self._check_model(parsed.model)
        vocab = self.vocab_size

        def prepare() -> list[tuple[int, ...]]:
            prompts: list[tuple[int, ...]] = []
            for prompt in parsed.prompts:
                if isinstance(prompt, str):
                    prompts.append(tuple(self.prompts.encode(prompt, add_special_tokens=True)))
                else:
                    if any(not 0 <= t < vocab for t in prompt):
                        raise InvalidRequestError(
                            f"prompt token ids must be in [0, {vocab})", param="prompt"
                        )
                    prompts.append(prompt)
            if any(not p for p in prompts):
                raise InvalidRequestError("prompt must not be empty", param="prompt")
            return prompts

        prompts: list[tuple[int, ...]] = await self._in_prep(prepare)
        params = self._params(parsed.sampling, max(len(p) for p in prompts), "prompt")
        if parsed.sampling.stream:
            return StreamingResponse(
                self._completion_chunks(model, prompts, params, parsed.sampling.include_usage)
            )
        outcomes = await self._collect(request, prompts, params)
        if outcomes is None:
            return Response(b"", _CLIENT_GONE)
        return JSONResponse(
            {
                "id": self._id("cmpl"),
                "object": "text_completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": i,
                        "text": o.text,
                        "logprobs": None,
                        "finish_reason": o.finish_reason,
                        "stop_reason": o.stop_reason,
                        "prompt_logprobs": None,
                    }
                    for i, o in enumerate(outcomes)
                ],
                "usage": {
                    **self._usage(
                        sum(o.prompt_tokens for o in outcomes),
                        sum(o.completion_tokens for o in outcomes),
                    ),
                    "prompt_tokens_details": None,
                },
            }
        )

    async def _completion_chunks(
        self,
        model: str,
        prompts: Sequence[tuple[int, ...]],
        params: SamplingParams,
        include_usage: bool,
    ) -> AsyncIterator[bytes]:
        """vLLM's completions SSE: text chunks per choice, the last with finish_reason,
        an optional usage chunk, then [DONE]."""
        head = {
            "id": self._id("cmpl"),
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
        }

        def chunk(index: int, text: str, finish: Outcome | None = None) -> bytes:
            choice = {
                "index": index,
                "text": text,
                "logprobs": None,
                "finish_reason": finish.finish_reason if finish else None,
                "stop_reason": finish.stop_reason if finish else None,
            }
            return sse_event(orjson.dumps({**head, "choices": [choice]}))

        prompt_tokens = completion_tokens = 0
        try:
            for index, prompt_ids in enumerate(prompts):
                async with contextlib.aclosing(self._events(prompt_ids, params)) as events:
                    async for item in events:
                        if isinstance(item, str):
                            yield chunk(index, item)
                            continue
                        yield chunk(index, item.tail, item)
                        prompt_tokens += item.prompt_tokens
                        completion_tokens += item.completion_tokens
        except Exception as exc:  # the status line is sent: report in-band, as vLLM does
            yield _stream_error(exc)
            yield _DONE
            return
        if include_usage:
            usage = self._usage(prompt_tokens, completion_tokens)
            yield sse_event(orjson.dumps({**head, "choices": [], "usage": usage}))
        yield _DONE

    # ---- plain routes

    async def models(self, request: Request) -> Response:
        """GET /v1/models: every served name."""
        return JSONResponse(
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
                        "max_model_len": self.max_model_len,
                        "permission": [],
                    }
                    for name in self.names
                ],
            }
        )

    async def health(self, request: Request) -> Response:
        """GET /health: 200 with an empty body once the model is loaded, as vLLM answers."""
        return Response(b"", 200, b"text/plain; charset=utf-8")

    async def version(self, request: Request) -> Response:
        """GET /version."""
        return JSONResponse({"version": OWNED_BY})

    async def prometheus(self, request: Request) -> Response:
        """GET /metrics in Prometheus text format."""
        text = await asyncio.wrap_future(self.runner.metrics_text())
        return Response(text, 200, CONTENT_TYPE_LATEST.encode())


def create_app(config: EngineConfig, model: CausalLM | None = None) -> App:
    """The engine's ASGI app. With `model`, it steps in this process; without, a generation
    process is started now and loads (and warms up) the model."""
    return _build(config, model)[0]


def _build(
    config: EngineConfig, model: CausalLM | None, log_level: str = "INFO"
) -> tuple[App, _Engine]:
    engine = _Engine(config, model, log_level)
    app = App(on_shutdown=engine.close)
    app.add("POST", "/v1/chat/completions", engine.chat)
    app.add("POST", "/v1/completions", engine.completions)
    app.add("GET", "/v1/models", engine.models)
    app.add("GET", "/health", engine.health)
    app.add("GET", "/version", engine.version)
    app.add("GET", "/metrics", engine.prometheus)
    return app, engine


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sage.engines.transformers",
        description="OpenAI-compatible chat/completions engine over Hugging Face transformers "
        "for small models (concurrent requests are decoded together in one batch).",
    )
    parser.add_argument("--model", required=True, help="local folder or Hugging Face model id")
    parser.add_argument(
        "--served-model-name",
        dest="served_names",
        action="extend",
        nargs="+",
        default=[],
        metavar="NAME",
        help="name(s) clients use; the first is the primary (default: --model)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"]
    )
    parser.add_argument(
        "--max-model-len", type=int, default=0, help="context length (0: the model's own)"
    )
    parser.add_argument(
        "--max-tokens-default",
        type=int,
        default=0,
        help="max_tokens when a request gives none (0: up to the context length)",
    )
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=64,
        help="most sequences decoded together (1: one request at a time, the old engine)",
    )
    parser.add_argument(
        "--kv-budget-tokens",
        type=int,
        default=0,
        help="KV cache tokens the whole batch may hold, each sequence counted at prompt + "
        "max_tokens (0: the context length, which lifecycle reserves GPU memory for)",
    )
    parser.add_argument(
        "--waiting-served-ratio",
        type=float,
        default=0.3,
        help="while a batch runs, waiting requests join it once they are this share of it "
        "(or fill it, or have waited --max-waiting-steps): fewer, larger prefills",
    )
    parser.add_argument("--max-waiting-steps", type=int, default=20)
    parser.add_argument(
        "--kv-cache",
        default="auto",
        choices=KV_CACHE_MODES,
        help="decode over a preallocated KV cache of slots (CUDA graphs on CUDA) or the "
        "dynamic cache, padded and re-stacked as rows join and leave (auto: slots on CUDA)",
    )
    parser.add_argument(
        "--enforce-eager",
        action="store_true",
        help="no CUDA graphs: the slots' decode pass runs eagerly (as vLLM's flag)",
    )
    parser.add_argument(
        "--generation-in-process",
        action="store_true",
        help="step the model in a thread of the HTTP process instead of a generation process "
        "of its own (the layout before; for comparison and debugging)",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper
    )
    add_api_key_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Load the model, then serve until SIGTERM/SIGINT; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(None if argv is None else list(argv))
    if args.max_model_len < 0 or args.max_tokens_default < 0 or args.kv_budget_tokens < 0:
        parser.error("--max-model-len, --max-tokens-default and --kv-budget-tokens must be >= 0")
    if args.max_num_seqs < 1 or args.max_waiting_steps < 0 or args.waiting_served_ratio < 0:
        parser.error("--max-num-seqs must be >= 1, the waiting limits >= 0")
    configure_logging("transformers-engine", args.log_level)
    config = EngineConfig(
        model=args.model,
        served_names=tuple(args.served_names),
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_tokens_default=args.max_tokens_default,
        trust_remote_code=args.trust_remote_code,
        max_num_seqs=args.max_num_seqs,
        kv_budget_tokens=args.kv_budget_tokens,
        waiting_served_ratio=args.waiting_served_ratio,
        max_waiting_steps=args.max_waiting_steps,
        kv_cache=args.kv_cache,
        enforce_eager=args.enforce_eager,
    )
    try:
        if args.generation_in_process:
            model = CausalLM(config)
            model.warm_up()
            app, engine = _build(config, model)
        else:
            app, engine = _build(config, None, args.log_level)
    except ConfigurationError as exc:
        parser.exit(2, f"error: {exc.message}\n")
    facts = engine.facts
    code = serve_app(
        protect(app, resolve_api_key(args.api_key)),
        config.host,
        config.port,
        what="transformers engine",
        info={
            "model": config.names[0],
            "device": facts.device,
            "dtype": facts.dtype,
            "max_model_len": facts.max_model_len,
            "chat_template": "model" if engine.prompts.has_chat_template else "fallback",
            "warm_up_s": round(facts.warm_up_s, 3),
            "max_num_seqs": config.max_num_seqs,
            "batching": facts.can_batch,
            "decode": facts.decode,
            "generation_pid": engine.runner.pid,
        },
    )
    # Stopped because the generation process died: a crash to lifecycle (it restarts us).
    return 1 if engine.runner.died else code
