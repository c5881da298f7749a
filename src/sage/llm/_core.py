"""What UnifiedInferenceClient and AsyncUnifiedInferenceClient share; no I/O happens here.

Configuration, request building (URL, headers, JSON body), the retry policy as data,
error mapping and response parsing live here once. Each client keeps only its transport
loop: send, ask the call's `Exchange` what a failure means (wait this long, or raise the
mapped error), sleep its own way, send again.
"""

from __future__ import annotations

import logging
import random
import re
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, Self, TypeVar
from urllib.parse import urlsplit

import httpx
import orjson
import pydantic

from sage.common.config.ports import SagePorts
from sage.common.config.settings import SageSettings, load_settings
from sage.common.exceptions import (
    ConfigurationError,
    DeadlineExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    SageError,
    ServiceUnavailableError,
    UpstreamError,
)
from sage.common.grpc.tls import process_tls
from sage.llm.management import EngineKind, admin_key_for, model_is_served
from sage.llm.result import (
    InferenceResult,
    Kind,
    RerankResult,
    ResponsesResult,
    SseDecoder,
    SseState,
    error_from_payload,
    parse_retry_after,
    response_from_reply,
    result_from_reply,
    vectors_from_reply,
)

ItemT = TypeVar("ItemT")

# Progress and retry lines keep the sync client's logger name, as before the split.
log = logging.getLogger("sage.llm.client")

# A generation may legitimately take minutes; connecting may not.
DEFAULT_TIMEOUT_S = 600.0
CONNECT_TIMEOUT_S = 10.0
DEFAULT_MAX_RETRIES = 2
# Longest wait a Retry-After may impose between two attempts.
MAX_RETRY_AFTER_S = 60.0
# The edge's per-request input cap; longer lists go out in several requests.
EMBED_BATCH = 2048
_INPUT_PARAM = re.compile(r"input\[(\d+)\]")

Messages = str | Sequence[Mapping[str, Any]]
# A Responses API input: text, or a list of input items.
ResponsesInput = str | Sequence[Mapping[str, Any]]


def load_client_settings() -> SageSettings:
    """SageSettings, with a bad SAGE_* value reported as ConfigurationError."""
    try:
        return load_settings()
    except pydantic.ValidationError as exc:
        raise ConfigurationError(f"invalid SAGE_* setting: {exc}") from exc


def normalise_url(url: str) -> str:
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
        return normalise_url(control_plane_url)
    env = (settings or load_client_settings()).unified_base_url
    if env:
        return normalise_url(env)
    scheme = "https" if process_tls().dials_tls else "http"
    return f"{scheme}://localhost:{SagePorts.GATEWAY_DEFAULT}/v1"


def chat_messages(messages: Messages) -> list[Any]:
    """The `messages` list of a chat body; a bare prompt is one user turn."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    return [dict(m) if isinstance(m, Mapping) else m for m in messages]


def generation_path(kind: Kind) -> str:
    """The gateway route of a chat or a raw completion."""
    return "/chat/completions" if kind == "chat" else "/completions"


def embed_batches(texts: str | Sequence[str]) -> list[tuple[int, list[str]]]:
    """(offset, inputs) per request; a str is one input, an empty list sends nothing."""
    inputs = [texts] if isinstance(texts, str) else list(texts)
    return [(i, inputs[i : i + EMBED_BATCH]) for i in range(0, len(inputs), EMBED_BATCH)]


def shift_input_param(error: SageError, offset: int) -> None:
    """Renumber an `input[i]` param of a later embedding batch to the caller's list."""
    match = _INPUT_PARAM.fullmatch(error.param or "")
    if offset and match:
        error.param = f"input[{int(match.group(1)) + offset}]"


def gateway_root(base_url: str) -> str:
    """The gateway's root URL: vLLM-style routes (/tokenize, /detokenize) sit beside /v1."""
    return base_url.removesuffix("/v1")


