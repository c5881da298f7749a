"""AsyncUnifiedInferenceClient: the same client for asyncio code, on httpx.AsyncClient.

Same base URL precedence, defaults, retries and exceptions as UnifiedInferenceClient (the
request building and error mapping are shared); every network call is a coroutine and
`stream_chat` is an async iterator.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, overload

import httpx

from sage.common.exceptions import ModelNotFoundError, SageError, UpstreamError
from sage.llm.client import (
    _RETRY_TRANSPORT,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT_S,
    EMBED_BATCH,
    EngineKind,
    Messages,
    UnifiedInferenceClient,
    _ClientCore,
    _encode,
    _messages,
    _settings,
    _shift_input_param,
    default_base_url,
    ensure_model_served,
)
from sage.llm.result import (
    InferenceResult,
    Kind,
    SseDecoder,
    StreamState,
    result_from_reply,
    vectors_from_reply,
)

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
        core: _ClientCore,
    ) -> None:
        self._opener = opener
        self._kind: Kind = kind
        self._model = model
        self._core = core
        self._response: httpx.Response | None = None
        self._state: StreamState | None = None
        self._lines: AsyncIterator[str] | None = None
        self._decoder = SseDecoder()
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
        assert self._state is not None  # set by start()
        while not self._finished:
            data = await self._next_event()
            if data is None:
                continue
            try:
                delta = self._state.event(data)
            except SageError:
                await self.aclose()
                raise
            if self._state.done:
                await self.aclose()
            elif delta:
                return delta
        raise StopAsyncIteration

    async def _next_event(self) -> str | None:
        assert self._response is not None and self._state is not None
        if self._lines is None:
            self._lines = self._response.aiter_lines()
        try:
            line = await self._lines.__anext__()
        except StopAsyncIteration:
            data = self._decoder.flush()
            if data is not None:
                return data
            await self.aclose()
            if not self._state.done and self._state.finish_reason is None:
                raise UpstreamError("the stream ended before [DONE]") from None
            return None
        except httpx.TransportError as exc:
            await self.aclose()
            raise self._core._transport_error(exc) from exc
        return self._decoder.feed(line)

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


class AsyncUnifiedInferenceClient(_ClientCore):
    """UnifiedInferenceClient for asyncio: chat, generate and embed through the gateway."""

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        embedding_model: str | None = None,
        api_key: str | None = None,
        admin_api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
        default_headers: Mapping[str, str] | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(
            base_url,
            model=model,
            embedding_model=embedding_model,
            api_key=api_key,
            admin_api_key=admin_api_key,
            timeout=timeout,
            max_retries=max_retries,
            default_headers=default_headers,
        )
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=self.timeout, trust_env=False)

    @classmethod
    def create(
        cls,
        control_plane_url: str | None = None,
        *,
        default_llm_model: str | None = None,
        default_embedding_model: str | None = None,
        model: str | None = None,
        embedding_model: str | None = None,
        api_key: str | None = None,
        admin_api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
        default_headers: Mapping[str, str] | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> AsyncUnifiedInferenceClient:
        """As UnifiedInferenceClient.create (no I/O happens here, so it is not async)."""
        settings = _settings()
        return cls(
            default_base_url(control_plane_url, settings),
            model=default_llm_model or model or settings.chat_model or None,
            embedding_model=default_embedding_model
            or embedding_model
            or settings.embedding_model
            or None,
            api_key=api_key or settings.chat_api_key or None,
            admin_api_key=admin_api_key or settings.admin_api_key or None,
            timeout=timeout,
            max_retries=max_retries,
            default_headers=default_headers,
            http_client=http_client,
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
                ensure_model_served(
                    probe.base_url,
                    model_id,
                    list_models=probe.list_models,
                    admin_api_key=probe.admin_api_key,
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
    ) -> tuple[httpx.Response, str]:
        """Send with retries; returns a 2xx response and its request id, or raises."""
        request_id = uuid.uuid4().hex
        content = _encode(body) if body is not None else None
        if admin and not self.admin_api_key and not self._file_admin_key_read:
            # A file read (and a name lookup for a non-IP host): off the event loop.
            await asyncio.to_thread(self._management_key)
        headers = self._headers(request_id, admin=admin, json=content is not None)
        attempt = 0
        while True:
            request = self._http.build_request(
                method, self._url(path), content=content, headers=headers, timeout=self.timeout
            )
            try:
                resp = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                error = self._transport_error(exc)
                if attempt >= self.max_retries or not isinstance(exc, _RETRY_TRANSPORT):
                    raise error from exc
                delay = self._backoff(attempt)
                self._log_retry(type(exc).__name__, path, attempt, delay)
                await asyncio.sleep(delay)
                attempt += 1
                continue
            if resp.status_code < 400:
                return resp, resp.headers.get("x-request-id") or request_id
            try:
                raw = await resp.aread()
            except httpx.TransportError:
                raw = b""
            finally:
                await resp.aclose()
            error = self._http_error(resp.status_code, raw, resp.headers, model)
            retry_in = self._retry_delay(resp.status_code, error, attempt)
            if retry_in is None:
                raise error
            self._log_retry(f"HTTP {resp.status_code}", path, attempt, retry_in)
            await asyncio.sleep(retry_in)
            attempt += 1

    async def _call(
        self, method: str, path: str, body: Mapping[str, Any] | None = None, **kw: Any
    ) -> tuple[Any, str]:
        resp, request_id = await self._send(method, path, body, **kw)
        return self._json(resp), request_id

    async def _model(self, kind: EngineKind, explicit: str | None) -> str:
        configured = self._configured_model(kind, explicit)
        if configured:
            return configured
        return self._pick_model(kind, await self.list_models())

    # ---- chat and completions

    def _stream(
        self, kind: Kind, payload: Any, model: str | None, params: Mapping[str, Any]
    ) -> AsyncTextStream:
        path = "/chat/completions" if kind == "chat" else "/completions"
        resolved: list[str] = []

        async def name() -> str:
            if not resolved:
                resolved.append(await self._model("llm", model))
            return resolved[0]

        async def opener() -> tuple[httpx.Response, str]:
            chosen = await name()
            body = self._body(kind, chosen, payload, True, params)
            try:
                return await self._send("POST", path, body, stream=True, model=chosen)
            except ModelNotFoundError:
                self._forget_auto_model("llm", chosen)
                raise

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
        path = "/chat/completions" if kind == "chat" else "/completions"
        try:
            reply, request_id = await self._call("POST", path, body, model=name)
        except ModelNotFoundError:
            self._forget_auto_model("llm", name)
            raise
        result = result_from_reply(kind, reply, request_id=request_id, model=name, started=started)
        return result if return_result else result.content

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
            "chat", _messages(messages), model, return_result, stream, params
        )

    def stream_chat(
        self, messages: Messages, model: str | None = None, **params: Any
    ) -> AsyncTextStream:
        """Stream a chat: `async for delta in client.stream_chat(...)`."""
        return self._stream("chat", _messages(messages), model, params)

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
        inputs = [texts] if isinstance(texts, str) else list(texts)
        if not inputs:
            return []
        name = await self._model("embedding", model)
        vectors: list[list[float]] = []
        for offset in range(0, len(inputs), EMBED_BATCH):
            batch = inputs[offset : offset + EMBED_BATCH]
            try:
                reply, _ = await self._call(
                    "POST", "/embeddings", {"model": name, "input": batch}, model=name
                )
            except ModelNotFoundError:
                self._forget_auto_model("embedding", name)
                raise
            except SageError as exc:
                _shift_input_param(exc, offset)
                raise
            vectors.extend(vectors_from_reply(reply, len(batch)))
        return vectors

    async def list_models(self) -> list[dict[str, Any]]:
        """Models the gateway serves (OpenAI model objects plus `kind` and `ready_engines`)."""
        reply, _ = await self._call("GET", "/models")
        return [dict(m) for m in reply.get("data", [])]

    async def get_status(self) -> dict[str, Any]:
        """Control-plane status: `llm_available`, `embedding_available`, engines, GPUs."""
        reply, _ = await self._call("GET", "/management/status", admin=True)
        status = dict(reply)
        status.setdefault("llm_available", False)
        status.setdefault("embedding_available", False)
        status["base_url"] = self.base_url
        return status
