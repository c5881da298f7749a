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

import logging
import math
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, overload
from urllib.parse import urlsplit

import httpx
import orjson
import pydantic

from sage.common.config.ports import SagePorts
from sage.common.config.settings import SageSettings, load_settings
from sage.common.exceptions import (
    ConfigurationError,
    DeadlineExceededError,
    EngineStartError,
    InvalidRequestError,
    ModelNotFoundError,
    SageError,
    ServiceUnavailableError,
    UpstreamError,
)
from sage.common.grpc.tls import process_tls
from sage.llm.management import EngineInfo, ManagementClient, admin_key_for
from sage.llm.result import (
    InferenceResult,
    Kind,
    SseDecoder,
    StreamState,
    error_from_payload,
    parse_retry_after,
    result_from_reply,
    vectors_from_reply,
)

__all__ = [
    "CONNECT_TIMEOUT_S",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT_S",
    "MAX_RETRY_AFTER_S",
    "Messages",
    "TextStream",
    "UnifiedInferenceClient",
    "default_base_url",
    "ensure_model_served",
]

log = logging.getLogger(__name__)

# A generation may legitimately take minutes; connecting may not.
DEFAULT_TIMEOUT_S = 600.0
CONNECT_TIMEOUT_S = 10.0
DEFAULT_MAX_RETRIES = 2
# Longest wait a Retry-After may impose between two attempts.
MAX_RETRY_AFTER_S = 60.0
_BACKOFF_BASE_S = 0.5
_BACKOFF_MAX_S = 8.0
_RETRY_STATUSES = frozenset({429, 502, 503, 504})
# Transport failures where the gateway surely did not finish the request.
_RETRY_TRANSPORT: tuple[type[httpx.TransportError], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.RemoteProtocolError,
    httpx.ReadError,
    httpx.WriteError,
)
# The edge's per-request input cap; longer lists go out in several requests.
EMBED_BATCH = 2048
_INPUT_PARAM = re.compile(r"input\[(\d+)\]")

Messages = str | Sequence[Mapping[str, Any]]
EngineKind = Literal["llm", "embedding"]


def _settings() -> SageSettings:
    try:
        return load_settings()
    except pydantic.ValidationError as exc:
        raise ConfigurationError(f"invalid SAGE_* setting: {exc}") from exc


def _normalise_url(url: str) -> str:
    """Strip the trailing slash; a bare gateway root gets `/v1` (users paste either)."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        raise ConfigurationError(f"control plane URL must be http(s)://host:port/v1, got {url!r}")
    return url + "/v1" if parts.path in ("", "/") else url


def default_base_url(
    control_plane_url: str | None = None, settings: SageSettings | None = None
) -> str:
    """The gateway URL by the seed's precedence: argument > SAGE_UNIFIED_BASE_URL > default."""
    if control_plane_url:
        return _normalise_url(control_plane_url)
    env = (settings or _settings()).unified_base_url
    if env:
        return _normalise_url(env)
    scheme = "https" if process_tls().dials_tls else "http"
    return f"{scheme}://localhost:{SagePorts.GATEWAY_DEFAULT}/v1"


def _encode(body: Mapping[str, Any]) -> bytes:
    try:
        return orjson.dumps(body)
    except TypeError as exc:
        raise InvalidRequestError(f"the request is not JSON-serialisable: {exc}") from exc


def _messages(messages: Messages) -> list[Any]:
    if isinstance(messages, str):  # a bare prompt is one user turn
        return [{"role": "user", "content": messages}]
    return [dict(m) if isinstance(m, Mapping) else m for m in messages]


def _served(models: Sequence[Mapping[str, Any]], model_id: str, kind: str) -> bool:
    """Whether /v1/models lists `model_id` of `kind` with a ready engine."""
    return any(
        entry.get("id") == model_id
        and entry.get("kind", "llm") == kind
        and (entry.get("ready_engines") is None or int(entry.get("ready_engines") or 0) > 0)
        for entry in models
    )