def tokenize_body(model: str, payload: Messages, add_special_tokens: bool | None) -> dict[str, Any]:
    """A /tokenize body: a str is a prompt, a list of messages a chat (rendered by the
    engine's chat template)."""
    body: dict[str, Any] = {"model": model}
    if isinstance(payload, str):
        body["prompt"] = payload
    else:
        body["messages"] = chat_messages(payload)
    if add_special_tokens is not None:
        body["add_special_tokens"] = add_special_tokens
    return body


def tokens_from_reply(reply: Any) -> list[int]:
    """The token ids of a /tokenize reply."""
    tokens = reply.get("tokens") if isinstance(reply, dict) else None
    if not isinstance(tokens, list):
        raise UpstreamError("the gateway's /tokenize reply has no `tokens` list")
    return [int(t) for t in tokens]


def text_from_reply(reply: Any) -> str:
    """The text of a /detokenize reply."""
    prompt = reply.get("prompt") if isinstance(reply, dict) else None
    if not isinstance(prompt, str):
        raise UpstreamError("the gateway's /detokenize reply has no `prompt` string")
    return prompt


def rerank_body(
    model: str, query: str, documents: Sequence[str], top_n: int | None
) -> dict[str, Any]:
    """A /v1/rerank body (vLLM's shape; top_n 0 or absent: every document)."""
    body: dict[str, Any] = {"model": model, "query": query, "documents": list(documents)}
    if top_n is not None:
        body["top_n"] = top_n
    return body


def score_body(
    model: str, text_1: str | Sequence[str], text_2: str | Sequence[str]
) -> dict[str, Any]:
    """A /score body: one text against many, or pairs of equal-length lists."""

    def texts(value: str | Sequence[str]) -> str | list[str]:
        return value if isinstance(value, str) else list(value)

    return {"model": model, "text_1": texts(text_1), "text_2": texts(text_2)}


def rerank_from_reply(reply: Any) -> list[RerankResult]:
    """The results of a /rerank reply, most relevant first (the engine's order)."""
    results = reply.get("results") if isinstance(reply, dict) else None
    if not isinstance(results, list):
        raise UpstreamError("the gateway's /rerank reply has no `results` list")
    out: list[RerankResult] = []
    for item in results:
        document = item.get("document")
        text = document.get("text") if isinstance(document, dict) else document
        out.append(
            RerankResult(
                index=int(item["index"]),
                relevance_score=float(item["relevance_score"]),
                document=text if isinstance(text, str) else None,
            )
        )
    return out


def scores_from_reply(reply: Any) -> list[float]:
    """The scores of a /score reply, in pair order."""
    data = reply.get("data") if isinstance(reply, dict) else None
    if not isinstance(data, list):
        raise UpstreamError("the gateway's /score reply has no `data` list")
    return [float(d["score"]) for d in sorted(data, key=lambda d: int(d["index"]))]


@dataclass(frozen=True)
class JsonCall(Generic[ItemT]):
    """One JSON request to an engine of a `kind` model, and how its reply reads: all that
    tokenize, rerank, score and responses differ in. Both clients only send it."""

    kind: EngineKind
    path: str
    body: Callable[[str], dict[str, Any]]  # the request body, given the chosen model
    parse: Callable[[Any], ItemT]  # the caller's value, from the 2xx reply's JSON
    root: bool = False  # a vLLM-style route beside /v1 (/tokenize, /score), not under it


def tokenize_call(payload: Messages, add_special_tokens: bool | None) -> JsonCall[list[int]]:
    """POST /tokenize of a prompt or a chat."""
    return JsonCall(
        "llm",
        "/tokenize",
        lambda model: tokenize_body(model, payload, add_special_tokens),
        tokens_from_reply,
        root=True,
    )


def detokenize_call(tokens: Sequence[int]) -> JsonCall[str]:
    """POST /detokenize of token ids."""
    ids = list(tokens)
    return JsonCall(
        "llm",
        "/detokenize",
        lambda model: {"model": model, "tokens": ids},
        text_from_reply,
        root=True,
    )


def rerank_call(
    query: str, documents: Sequence[str], top_n: int | None
) -> JsonCall[list[RerankResult]]:
    """POST /v1/rerank: documents ranked for a query by a cross-encoder (embedding kind)."""
    return JsonCall(
        "embedding",
        "/rerank",
        lambda model: rerank_body(model, query, documents, top_n),
        rerank_from_reply,
    )


