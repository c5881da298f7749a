"""UnifiedInferenceClient: one client for chat, generation and embeddings via the gateway.

Control-plane only, as the seed says: it talks to the SAGE gateway (the edge), never to
engines. The base URL is `control_plane_url` > `SAGE_UNIFIED_BASE_URL` >
`http://localhost:{SagePorts.GATEWAY_DEFAULT}/v1`; nothing else is probed (no port scan).

Defaults read from the environment (or `.env`) by `create()`: `SAGE_CHAT_MODEL`,
`SAGE_EMBEDDING_MODEL`, `SAGE_CHAT_API_KEY` (sent as the bearer key) and
`SAGE_ADMIN_API_KEY` (sent on `/v1/management/*` only; unset, the key file `sage llm serve`
wrote, $SAGE_HOME/llm/admin.key, for a gateway on this machine). `SAGE_CHAT_BASE_URL` and
`SAGE_EMBEDDING_BASE_URL` address engines directly; they are for `sage llm serve` and
local tools, and this client ignores them on purpose so every request is scheduled.

Failures raise `sage.common.exceptions` types. Refused connections, 429 (after
Retry-After, capped) and 502/503/504 are retried `max_retries` times with backoff; other
4xx never are, since the same request would fail the same way.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, Self, overload

import httpx

from sage.common.exceptions import SageError, UpstreamError
from sage.common.grpc.tls import process_tls
from sage.llm._core import (
    CONNECT_TIMEOUT_S,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT_S,
    EMBED_BATCH,
    MAX_RETRY_AFTER_S,
    ClientCore,
    ItemT,
    JsonCall,
    Messages,
    ResponsesInput,
    StreamReader,
    chat_messages,
    default_base_url,
    detokenize_call,
    embed_batches,
    generation_path,
    json_of,
    log,
    models_from_reply,
    rerank_call,
    responses_call,
    score_call,
    status_from_reply,
    tokenize_call,
    transport_error,
)
from sage.llm.management import EngineKind, ensure_model_served
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
    "CONNECT_TIMEOUT_S",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT_S",
    "EMBED_BATCH",
    "MAX_RETRY_AFTER_S",
    "Messages",
    "ResponseStream",
    "SseStream",
    "TextStream",
    "UnifiedInferenceClient",
    "default_base_url",
    "ensure_model_served",
]


class SseStream(Iterator[ItemT]):
    """The items of a streamed reply, read from its SSE body as they arrive.

    The request was sent (and HTTP errors raised) before this object exists; errors that
    arrive inside the stream raise while iterating. Close it (or use `with`) to stop early.
    """

    def __init__(
        self, response: httpx.Response, state: SseState[ItemT], core: ClientCore[Any]
    ) -> None:
        self._response = response
        self._core = core
        self._lines = response.iter_lines()
        self._reader = StreamReader(state)
        self._finished = False

    @property
    def request_id(self) -> str:
        """The gateway's x-request-id of this stream."""
        return self._reader.state.request_id

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> ItemT:
        state = self._reader.state
        while not self._finished:
            try:
                item, more = self._reader.step(self._next_line())
            except SageError:
                self.close()
                raise
            if state.done or not more:
                self.close()
            if item is not None:
                return item
        raise StopIteration

    def _next_line(self) -> str | None:
        """The next line of the body; None once it has ended."""
        try:
            return next(self._lines)
        except StopIteration:
            return None
        except httpx.TransportError as exc:
            raise transport_error(self._core.base_url, exc) from exc

    def close(self) -> None:
        """Stop reading and release the connection."""
        self._finished = True
        self._reader.state.finish()
        self._response.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class TextStream(SseStream[str]):
    """The text deltas of a streaming chat or completion, in order; after the last delta
    `result` holds the whole answer with usage and finish reason."""

    def __init__(self, response: httpx.Response, state: StreamState, core: ClientCore[Any]) -> None:
        super().__init__(response, state, core)
        self._state = state

    @property
    def result(self) -> InferenceResult:
        """What arrived so far; complete once iteration has ended."""
        return self._state.result()

    def text(self) -> str:
        """Read the rest of the stream; returns the whole answer's text."""
        for _ in self:
            pass
        return self._state.result().content