class _ClientCore:
    """Configuration, request building and retry decisions shared by both clients."""

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
    ) -> None:
        if max_retries < 0:
            raise ConfigurationError(f"max_retries must be >= 0, got {max_retries}")
        self.base_url = _normalise_url(base_url)
        self.model = model
        self.embedding_model = embedding_model
        self.api_key = api_key
        self.admin_api_key = admin_api_key
        # The key file is read on the first management call, not here: a client that only
        # chats never touches it.
        self._file_admin_key: str | None = None
        self._file_admin_key_read = False
        self.max_retries = max_retries
        self.timeout = (
            timeout
            if isinstance(timeout, httpx.Timeout)
            else httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT_S))
        )
        self._default_headers = {"user-agent": "sage-unified-client", **(default_headers or {})}
        # Models picked from /v1/models when none was configured, per kind.
        self._auto_model: dict[str, str] = {}

    @property
    def default_llm_model(self) -> str | None:
        """The chat/generate model used when a call names none (alias of `model`)."""
        return self.model

    @property
    def default_embedding_model(self) -> str | None:
        """The embedding model used when a call names none (alias of `embedding_model`)."""
        return self.embedding_model

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r})"

    def _url(self, path: str) -> str:
        return self.base_url + path

    def _management_key(self) -> str | None:
        """The admin key for /v1/management/*: the one given (or SAGE_ADMIN_API_KEY via
        `create`), else the local stack's key file, looked up once."""
        if self.admin_api_key:
            return self.admin_api_key
        if not self._file_admin_key_read:
            self._file_admin_key = admin_key_for(self.base_url, _settings())
            # Found: kept. Not found (no file yet, or no gateway of ours listening yet):
            # looked up again on the next management call, e.g. once serve is up.
            self._file_admin_key_read = self._file_admin_key is not None
        return self._file_admin_key

    def _headers(self, request_id: str, *, admin: bool, json: bool) -> dict[str, str]:
        headers = {**self._default_headers, "x-request-id": request_id}
        # The admin key goes to management routes only, never with an inference request.
        key = (self._management_key() or self.api_key) if admin else self.api_key
        if key:
            headers["authorization"] = f"Bearer {key}"
        if json:
            headers["content-type"] = "application/json"
        return headers

    def _configured_model(self, kind: EngineKind, explicit: str | None) -> str | None:
        if explicit:
            return explicit
        wanted = self.model if kind == "llm" else self.embedding_model
        return wanted or self._auto_model.get(kind)

    def _pick_model(self, kind: EngineKind, models: Sequence[Mapping[str, Any]]) -> str:
        for entry in models:
            if _served([entry], str(entry.get("id")), kind):
                self._auto_model[kind] = str(entry["id"])
                return self._auto_model[kind]
        raise ModelNotFoundError(
            "model",
            message=f"the gateway at {self.base_url} serves no ready {kind} model; pass model=, "
            f"set SAGE_{'CHAT' if kind == 'llm' else 'EMBEDDING'}_MODEL or start an engine "
            "(`sage llm engine start MODEL`)",
        )

    def _forget_auto_model(self, kind: EngineKind, name: str) -> None:
        """A picked model that vanished is picked again on the next call."""
        if self._auto_model.get(kind) == name:
            del self._auto_model[kind]

    @staticmethod
    def _body(
        kind: Kind, model: str, payload: Any, stream: bool, params: Mapping[str, Any]
    ) -> dict[str, Any]:
        # Only None means "not given": temperature=0, top_p=0, n=0 ... are sent as given.
        body = {key: value for key, value in params.items() if value is not None}
        body["model"] = model
        body["messages" if kind == "chat" else "prompt"] = payload
        if stream:
            body["stream"] = True
            # Usage arrives in a last chunk, so stream results carry token counts too.
            body.setdefault("stream_options", {"include_usage": True})
        return body

    def _backoff(self, attempt: int) -> float:
        delay = min(_BACKOFF_MAX_S, _BACKOFF_BASE_S * 2.0**attempt)
        return delay * (0.75 + random.random() / 4)  # jitter spreads retrying clients

    def _retry_delay(self, status: int, error: SageError, attempt: int) -> float | None:
        """Seconds to wait before retrying a failed status, or None to give up now."""
        if attempt >= self.max_retries or status not in _RETRY_STATUSES:
            return None
        if error.retry_after is not None:
            return min(error.retry_after, MAX_RETRY_AFTER_S)
        return self._backoff(attempt)

    def _http_error(
        self, status: int, content: bytes, headers: httpx.Headers, model: str | None
    ) -> SageError:
        try:
            payload = orjson.loads(content) if content else None
        except orjson.JSONDecodeError:
            payload = None
        return error_from_payload(
            status,
            payload,
            text=content.decode("utf-8", "replace"),
            retry_after=parse_retry_after(headers.get("retry-after")),
            model=model,
        )

    def _transport_error(self, exc: httpx.TransportError) -> SageError:
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return ServiceUnavailableError(
                f"no SAGE gateway answers at {self.base_url} ({exc or type(exc).__name__}); "
                "start one with `sage llm serve` or set SAGE_UNIFIED_BASE_URL"
            )
        if isinstance(exc, httpx.TimeoutException):
            return DeadlineExceededError(
                f"the gateway at {self.base_url} did not answer in time ({type(exc).__name__})"
            )
        return UpstreamError(f"the connection to the gateway at {self.base_url} broke: {exc!r}")

    @staticmethod
    def _json(resp: httpx.Response) -> Any:
        try:
            return orjson.loads(resp.content)
        except orjson.JSONDecodeError as exc:
            raise UpstreamError(
                f"the gateway sent non-JSON for {resp.request.method} {resp.request.url.path}"
            ) from exc

    def _log_retry(self, what: str, path: str, attempt: int, delay: float) -> None:
        log.warning(
            "retrying %s %s after %s (attempt %d of %d) in %.2fs",
            path,
            self.base_url,
            what,
            attempt + 1,
            self.max_retries,
            delay,
        )