def score_call(text_1: str | Sequence[str], text_2: str | Sequence[str]) -> JsonCall[list[float]]:
    """POST /score: a cross-encoder's score of text pairs (embedding kind)."""
    return JsonCall(
        "embedding",
        "/score",
        lambda model: score_body(model, text_1, text_2),
        scores_from_reply,
        root=True,
    )


def responses_call(
    payload: ResponsesInput,
    *,
    instructions: str | None,
    max_output_tokens: int | None,
    temperature: float | None,
    stream: bool,
    params: Mapping[str, Any],
) -> JsonCall[ResponsesResult]:
    """POST /v1/responses (OpenAI's Responses API); `payload` is text or input items.
    Other `params` (top_p, metadata, tools, ...) go into the body as given; None is "not
    given", so temperature=0 is sent."""
    given = {
        **params,
        "instructions": instructions,
        "max_output_tokens": max_output_tokens,
        "temperature": temperature,
    }
    items = payload if isinstance(payload, str) else [dict(item) for item in payload]

    def body(model: str) -> dict[str, Any]:
        out = {key: value for key, value in given.items() if value is not None}
        out.update(model=model, input=items)
        if stream:
            out["stream"] = True
        return out

    return JsonCall("llm", "/responses", body, response_from_reply)


def models_from_reply(reply: Any) -> list[dict[str, Any]]:
    """The model objects of a `/v1/models` reply."""
    return [dict(m) for m in reply.get("data", [])]


def status_from_reply(reply: Any, base_url: str) -> dict[str, Any]:
    """A `/v1/management/status` reply, with the seed's availability keys always present."""
    status = dict(reply)
    status.setdefault("llm_available", False)
    status.setdefault("embedding_available", False)
    status["base_url"] = base_url
    return status


@dataclass(frozen=True)
class RetryPolicy:
    """Which failures are retried and how long to wait before the next attempt.

    Refused connections and 429/502/503/504 are retried (the gateway surely did not finish
    the request); other 4xx never are, since the same request would fail the same way.
    """

    max_retries: int = DEFAULT_MAX_RETRIES
    statuses: frozenset[int] = frozenset({429, 502, 503, 504})
    # Transport failures where the gateway surely did not finish the request.
    transport_errors: tuple[type[httpx.TransportError], ...] = (
        httpx.ConnectError,
        httpx.ConnectTimeout,
        httpx.RemoteProtocolError,
        httpx.ReadError,
        httpx.WriteError,
    )
    backoff_base_s: float = 0.5
    backoff_max_s: float = 8.0
    max_retry_after_s: float = MAX_RETRY_AFTER_S

    def backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter, so retrying clients spread out."""
        delay = min(self.backoff_max_s, self.backoff_base_s * 2.0**attempt)
        return delay * (0.75 + random.random() / 4)

    def after_transport(self, exc: httpx.TransportError, attempt: int) -> float | None:
        """Seconds to wait after a transport failure, or None to give up now."""
        if attempt >= self.max_retries or not isinstance(exc, self.transport_errors):
            return None
        return self.backoff(attempt)

    def after_status(self, status: int, error: SageError, attempt: int) -> float | None:
        """Seconds to wait after an error status (Retry-After first), or None to give up."""
        if attempt >= self.max_retries or status not in self.statuses:
            return None
        if error.retry_after is not None:
            return min(error.retry_after, self.max_retry_after_s)
        return self.backoff(attempt)


@dataclass
class Exchange:
    """One logical request and its attempts: what is sent, and what each failure means.

    The transport loops call `delay_after_*`: it returns the seconds to sleep before the
    next attempt, or raises the mapped SageError when the request is not retried.
    """

    method: str
    url: str
    path: str
    content: bytes | None
    headers: dict[str, str]
    request_id: str
    model: str | None
    policy: RetryPolicy
    base_url: str
    attempt: int = field(default=0)

    def request_id_of(self, resp: httpx.Response) -> str:
        """The gateway's x-request-id, else the one we sent."""
        return resp.headers.get("x-request-id") or self.request_id

    def delay_after_transport(self, exc: httpx.TransportError) -> float:
        """Seconds to wait after a transport failure; raises its mapping when final."""
        delay = self.policy.after_transport(exc, self.attempt)
        if delay is None:
            raise transport_error(self.base_url, exc) from exc
        self._next(type(exc).__name__, delay)
        return delay

    def delay_after_status(self, status: int, content: bytes, headers: httpx.Headers) -> float:
        """Seconds to wait after an error response; raises its mapping when final."""
        error = http_error(status, content, headers, self.model)
        delay = self.policy.after_status(status, error, self.attempt)
        if delay is None:
            raise error
        self._next(f"HTTP {status}", delay)
        return delay

    def _next(self, what: str, delay: float) -> None:
        log.warning(
            "retrying %s %s after %s (attempt %d of %d) in %.2fs",
            self.path,
            self.base_url,
            what,
            self.attempt + 1,
            self.policy.max_retries,
            delay,
        )
        self.attempt += 1


