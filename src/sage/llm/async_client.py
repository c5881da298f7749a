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
from typing import Any, Generic, Literal, Self, TypeVar, cast, overload

import httpx

from sage.common.exceptions import SageError, UpstreamError
from sage.common.grpc.tls import process_tls
from sage.llm._core import (
    ClientCore,
    ItemT,
    JsonCall,
    Messages,
    ResponsesInput,
    StreamReader,
    chat_messages,
    detokenize_call,
    embed_batches,
    generation_path,
    json_of,
    models_from_reply,
    rerank_call,
    responses_call,
    score_call,
    status_from_reply,
    tokenize_call,
    transport_error,
)
from sage.llm.client import UnifiedInferenceClient
from sage.llm.management import EngineKind
from sage.llm.result import (
    InferenceResult,
    Kind,
    RerankResult,
    ResponseEvent,
    ResponsesResult,
    ResponsesStreamState,
    SseState,
    StreamState,
)

__all__ = [
    "AsyncResponseStream",
    "AsyncSseStream",
    "AsyncTextStream",
    "AsyncUnifiedInferenceClient",
]

# The state a stream accumulates: a chat's or completion's, or a Responses reply's.
StateT = TypeVar("StateT", StreamState, ResponsesStreamState)


# Opens a stream: sends the request, returns the 2xx response, its request id, the model.
Opener = Callable[[], Awaitable[tuple[httpx.Response, str, str]]]


class AsyncSseStream(AsyncIterator[ItemT], Generic[ItemT, StateT]):
    """The items of a streamed reply as an async iterator, read from its SSE body.

    The request goes out on the first `__anext__` (or `await stream.start()`) unless it
    was started already; HTTP errors raise there, errors inside the stream while iterating.
    """

    def __init__(
        self, opener: Opener, new_state: Callable[[str, str, float], StateT], base_url: str
    ) -> None:
        self._opener = opener
        self._new_state: Callable[[str, str, float], StateT] = new_state
        self._response: httpx.Response | None = None
        self._state: StateT | None = None
        self._reader: StreamReader[ItemT] | None = None
        self._lines: AsyncIterator[str] | None = None
        self._base_url = base_url
        self._finished = False

    async def start(self) -> Self:
        """Send the request (once); raises the mapped error if the gateway refuses it."""
        if self._state is None:
            started = time.perf_counter()
            self._response, request_id, name = await self._opener()
            self._state = self._new_state(request_id, name, started)
            # StateT is one of the two states; each is the SseState of its subclass's ItemT.
            self._reader = StreamReader(cast("SseState[ItemT]", self._state))
            self._lines = self._response.aiter_lines()
        return self

    @property
    def request_id(self) -> str | None:
        """The gateway's x-request-id, once the request has been sent."""
        return self._state.request_id if self._state else None

    def _started(self) -> StateT:
        if self._state is None:
            raise UpstreamError("the stream has not been started")
        return self._state

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> ItemT:
        if self._finished:
            raise StopAsyncIteration
        await self.start()
        assert self._state is not None and self._reader is not None  # set by start()
        while not self._finished:
            try:
                item, more = self._reader.step(await self._next_line())
            except SageError:
                await self.aclose()
                raise
            if self._state.done or not more:
                await self.aclose()
            if item is not None:
                return item
        raise StopAsyncIteration

    async def _next_line(self) -> str | None:
        """The next line of the body; None once it has ended."""
        assert self._lines is not None  # set by start()
        try:
            return await self._lines.__anext__()
        except StopAsyncIteration:
            return None
        except httpx.TransportError as exc:
            raise transport_error(self._base_url, exc) from exc

    async def aclose(self) -> None:
        """Stop reading and release the connection."""
        self._finished = True
        if self._state is not None:
            self._state.finish()
        if self._response is not None:
            await self._response.aclose()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class AsyncTextStream(AsyncSseStream[str, StreamState]):
    """The text deltas of a streaming chat or completion, as an async iterator.

    From `stream_chat` the request goes out on the first `__anext__` (or `await
    stream.start()`); from `await chat(..., stream=True)` it has already been sent, so
    HTTP errors raise there. `result` is complete once iteration has ended.
    """

    def __init__(self, opener: Opener, kind: Kind, base_url: str) -> None:
        super().__init__(
            opener,
            lambda request_id, name, started: StreamState(
                kind, request_id=request_id, model=name, started=started
            ),
            base_url,
        )

    @property
    def result(self) -> InferenceResult:
        """What arrived so far; complete once iteration has ended."""
        return self._started().result()

    async def text(self) -> str:
        """Read the rest of the stream; returns the whole answer's text."""
        async for _ in self:
            pass
        return self.result.content