class ResponseStream(SseStream[ResponseEvent]):
    """The events of a streamed Responses reply, in order (the last one is
    response.completed, or .incomplete/.failed); `response` is the final Response object
    once it has arrived."""

    def __init__(
        self, response: httpx.Response, state: ResponsesStreamState, core: ClientCore[Any]
    ) -> None:
        super().__init__(response, state, core)
        self._state = state

    @property
    def response(self) -> ResponsesResult | None:
        """The final Response object; None until its event has been read."""
        return self._state.response

    @property
    def output_text(self) -> str:
        """The text deltas read so far, joined."""
        return self._state.output_text

    def until_done(self) -> ResponsesResult:
        """Read the rest of the stream; returns the final Response object."""
        for _ in self:
            pass
        if self._state.response is None:  # closed early by the caller
            raise UpstreamError("the Responses stream was closed before its final event")
        return self._state.response


class UnifiedInferenceClient(ClientCore[httpx.Client]):
    """Chat, generate and embed through the SAGE control plane (the gateway)."""

    def _new_http(self) -> httpx.Client:
        # An https gateway is verified against SAGE_TLS_CA_FILE (and gets our cert) when set.
        return httpx.Client(
            timeout=self.timeout, trust_env=False, verify=process_tls().httpx_verify()
        )

    @classmethod
    def create_for_model(
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
    ) -> UnifiedInferenceClient:
        """A client bound to `model_id`, after making sure the control plane serves it.

        A model the gateway already serves returns at once. Otherwise a RUNNING or
        STARTING engine for it is waited for (`prefer_existing`), or one is started through
        the management API (`auto_start`, progress in log lines) and waited for up to
        `wait_timeout` seconds; with `auto_start=False` a model nobody serves raises
        ModelNotFoundError. An engine still starting at the timeout keeps starting.
        """
        bound = "default_embedding_model" if engine_kind == "embedding" else "default_llm_model"
        create_kwargs[bound] = model_id
        client = cls.create(control_plane_url, **create_kwargs)
        try:
            client._ensure_served(
                model_id,
                engine_kind=engine_kind,
                backend=backend,
                tensor_parallel_size=tensor_parallel_size,
                required_memory_gb=required_memory_gb,
                auto_start=auto_start,
                prefer_existing=prefer_existing,
                wait_timeout=wait_timeout,
            )
        except BaseException:
            client.close()
            raise
        return client

    def _ensure_served(self, model_id: str, **options: Any) -> None:
        """Make sure the gateway serves `model_id` (management.ensure_model_served)."""
        ensure_model_served(
            self.base_url,
            model_id,
            list_models=self.list_models,
            admin_api_key=self.admin_api_key,
            logger=log,
            **options,
        )

    def __enter__(self) -> UnifiedInferenceClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool (not a pool the caller passed in)."""
        if self._owns_http:
            self._http.close()

    # ---- transport

    def _send(
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
        call = self._exchange(method, path, body, admin, model, root)
        while True:
            request = self._http.build_request(
                method, call.url, content=call.content, headers=call.headers, timeout=self.timeout
            )
            try:
                resp = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                time.sleep(call.delay_after_transport(exc))
                continue
            if resp.status_code < 400:
                return resp, call.request_id_of(resp)
            try:
                raw = resp.read()
            except httpx.TransportError:
                raw = b""
            finally:
                resp.close()
            time.sleep(call.delay_after_status(resp.status_code, raw, resp.headers))

    def _get(self, path: str, *, admin: bool = False) -> Any:
        return json_of(self._send("GET", path, admin=admin)[0])

    def _model(self, kind: EngineKind, explicit: str | None) -> str:
        return self._configured_model(kind, explicit) or self._pick_model(kind, self.list_models())

    # ---- chat and completions

    def _generation(
        self,
        kind: Kind,
        payload: Any,
        model: str | None,
        return_result: bool,
        stream: bool,
        params: Mapping[str, Any],
    ) -> str | InferenceResult | TextStream:
        started = time.perf_counter()
        name = self._model("llm", model)
        body = self._body(kind, name, payload, stream, params)
        with self._model_errors("llm", name):
            resp, request_id = self._send(
                "POST", generation_path(kind), body, stream=stream, model=name
            )
        if stream:
            state = StreamState(kind, request_id=request_id, model=name, started=started)
            return TextStream(resp, state, self)
        return self._result(kind, resp, request_id, name, started, return_result)

    @overload
    def chat(
        self,
        messages: Messages,
        model: str | None = None,
        *,
        return_result: Literal[False] = False,
        stream: Literal[False] = False,
        **params: Any,
    ) -> str: ...

    @overload
    def chat(
        self,
        messages: Messages,
        model: str | None = None,
        *,
        return_result: Literal[True],
        stream: Literal[False] = False,
        **params: Any,
    ) -> InferenceResult: ...

    @overload
    def chat(
        self,
        messages: Messages,
        model: str | None = None,
        *,
        return_result: bool = False,
        stream: Literal[True],
        **params: Any,
    ) -> TextStream: ...

    @overload
    def chat(
        self,
        messages: Messages,
        model: str | None = None,
        *,
        return_result: bool = False,
        stream: bool = False,
        **params: Any,
    ) -> str | InferenceResult | TextStream: ...

    def chat(
        self,
        messages: Messages,
        model: str | None = None,
        *,
        return_result: bool = False,
        stream: bool = False,
        **params: Any,
    ) -> str | InferenceResult | TextStream:
        """Send a chat; returns the assistant's text.

        `return_result=True` gives an InferenceResult; `stream=True` a TextStream of
        deltas (its `result` is filled once read). Other keyword arguments (temperature,
        max_tokens, stop, seed, ...) go into the request body as given.
        """
        return self._generation(
            "chat", chat_messages(messages), model, return_result, stream, params
        )

    def stream_chat(
        self, messages: Messages, model: str | None = None, **params: Any
    ) -> TextStream:
        """Stream a chat: an iterator of text deltas."""
        return self._open_stream("chat", chat_messages(messages), model, params)

    @overload
    def generate(
        self,
        prompt: str,
        model: str | None = None,
        *,
        return_result: Literal[False] = False,
        stream: Literal[False] = False,
        **params: Any,
    ) -> str: ...

    @overload
    def generate(
        self,
        prompt: str,
        model: str | None = None,
        *,
        return_result: Literal[True],
        stream: Literal[False] = False,
        **params: Any,
    ) -> InferenceResult: ...

    @overload
    def generate(
        self,
        prompt: str,
        model: str | None = None,
        *,
        return_result: bool = False,
        stream: Literal[True],
        **params: Any,
    ) -> TextStream: ...

    @overload
    def generate(
        self,
        prompt: str,
        model: str | None = None,
        *,
        return_result: bool = False,
        stream: bool = False,
        **params: Any,
    ) -> str | InferenceResult | TextStream: ...

    def generate(
        self,
        prompt: str,
        model: str | None = None,
        *,
        return_result: bool = False,
        stream: bool = False,
        **params: Any,
    ) -> str | InferenceResult | TextStream:
        """Complete a raw prompt (`/v1/completions`); options as for `chat`."""
        return self._generation("completion", prompt, model, return_result, stream, params)

    def stream_generate(self, prompt: str, model: str | None = None, **params: Any) -> TextStream:
        """Stream a completion: an iterator of text deltas."""
        return self._open_stream("completion", prompt, model, params)

    def _open_stream(
        self, kind: Kind, payload: Any, model: str | None, params: Mapping[str, Any]
    ) -> TextStream:
        stream = self._generation(kind, payload, model, False, True, params)
        assert isinstance(stream, TextStream)  # stream=True always gives one
        return stream

    # ---- embeddings, models, status

    def embed(self, texts: str | Sequence[str], model: str | None = None) -> list[list[float]]:
        """Embed one text or many; one vector per text, in input order (a str gives [vector])."""
        batches = embed_batches(texts)
        if not batches:
            return []
        name = self._model("embedding", model)
        vectors: list[list[float]] = []
        for offset, batch in batches:
            with self._embedding_errors(name, offset):
                resp, _ = self._send(
                    "POST", "/embeddings", {"model": name, "input": batch}, model=name
                )
            vectors.extend(self._vectors(resp, len(batch)))
        return vectors

    def _open(
        self, call: JsonCall[Any], model: str | None, stream: bool = False
    ) -> tuple[httpx.Response, str, str]:
        """Send `call` to the chosen model; returns the 2xx response, its request id and
        the model's name."""
        name = self._model(call.kind, model)
        with self._model_errors(call.kind, name):
            resp, request_id = self._send(
                "POST", call.path, call.body(name), stream=stream, model=name, root=call.root
            )
        return resp, request_id, name

    def _call(self, call: JsonCall[ItemT], model: str | None) -> ItemT:
        """Send `call`; returns its parsed reply."""
        return call.parse(json_of(self._open(call, model)[0]))

    def tokenize(
        self,
        text: Messages,
        model: str | None = None,
        *,
        add_special_tokens: bool | None = None,
    ) -> list[int]:
        """The token ids an engine of `model` gives a prompt (str) or a chat (messages,
        rendered by its chat template), through the gateway's /tokenize."""
        return self._call(tokenize_call(text, add_special_tokens), model)

    def detokenize(self, tokens: Sequence[int], model: str | None = None) -> str:
        """The text of token ids by an engine of `model`, through the gateway's /detokenize."""
        return self._call(detokenize_call(tokens), model)

    def rerank(
        self,
        query: str,
        documents: Sequence[str],
        model: str | None = None,
        top_n: int | None = None,
    ) -> list[RerankResult]:
        """`documents` ranked by a cross-encoder engine of `model` (an embedding-kind
        model) for `query`, most relevant first, top_n of them (None or 0: all), through
        the gateway's /v1/rerank. `index` is the document's place in `documents`."""
        return self._call(rerank_call(query, documents, top_n), model)

    def score(
        self,
        text_1: str | Sequence[str],
        text_2: str | Sequence[str],
        model: str | None = None,
    ) -> list[float]:
        """A cross-encoder engine's score of each text_1/text_2 pair (one text_1 against
        every text_2 when it is a str), in pair order, through the gateway's /score."""
        return self._call(score_call(text_1, text_2), model)

    @overload
    def responses(
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
    def responses(
        self,
        input: ResponsesInput,
        model: str | None = None,
        *,
        instructions: str | None = None,
        max_output_tokens: int | None = None,
        temperature: float | None = None,
        stream: Literal[True],
        **params: Any,
    ) -> ResponseStream: ...

    def responses(
        self,
        input: ResponsesInput,
        model: str | None = None,
        *,
        instructions: str | None = None,
        max_output_tokens: int | None = None,
        temperature: float | None = None,
        stream: bool = False,
        **params: Any,
    ) -> ResponsesResult | ResponseStream:
        """OpenAI's Responses API through the gateway's /v1/responses: `input` is text or a
        list of input items (messages, tool output). Returns the Response object
        (`output_text`, `status`, `usage`); `stream=True` a ResponseStream of its events.
        Other keyword arguments (top_p, metadata, tools, ...) go into the body as given.
        An engine that does not serve the Responses API is a NotFoundError naming it."""
        call = responses_call(
            input,
            instructions=instructions,
            max_output_tokens=max_output_tokens,
            temperature=temperature,
            stream=stream,
            params=params,
        )
        if not stream:
            return self._call(call, model)
        resp, request_id, name = self._open(call, model, stream=True)
        return ResponseStream(resp, ResponsesStreamState(request_id=request_id, model=name), self)

    def list_models(self) -> list[dict[str, Any]]:
        """Models the gateway serves (OpenAI model objects plus `kind` and `ready_engines`)."""
        return models_from_reply(self._get("/models"))

    def get_status(self) -> dict[str, Any]:
        """Control-plane status: `llm_available`, `embedding_available`, engines, GPUs."""
        return status_from_reply(self._get("/management/status", admin=True), self.base_url)