def http_error(status: int, content: bytes, headers: httpx.Headers, model: str | None) -> SageError:
    """The SageError an error response from the gateway stands for."""
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


def transport_error(base_url: str, exc: httpx.TransportError) -> SageError:
    """The SageError a failed connection to the gateway stands for."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return ServiceUnavailableError(
            f"no SAGE gateway answers at {base_url} ({exc or type(exc).__name__}); "
            "start one with `sage llm serve` or set SAGE_UNIFIED_BASE_URL"
        )
    if isinstance(exc, httpx.TimeoutException):
        return DeadlineExceededError(
            f"the gateway at {base_url} did not answer in time ({type(exc).__name__})"
        )
    return UpstreamError(f"the connection to the gateway at {base_url} broke: {exc!r}")


def json_of(resp: httpx.Response) -> Any:
    """The JSON body of a 2xx reply; non-JSON is the gateway's fault."""
    try:
        return orjson.loads(resp.content)
    except orjson.JSONDecodeError as exc:
        raise UpstreamError(
            f"the gateway sent non-JSON for {resp.request.method} {resp.request.url.path}"
        ) from exc


class StreamReader(Generic[ItemT]):
    """SSE lines of a stream in, its state's items out (text deltas of a chat, events of a
    Responses reply); the state decides what each event means and when the stream is done."""

    def __init__(self, state: SseState[ItemT]) -> None:
        self.state = state
        self._decoder = SseDecoder()

    def step(self, line: str | None) -> tuple[ItemT | None, bool]:
        """Feed one line (None: the body ended); returns (item, whether to read on).

        An error event raises its SageError; a body that ends too early (the state's `end`)
        raises UpstreamError.
        """
        if line is not None:
            data = self._decoder.feed(line)
            return (None if data is None else self.state.event(data)), True
        data = self._decoder.flush()  # an event the body ended without a blank line after
        if data is not None:
            return self.state.event(data), True
        self.state.end()
        return None, False


# The connection pool type: httpx.Client for the sync client, httpx.AsyncClient for async.
HttpT = TypeVar("HttpT", httpx.Client, httpx.AsyncClient)