def _shift_input_param(error: SageError, offset: int) -> None:
    """Renumber an `input[i]` param of a later embedding batch to the caller's list."""
    match = _INPUT_PARAM.fullmatch(error.param or "")
    if offset and match:
        error.param = f"input[{int(match.group(1)) + offset}]"


class TextStream(Iterator[str]):
    """The text deltas of a streaming chat or completion, in order.

    The request was sent (and HTTP errors raised) before this object exists; errors that
    arrive inside the stream raise while iterating. After the last delta `result` holds
    the whole answer with usage and finish reason. Close it (or use `with`) to stop early.
    """

    def __init__(self, response: httpx.Response, state: StreamState, core: _ClientCore) -> None:
        self._response = response
        self._state = state
        self._core = core
        self._lines: Iterator[str] | None = None
        self._decoder = SseDecoder()
        self._finished = False

    @property
    def request_id(self) -> str:
        """The gateway's x-request-id of this stream."""
        return self._state.request_id

    @property
    def result(self) -> InferenceResult:
        """What arrived so far; complete once iteration has ended."""
        return self._state.result()

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        while not self._finished:
            data = self._next_event()
            if data is None:
                continue
            try:
                delta = self._state.event(data)
            except SageError:
                self.close()
                raise
            if self._state.done:
                self.close()
            elif delta:
                return delta
        raise StopIteration

    def _next_event(self) -> str | None:
        if self._lines is None:
            self._lines = self._response.iter_lines()
        try:
            line = next(self._lines)
        except StopIteration:
            data = self._decoder.flush()
            if data is not None:
                return data
            self.close()
            if not self._state.done and self._state.finish_reason is None:
                raise UpstreamError("the stream ended before [DONE]") from None
            return None
        except httpx.TransportError as exc:
            self.close()
            raise self._core._transport_error(exc) from exc
        return self._decoder.feed(line)

    def text(self) -> str:
        """Read the rest of the stream; returns the whole answer's text."""
        for _ in self:
            pass
        return self._state.result().content

    def close(self) -> None:
        """Stop reading and release the connection."""
        self._finished = True
        self._state.finish()
        self._response.close()

    def __enter__(self) -> TextStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class UnifiedInferenceClient(_ClientCore):
    """Chat, generate and embed through the SAGE control plane (the gateway)."""

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
        http_client: httpx.Client | None = None,
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
        # A caller's client (proxies, event hooks, mounts) is used as is and left open.
        self._owns_http = http_client is None
        # An https gateway is verified against SAGE_TLS_CA_FILE (and gets our cert) when set.
        self._http = http_client or httpx.Client(
            timeout=self.timeout, trust_env=False, verify=process_tls().httpx_verify()
        )

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
        http_client: httpx.Client | None = None,
    ) -> UnifiedInferenceClient:
        """A client for `control_plane_url`, else SAGE_UNIFIED_BASE_URL, else the local gateway.

        `model=`/`embedding_model=` are older spellings of the `default_*` arguments.
        """
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
            ensure_model_served(
                client.base_url,
                model_id,
                list_models=client.list_models,
                admin_api_key=client.admin_api_key,
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
    ) -> tuple[httpx.Response, str]:
        """Send with retries; returns a 2xx response and its request id, or raises."""
        request_id = uuid.uuid4().hex  # one id for every attempt, so logs line up
        content = _encode(body) if body is not None else None
        headers = self._headers(request_id, admin=admin, json=content is not None)
        attempt = 0
        while True:
            request = self._http.build_request(
                method, self._url(path), content=content, headers=headers, timeout=self.timeout
            )
            try:
                resp = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                error = self._transport_error(exc)
                if attempt >= self.max_retries or not isinstance(exc, _RETRY_TRANSPORT):
                    raise error from exc
                delay = self._backoff(attempt)
                self._log_retry(type(exc).__name__, path, attempt, delay)
                time.sleep(delay)
                attempt += 1
                continue
            if resp.status_code < 400:
                return resp, resp.headers.get("x-request-id") or request_id
            try:
                raw = resp.read()
            except httpx.TransportError:
                raw = b""
            finally:
                resp.close()
            error = self._http_error(resp.status_code, raw, resp.headers, model)
            retry_in = self._retry_delay(resp.status_code, error, attempt)
            if retry_in is None:
                raise error
            self._log_retry(f"HTTP {resp.status_code}", path, attempt, retry_in)
            time.sleep(retry_in)
            attempt += 1

    def _call(
        self, method: str, path: str, body: Mapping[str, Any] | None = None, **kw: Any
    ) -> tuple[Any, str]:
        resp, request_id = self._send(method, path, body, **kw)
        return self._json(resp), request_id

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
        path = "/chat/completions" if kind == "chat" else "/completions"
        try:
            resp, request_id = self._send("POST", path, body, stream=stream, model=name)
        except ModelNotFoundError:
            self._forget_auto_model("llm", name)
            raise
        if stream:
            state = StreamState(kind, request_id=request_id, model=name, started=started)
            return TextStream(resp, state, self)
        reply = self._json(resp)
        result = result_from_reply(kind, reply, request_id=request_id, model=name, started=started)
        return result if return_result else result.content

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
        return self._generation("chat", _messages(messages), model, return_result, stream, params)

    def stream_chat(
        self, messages: Messages, model: str | None = None, **params: Any
    ) -> TextStream:
        """Stream a chat: an iterator of text deltas."""
        return self._open_stream("chat", _messages(messages), model, params)

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
        inputs = [texts] if isinstance(texts, str) else list(texts)
        if not inputs:
            return []
        name = self._model("embedding", model)
        vectors: list[list[float]] = []
        for offset in range(0, len(inputs), EMBED_BATCH):
            batch = inputs[offset : offset + EMBED_BATCH]
            try:
                reply, _ = self._call(
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

    def list_models(self) -> list[dict[str, Any]]:
        """Models the gateway serves (OpenAI model objects plus `kind` and `ready_engines`)."""
        reply, _ = self._call("GET", "/models")
        return [dict(m) for m in reply.get("data", [])]

    def get_status(self) -> dict[str, Any]:
        """Control-plane status: `llm_available`, `embedding_available`, engines, GPUs."""
        reply, _ = self._call("GET", "/management/status", admin=True)
        status = dict(reply)
        status.setdefault("llm_available", False)
        status.setdefault("embedding_available", False)
        status["base_url"] = self.base_url
        return status


# ---- create_for_model: make sure an engine serves the model


def _new_lines(previous: Sequence[str], current: Sequence[str]) -> list[str]:
    """Lines of a log tail not shown yet: what follows the overlap with the last tail."""
    for overlap in range(min(len(previous), len(current)), 0, -1):
        if list(previous[-overlap:]) == list(current[:overlap]):
            return list(current[overlap:])
    return list(current)


def _wait_running(
    mgmt: ManagementClient,
    engine: EngineInfo,
    *,
    deadline: float,
    wait_timeout: float,
    poll_interval: float,
) -> EngineInfo:
    """Poll an engine until RUNNING, logging its status changes and new log lines."""
    status = ""
    shown: list[str] = []
    while True:
        if engine.status != status:
            status = engine.status
            log.info("engine %s (%s): %s", engine.engine_id, engine.model_id, status)
        try:
            tail = mgmt.engine_logs(engine.engine_id, 50)
        except SageError:
            tail = []  # external engines have no logs; progress is only the status
        for line in _new_lines(shown, tail):
            log.info("engine %s | %s", engine.engine_id, line)
        shown = tail
        if status == "RUNNING":
            return engine
        if status in ("FAILED", "STOPPED", "STOPPING"):
            detail = "\n".join(tail[-20:])
            raise EngineStartError(
                f"engine {engine.engine_id} for {engine.model_id} is {status}: "
                f"{engine.error or 'no error recorded'}"
                + (f"\nlast log lines:\n{detail}" if detail else "")
            )
        if time.monotonic() >= deadline:
            raise DeadlineExceededError(
                f"engine {engine.engine_id} for {engine.model_id} is not RUNNING after "
                f"{wait_timeout:g}s (still {status}); it keeps starting - see "
                f"`sage llm engine logs {engine.engine_id}`"
            )
        time.sleep(poll_interval)
        engine = mgmt.get_engine(engine.engine_id)


def ensure_model_served(
    base_url: str,
    model_id: str,
    *,
    list_models: Callable[[], list[dict[str, Any]]],
    admin_api_key: str | None = None,
    engine_kind: EngineKind = "llm",
    backend: str = "auto",
    tensor_parallel_size: int = 1,
    required_memory_gb: float | None = None,
    auto_start: bool = True,
    prefer_existing: bool = True,
    wait_timeout: float = 600.0,
    poll_interval: float = 0.5,
) -> EngineInfo | None:
    """Return once the gateway at `base_url` routes `model_id` to a ready engine.

    Returns the engine waited for or started, or None when the gateway already served
    the model (it may be an alias or an externally registered endpoint lifecycle never
    started). Blocking; the async client runs it in a thread.
    """
    deadline = time.monotonic() + wait_timeout
    if (prefer_existing or not auto_start) and _served(list_models(), model_id, engine_kind):
        log.info("model %s is served by %s", model_id, base_url)
        return None
    with ManagementClient(base_url, api_key=admin_api_key) as mgmt:
        candidates = (
            [
                e
                for e in mgmt.list_engines()
                if e.model_id == model_id
                and e.engine_kind == engine_kind
                and e.status in ("RUNNING", "STARTING")
            ]
            if prefer_existing or not auto_start
            else []
        )
        if candidates:
            engine = min(candidates, key=lambda e: e.status != "RUNNING")
            log.info("waiting for engine %s serving %s", engine.engine_id, model_id)
        elif not auto_start:
            raise ModelNotFoundError(
                model_id,
                message=f"no running engine serves `{model_id}` at {base_url}; start one with "
                f"`sage llm engine start {model_id}` or pass auto_start=True",
            )
        else:
            engine = mgmt.start_engine(
                model_id,
                engine_kind=engine_kind,
                backend=backend,
                tensor_parallel_size=tensor_parallel_size,
                required_memory_gb=required_memory_gb,
                startup_timeout_s=max(1, math.ceil(wait_timeout)),
                wait=False,
            )
            log.info(
                "starting engine %s for %s (backend %s) through %s",
                engine.engine_id,
                model_id,
                engine.backend or backend,
                base_url,
            )
        engine = _wait_running(
            mgmt,
            engine,
            deadline=deadline,
            wait_timeout=wait_timeout,
            poll_interval=poll_interval,
        )
    # Lifecycle marks RUNNING as it registers the engine; the route may trail by a moment.
    while not _served(list_models(), model_id, engine_kind):
        if time.monotonic() >= deadline:
            raise DeadlineExceededError(
                f"engine {engine.engine_id} is RUNNING but the gateway does not route "
                f"`{model_id}` after {wait_timeout:g}s"
            )
        time.sleep(poll_interval)
    return engine