class AsyncResponseStream(AsyncSseStream[ResponseEvent, ResponsesStreamState]):
    """The events of a streamed Responses reply as an async iterator (started by
    `await client.responses(..., stream=True)`); `response` is the final Response object
    once its event has been read."""

    def __init__(self, opener: Opener, base_url: str) -> None:
        super().__init__(
            opener,
            lambda request_id, name, _started: ResponsesStreamState(
                request_id=request_id, model=name
            ),
            base_url,
        )

    @property
    def response(self) -> ResponsesResult | None:
        """The final Response object; None until its event has been read."""
        return self._started().response

    @property
    def output_text(self) -> str:
        """The text deltas read so far, joined."""
        return self._started().output_text

    async def until_done(self) -> ResponsesResult:
        """Read the rest of the stream; returns the final Response object."""
        async for _ in self:
            pass
        final = self._started().response
        if final is None:  # closed early by the caller
            raise UpstreamError("the Responses stream was closed before its final event")
        return final


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
        async def opener() -> tuple[httpx.Response, str, str]:
            name = await self._model("llm", model)
            body = self._body(kind, name, payload, True, params)
            with self._model_errors("llm", name):
                resp, request_id = await self._send(
                    "POST", generation_path(kind), body, stream=True, model=name
                )
            return resp, request_id, name

        return AsyncTextStream(opener, kind, self.base_url)

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

    async def _open(
        self, call: JsonCall[Any], model: str | None, stream: bool = False
    ) -> tuple[httpx.Response, str, str]:
        """Send `call` to the chosen model; returns the 2xx response, its request id and
        the model's name."""
        name = await self._model(call.kind, model)
        with self._model_errors(call.kind, name):
            resp, request_id = await self._send(
                "POST", call.path, call.body(name), stream=stream, model=name, root=call.root
            )
        return resp, request_id, name

    async def _call(self, call: JsonCall[ItemT], model: str | None) -> ItemT:
        """Send `call`; returns its parsed reply."""
        resp, _, _ = await self._open(call, model)
        return call.parse(json_of(resp))

    async def tokenize(
        self,
        text: Messages,
        model: str | None = None,
        *,
        add_special_tokens: bool | None = None,
    ) -> list[int]:
        """The token ids an engine of `model` gives a prompt (str) or a chat (messages,
        rendered by its chat template), through the gateway's /tokenize."""
        return await self._call(tokenize_call(text, add_special_tokens), model)

    async def detokenize(self, tokens: Sequence[int], model: str | None = None) -> str:
        """The text of token ids by an engine of `model`, through the gateway's /detokenize."""
        return await self._call(detokenize_call(tokens), model)

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
        return await self._call(rerank_call(query, documents, top_n), model)

    async def score(
        self,
        text_1: str | Sequence[str],
        text_2: str | Sequence[str],
        model: str | None = None,
    ) -> list[float]:
        """A cross-encoder engine's score of each text_1/text_2 pair (one text_1 against
        every text_2 when it is a str), in pair order, through the gateway's /score."""
        return await self._call(score_call(text_1, text_2), model)

    @overload
    async def responses(
        self,
        input: ResponsesInput,
        model: str | None = None,
        *,
        instructions: str | None = None,
        max_output_tokens: int | None = None,
        temperature: float | None = None,
        stream: Literal[False] = False,
        **params: Any,
    ) -> ResponsesResult: ...

    @overload
    async def responses(
        self,
        input: ResponsesInput,
        model: str | None = None,
        *,
        instructions: str | None = None,
        max_output_tokens: int | None = None,
        temperature: float | None = None,
        stream: Literal[True],
        **params: Any,
    ) -> AsyncResponseStream: ...

    async def responses(
        self,
        input: ResponsesInput,
        model: str | None = None,
        *,
        instructions: str | None = None,
        max_output_tokens: int | None = None,
        temperature: float | None = None,
        stream: bool = False,
        **params: Any,
    ) -> ResponsesResult | AsyncResponseStream:
        """As UnifiedInferenceClient.responses; `stream=True` gives a started
        AsyncResponseStream (`async for event in stream`)."""
        call = responses_call(
            input,
            instructions=instructions,
            max_output_tokens=max_output_tokens,
            temperature=temperature,
            stream=stream,
            params=params,
        )
        if not stream:
            return await self._call(call, model)
        return await AsyncResponseStream(
            lambda: self._open(call, model, stream=True), self.base_url
        ).start()

    async def list_models(self) -> list[dict[str, Any]]:
        """Models the gateway serves (OpenAI model objects plus `kind` and `ready_engines`)."""
        return models_from_reply(await self._get("/models"))

    async def get_status(self) -> dict[str, Any]:
        """Control-plane status: `llm_available`, `embedding_available`, engines, GPUs."""
        return status_from_reply(await self._get("/management/status", admin=True), self.base_url)
