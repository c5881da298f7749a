"""AsyncUnifiedInferenceClient: the same client for asyncio code, on httpx.AsyncClient.

Same base URL precedence, defaults, retries and exceptions as UnifiedInferenceClient: both
build requests, decide retries and map errors in `sage.llm._core`; only this transport
loop is async. Every network call is a coroutine and `stream_chat` is an async iterator.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, overload

import httpx

from sage.common.exceptions import SageError, UpstreamError
from sage.common.grpc.tls import process_tls
from sage.llm._core import (
    ClientCore,
    Messages,
    StreamReader,
    chat_messages,
    embed_batches,
    generation_path,
    json_of,
    models_from_reply,
    rerank_body,
    rerank_from_reply,
    score_body,
    scores_from_reply,
    status_from_reply,
    text_from_reply,
    tokenize_body,
    tokens_from_reply,
    transport_error,
)
from sage.llm.client import UnifiedInferenceClient
from sage.llm.management import EngineKind
from sage.llm.result import InferenceResult, Kind, RerankResult, StreamState

__all__ = ["AsyncTextStream", "AsyncUnifiedInferenceClient"]


class AsyncTextStream(AsyncIterator[str]):
    """The text deltas of a streaming chat or completion, as an async iterator.

    From `stream_chat` the request goes out on the first `__anext__` (or `await
    stream.start()`); from `await chat(..., stream=True)` it has already been sent, so
    HTTP errors raise there. `result` is complete once iteration has ended.
    """

    def __init__(
        self,
        opener: Callable[[], Awaitable[tuple[httpx.Response, str]]],
        kind: Kind,
        model: Callable[[], Awaitable[str]],
        core: ClientCore[Any],
    ) -> None:
        self._opener = opener
        self._kind: Kind = kind
        self._model = model
        self._core = core
        self._response: httpx.Response | None = None
        self._state: StreamState | None = None
        self._reader: StreamReader | None = None
        self._lines: AsyncIterator[str] | None = None
        self._finished = False
        self._started = time.perf_counter()

    async def start(self) -> AsyncTextStream:
        """Send the request (once); raises the mapped error if the gateway refuses it."""
        if self._state is None:
            self._started = time.perf_counter()
            name = await self._model()
            self._response, request_id = await self._opener()
            self._state = StreamState(
                self._kind, request_id=request_id, model=name, started=self._started
            )
            self._reader = StreamReader(self._state)
            self._lines = self._response.aiter_lines()
        return self

    @property
    def request_id(self) -> str | None:
        """The gateway's x-request-id, once the request has been sent."""
        return self._state.request_id if self._state else None

    @property
    def result(self) -> InferenceResult:
        """What arrived so far; complete once iteration has ended."""
        if self._state is None:
            raise UpstreamError("the stream has not been started")
        return self._state.result()

    def __aiter__(self) -> AsyncTextStream:
        return self

    async def __anext__(self) -> str:
        if self._finished:
            raise StopAsyncIteration
        await self.start()
        assert self._state is not None and self._reader is not None  # set by start()
        while not self._finished:
            try:
                delta, more = self._reader.step(await self._next_line())
            except SageError:
                await self.aclose()
                raise
            if self._state.done or not more:
                await self.aclose()
            elif delta:
                return delta
        raise StopAsyncIteration

    async def _next_line(self) -> str | None:
        """The next line of the body; None once it has ended."""
        assert self._lines is not None  # set by start()
        try:
            return await self._lines.__anext__()
        except StopAsyncIteration:
            return None
        except httpx.TransportError as exc:
            raise transport_error(self._core.base_url, exc) from exc

    async def text(self) -> str:
        """Read the rest of the stream; returns the whole answer's text."""
        async for _ in self:
            pass
        return self.result.content

    async def aclose(self) -> None:
        """Stop reading and release the connection."""
        self._finished = True
        if self._state is not None:
            self._state.finish()
        if self._response is not None:
            await self._response.aclose()

    async def __aenter__(self) -> AsyncTextStream:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class AsyncUnifiedInferenceClient(ClientCore[httpx.AsyncClient]):
    """UnifiedInferenceClient for asyncio: chat, generate and embed through the gateway."""

    def _new_http(self) -> httpx.AsyncClient:
        # As the sync client: an https gateway is verified against SAGE_TLS_CA_FILE (and
        # gets our cert) when set.
        return httpx.AsyncClient(
            timeout=self.timeout, trust_env=False, verify=process_tls().httpx_verify()
        )

    @classmethod
    async def create_for_model(
        cls,
        model_id: str,
        *,
        control_plane_url: str | None = None,
        tensor_parallel_size: int = 1,
        required_memory_gb: float | None = None,
        auto_start: bool = True,
        prefer_existing: bool = True,
        wait_timeout: float = 600.0,
        engine_kind: EngineKind = "llm",
        backend: str = "auto",
        **create_kwargs: Any,
    ) -> AsyncUnifiedInferenceClient:
        """As UnifiedInferenceClient.create_for_model; the management polling runs in a
        worker thread, so the event loop keeps serving while an engine starts."""
        bound = "default_embedding_model" if engine_kind == "embedding" else "default_llm_model"
        create_kwargs[bound] = model_id
        client = cls.create(control_plane_url, **create_kwargs)

        def ensure() -> None:
            with UnifiedInferenceClient(
                client.base_url,
                api_key=client.api_key,
                admin_api_key=client.admin_api_key,
                timeout=client.timeout,
                max_retries=client.max_retries,
            ) as probe:
                probe._ensure_served(
                    model_id,
                    engine_kind=engine_kind,
                    backend=backend,
                    tensor_parallel_size=tensor_parallel_size,
                    required_memory_gb=required_memory_gb,
                    auto_start=auto_start,
                    prefer_existing=prefer_existing,
                    wait_timeout=wait_timeout,
                )

        try:
            await asyncio.to_thread(ensure)
        except BaseException:
            await client.close()
            raise
        return client

    async def __aenter__(self) -> AsyncUnifiedInferenceClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection pool (not a pool the caller passed in)."""
        if self._owns_http:
            await self._http.aclose()

    aclose = close

    # ---- transport

    async def _send(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        stream: bool = False,
        admin: bool = False,
        model: str | None = None,
        root: bool = False,
    ) -> tuple[httpx.Response, str]:
        """Send with retries; returns a 2xx response and its request id, or raises."""
        if self._needs_key_file(admin):
            # A file read (and a name lookup for a non-IP host): off the event loop.
            await asyncio.to_thread(self._management_key)
        call = self._exchange(method, path, body, admin, model, root)
        while True:
            request = self._http.build_request(
                method, call.url, content=call.content, headers=call.headers, timeout=self.timeout
            )
            try:
                resp = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                await asyncio.sleep(call.delay_after_transport(exc))
                continue
            if resp.status_code < 400:
                return resp, call.request_id_of(resp)
            try:
                raw = await resp.aread()
            except httpx.TransportError:
                raw = b""
            finally:
                await resp.aclose()
            await asyncio.sleep(call.delay_after_status(resp.status_code, raw, resp.headers))

    async def _get(self, path: str, *, admin: bool = False) -> Any:
        return json_of((await self._send("GET", path, admin=admin))[0])

    async def _model(self, kind: EngineKind, explicit: str | None) -> str:
        configured = self._configured_model(kind, explicit)
        if configured:
            return configured
        return self._pick_model(kind, await self.list_models())

    # ---- chat and completions

    def _stream(
        self, kind: Kind, payload: Any, model: str | None, params: Mapping[str, Any]
    ) -> AsyncTextStream:
        resolved: list[str] = []

        async def name() -> str:
            if not resolved:
                resolved.append(await self._model("llm", model))
            return resolved[0]

        async def opener() -> tuple[httpx.Response, str]:
            chosen = await name()
            body = self._body(kind, chosen, payload, True, params)
            with self._model_errors("llm", chosen):
                return await self._send(
                    "POST", generation_path(kind), body, stream=True, model=chosen
                )

        return AsyncTextStream(opener, kind, name, self)

    async def _generation(
        self,
        kind: Kind,
        payload: Any,
        model: str | None,
        return_result: bool,
        stream: bool,
        params: Mapping[str, Any],
    ) -> str | InferenceResult | AsyncTextStream:
        if stream:
            return await self._stream(kind, payload, model, params).start()
        started = time.perf_counter()
        name = await self._model("llm", model)
        body = self._body(kind, name, payload, False, params)
        with self._model_errors("llm", name):
            resp, request_id = await self._send("POST", generation_path(kind), body, model=name)
        return self._result(kind, resp, request_id, name, started, return_result)

    @overload
    async def chat(
        self,
        messages: Messages,
        model: str | None = None,
        *,
        return_result: Literal[False] = False,
        stream: Literal[False] = False,
        **params: Any,
    ) -> str: ...

    @overload
    async def chat(
        self,
        messages: Messages,
        model: str | None = None,
        *,
        return_result: Literal[True],
        stream: Literal[False] = False,
        **params: Any,
    ) -> InferenceResult: ...

    @overload
    async def chat(
        self,
        messages: Messages,
        model: str | None = None,
        *,
        return_result: bool = False,
        stream: Literal[True],
        **params: Any,
    ) -> AsyncTextStream: ...

    @overload
    async def chat(
        self,
        messages: Messages,
        model: str | None = None,
        *,
        return_result: bool = False,
        stream: bool = False,
        **params: Any,
    ) -> str | InferenceResult | AsyncTextStream: ...

    async def chat(
        self,
        messages: Messages,
        model: str | None = None,
        *,
        return_result: bool = False,
        stream: bool = False,
        **params: Any,
    ) -> str | InferenceResult | AsyncTextStream:
        """Send a chat; returns the text, an InferenceResult, or a started AsyncTextStream."""
        return await self._generation(
            "chat", chat_messages(messages), model, return_result, stream, params
        )

    def stream_chat(
        self, messages: Messages, model: str | None = None, **params: Any
    ) -> AsyncTextStream:
        """Stream a chat: `async for delta in client.stream_chat(...)`."""
        return self._stream("chat", chat_messages(messages), model, params)

    @overload
    async def generate(
        self,
        prompt: str,
        model: str | None = None,
        *,
        return_result: Literal[False] = False,
        stream: Literal[False] = False,
        **params: Any,
    ) -> str: ...

    @overload
    async def generate(
        self,
        prompt: str,
        model: str | None = None,
        *,
        return_result: Literal[True],
        stream: Literal[False] = False,
        **params: Any,
    ) -> InferenceResult: ...

    @overload
    async def generate(
        self,
        prompt: str,
        model: str | None = None,
        *,
        return_result: bool = False,
        stream: Literal[True],
        **params: Any,
    ) -> AsyncTextStream: ...

    @overload
    async def generate(
        self,
        prompt: str,
        model: str | None = None,
        *,
        return_result: bool = False,
        stream: bool = False,
        **params: Any,
    ) -> str | InferenceResult | AsyncTextStream: ...

    async def generate(
        self,
        prompt: str,
        model: str | None = None,
        *,
        return_result: bool = False,
        stream: bool = False,
        **params: Any,
    ) -> str | InferenceResult | AsyncTextStream:
        """Complete a raw prompt (`/v1/completions`); options as for `chat`."""
        return await self._generation("completion", prompt, model, return_result, stream, params)

    def stream_generate(
        self, prompt: str, model: str | None = None, **params: Any
    ) -> AsyncTextStream:
        """Stream a completion: `async for delta in client.stream_generate(...)`."""
        return self._stream("completion", prompt, model, params)

    # ---- embeddings, models, status

    async def embed(
        self, texts: str | Sequence[str], model: str | None = None
    ) -> list[list[float]]:
        """Embed one text or many; one vector per text, in input order (a str gives [vector])."""
        batches = embed_batches(texts)
        if not batches:
            return []
        name = await self._model("embedding", model)
        vectors: list[list[float]] = []
        for offset, batch in batches:
            with self._embedding_errors(name, offset):
                resp, _ = await self._send(
                    "POST", "/embeddings", {"model": name, "input": batch}, model=name
                )
            vectors.extend(self._vectors(resp, len(batch)))
        return vectors

    async def tokenize(
        self,
        text: Messages,
        model: str | None = None,
        *,
        add_special_tokens: bool | None = None,
    ) -> list[int]:
        """The token ids an engine of `model` gives a prompt (str) or a chat (messages,
        rendered by its chat template), through the gateway's /tokenize."""
        name = await self._model("llm", model)
        with self._model_errors("llm", name):
            resp, _ = await self._send(
                "POST",
                "/tokenize",
                tokenize_body(name, text, add_special_tokens),
                model=name,
                root=True,
            )
        return tokens_from_reply(json_of(resp))

    async def detokenize(self, tokens: Sequence[int], model: str | None = None) -> str:
        """The text of token ids by an engine of `model`, through the gateway's /detokenize."""
        name = await self._model("llm", model)
        with self._model_errors("llm", name):
            resp, _ = await self._send(
                "POST",
                "/detokenize",
                {"model": name, "tokens": list(tokens)},
                model=name,
                root=True,
            )
        return text_from_reply(json_of(resp))

    async def rerank(
        self,
        query: str,
        documents: Sequence[str],
        model: str | None = None,
        top_n: int | None = None,
    ) -> list[RerankResult]:
        """`documents` ranked by a cross-encoder engine of `model` (an embedding-kind
        model) for `query`, most relevant first, top_n of them (None or 0: all), through
        the gateway's /v1/rerank. `index` is the document's place in `documents`."""
        name = await self._model("embedding", model)
        with self._model_errors("embedding", name):
            resp, _ = await self._send(
                "POST", "/rerank", rerank_body(name, query, documents, top_n), model=name
            )
        return rerank_from_reply(json_of(resp))

    async def score(
        self,
        text_1: str | Sequence[str],
        text_2: str | Sequence[str],
        model: str | None = None,
    ) -> list[float]:
        """A cross-encoder engine's score of each text_1/text_2 pair (one text_1 against
        every text_2 when it is a str), in pair order, through the gateway's /score."""
        name = await self._model("embedding", model)
        with self._model_errors("embedding", name):
            resp, _ = await self._send(
                "POST", "/score", score_body(name, text_1, text_2), model=name, root=True
            )
        return scores_from_reply(json_of(resp))

    async def list_models(self) -> list[dict[str, Any]]:
        """Models the gateway serves (OpenAI model objects plus `kind` and `ready_engines`)."""
        return models_from_reply(await self._get("/models"))

    async def get_status(self) -> dict[str, Any]:
        """Control-plane status: `llm_available`, `embedding_available`, engines, GPUs."""
        return status_from_reply(await self._get("/management/status", admin=True), self.base_url)