class ClientCore(Generic[HttpT]):
    """Configuration, request building and model choice shared by both clients."""

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
        http_client: HttpT | None = None,
    ) -> None:
        if max_retries < 0:
            raise ConfigurationError(f"max_retries must be >= 0, got {max_retries}")
        self.base_url = normalise_url(base_url)
        self.model = model
        self.embedding_model = embedding_model
        self.api_key = api_key
        self.admin_api_key = admin_api_key
        # The key file is read on the first management call, not here: a client that only
        # chats never touches it.
        self._file_admin_key: str | None = None
        self._file_admin_key_read = False
        self.max_retries = max_retries
        self.retry_policy = RetryPolicy(max_retries=max_retries)
        self.timeout = (
            timeout
            if isinstance(timeout, httpx.Timeout)
            else httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT_S))
        )
        self._default_headers = {"user-agent": "sage-unified-client", **(default_headers or {})}
        # Models picked from /v1/models when none was configured, per kind.
        self._auto_model: dict[str, str] = {}
        # A caller's client (proxies, event hooks, mounts) is used as is and left open.
        self._owns_http = http_client is None
        self._http: HttpT = http_client or self._new_http()

    def _new_http(self) -> HttpT:
        """The connection pool this client owns when the caller passed none."""
        raise NotImplementedError

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
        http_client: HttpT | None = None,
    ) -> Self:
        """A client for `control_plane_url`, else SAGE_UNIFIED_BASE_URL, else the local gateway.

        `model=`/`embedding_model=` are older spellings of the `default_*` arguments. No
        I/O happens here, so the async client's `create` is not async either.
        """
        settings = load_client_settings()
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

    def _management_key(self) -> str | None:
        """The admin key for /v1/management/*: the one given (or SAGE_ADMIN_API_KEY via
        `create`), else the local stack's key file, looked up once."""
        if self.admin_api_key:
            return self.admin_api_key
        if not self._file_admin_key_read:
            self._file_admin_key = admin_key_for(self.base_url, load_client_settings())
            # Found: kept. Not found (no file yet, or no gateway of ours listening yet):
            # looked up again on the next management call, e.g. once serve is up.
            self._file_admin_key_read = self._file_admin_key is not None
        return self._file_admin_key

    def _needs_key_file(self, admin: bool) -> bool:
        """Whether building this request's headers may read the admin key file."""
        return admin and not self.admin_api_key and not self._file_admin_key_read

    def _exchange(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None,
        admin: bool,
        model: str | None,
        root: bool = False,
    ) -> Exchange:
        """Build one request (one id for every attempt, so logs line up)."""
        request_id = uuid.uuid4().hex
        content = encode_body(body) if body is not None else None
        headers = {**self._default_headers, "x-request-id": request_id}
        # The admin key goes to management routes only, never with an inference request.
        key = (self._management_key() or self.api_key) if admin else self.api_key
        if key:
            headers["authorization"] = f"Bearer {key}"
        if content is not None:
            headers["content-type"] = "application/json"
        return Exchange(
            method=method,
            url=(gateway_root(self.base_url) if root else self.base_url) + path,
            path=path,
            content=content,
            headers=headers,
            request_id=request_id,
            model=model,
            policy=self.retry_policy,
            base_url=self.base_url,
        )

    def _configured_model(self, kind: EngineKind, explicit: str | None) -> str | None:
        if explicit:
            return explicit
        wanted = self.model if kind == "llm" else self.embedding_model
        return wanted or self._auto_model.get(kind)

    def _pick_model(self, kind: EngineKind, models: Sequence[Mapping[str, Any]]) -> str:
        for entry in models:
            if model_is_served([entry], str(entry.get("id")), kind):
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

    @contextmanager
    def _model_errors(self, kind: EngineKind, name: str) -> Iterator[None]:
        """A model the gateway no longer serves is not picked again automatically."""
        try:
            yield
        except ModelNotFoundError:
            self._forget_auto_model(kind, name)
            raise

    @contextmanager
    def _embedding_errors(self, name: str, offset: int) -> Iterator[None]:
        """As `_model_errors`, and an `input[i]` param counts in the caller's whole list."""
        try:
            with self._model_errors("embedding", name):
                yield
        except SageError as exc:
            shift_input_param(exc, offset)
            raise

    @staticmethod
    def _result(
        kind: Kind,
        resp: httpx.Response,
        request_id: str,
        model: str,
        started: float,
        return_result: bool,
    ) -> str | InferenceResult:
        result = result_from_reply(
            kind, json_of(resp), request_id=request_id, model=model, started=started
        )
        return result if return_result else result.content

    @staticmethod
    def _vectors(resp: httpx.Response, count: int) -> list[list[float]]:
        return vectors_from_reply(json_of(resp), count)


def encode_body(body: Mapping[str, Any]) -> bytes:
    """The JSON bytes of a request body; an unserialisable value is the caller's error."""
    try:
        return orjson.dumps(body)
    except TypeError as exc:
        raise InvalidRequestError(f"the request is not JSON-serialisable: {exc}") from exc
