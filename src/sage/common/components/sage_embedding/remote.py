"""Shared plumbing of the remote (HTTP API) methods: pooled client, bounded retries, errors.

Every provider module only says how to build its request and read its response; this
module owns the parts that must behave the same everywhere: one `httpx.Client` per
embedder (connections are reused across calls and threads), retries on 429 and 5xx with
exponential backoff that honours `Retry-After`, and provider errors turned into
`sage.common.exceptions` types carrying the provider's own message.
"""

from __future__ import annotations

import email.utils
import logging
import math
import os
import random
import time
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, TypedDict

import httpx
import orjson

from sage.common.components.sage_embedding.base import BaseEmbedding
from sage.common.components.sage_embedding.credentials import find_api_key, resolve_api_key
from sage.common.components.sage_embedding.protocols import Vector
from sage.common.error_bodies import loads_error_body
from sage.common.exceptions import (
    AuthenticationError,
    DeadlineExceededError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    SageError,
    ServiceUnavailableError,
    UpstreamError,
)

__all__ = [
    "HeaderFactory",
    "JsonPoster",
    "RemoteEmbedding",
    "RemoteOptions",
    "RetryPolicy",
    "error_from_response",
    "float_vectors",
    "parse_retry_after",
    "require_key",
]

logger = logging.getLogger(__name__)

HeaderFactory = Callable[[str, bytes], Mapping[str, str]]
"""(url, body bytes) -> headers; called again for every attempt (SigV4 signs each one)."""

_USER_AGENT = "sage-embedding/0.1"


def _retryable_status(status: int) -> bool:
    # 501 Not Implemented will not change on retry; other 5xx and 429 may.
    return status == 429 or (status >= 500 and status != 501)


@dataclass(frozen=True)
class RetryPolicy:
    """How a remote call is retried on 429, 5xx and transport errors.

    At most `max_retries` retries (so `max_retries + 1` attempts). The wait before retry
    n (0-based) is the server's `Retry-After` when it sent one (capped at
    `retry_after_max_s`), else `backoff_base_s * 2**n` capped at `backoff_max_s`, with
    jitter in its upper half so clients that failed together do not retry together.
    """

    max_retries: int = 3
    backoff_base_s: float = 0.5
    backoff_max_s: float = 8.0
    retry_after_max_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise InvalidRequestError("max_retries must be >= 0", param="retry")
        if self.backoff_base_s < 0 or self.backoff_max_s < 0 or self.retry_after_max_s < 0:
            raise InvalidRequestError("retry delays must be >= 0", param="retry")

    def delay(
        self,
        retry_index: int,
        retry_after: float | None,
        jitter: Callable[[], float] = random.random,
    ) -> float:
        """Seconds to wait before retry number `retry_index` (0-based)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.retry_after_max_s)
        ceiling = min(self.backoff_max_s, self.backoff_base_s * (2.0**retry_index))
        return ceiling * (0.5 + 0.5 * jitter())


def parse_retry_after(headers: Mapping[str, str], now: datetime | None = None) -> float | None:
    """Seconds the server asked us to wait, from `retry-after-ms` or `Retry-After`.

    `Retry-After` may be delta-seconds or an HTTP date (RFC 9110 §10.2.3); anything
    unparseable counts as absent, so a bad header falls back to normal backoff.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    raw_ms = lowered.get("retry-after-ms")
    if raw_ms is not None:
        try:
            millis = float(raw_ms)
        except ValueError:
            millis = math.nan
        if math.isfinite(millis) and millis >= 0:
            return millis / 1000.0
    raw = lowered.get("retry-after")
    if raw is None or not raw.strip():
        return None
    text = raw.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        current = now if now is not None else datetime.now(UTC)
        return max((when - current).total_seconds(), 0.0)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


class JsonPoster:
    """POSTs JSON to one provider with retries; the one place HTTP errors are interpreted."""

    def __init__(
        self,
        *,
        provider: str,
        retry: RetryPolicy,
        timeout: float,
        client: httpx.Client | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.provider = provider
        self.retry = retry
        self._owns_client = client is None
        self._client = client if client is not None else httpx.Client(timeout=timeout)
        self._sleep = sleep

    def post(self, url: str, body: Mapping[str, Any], headers: HeaderFactory) -> Any:
        """The decoded JSON answer to POST `body` at `url`, after any retries."""
        payload = orjson.dumps(body)
        attempts = self.retry.max_retries + 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            request_headers = {
                "content-type": "application/json",
                "accept": "application/json",
                "user-agent": _USER_AGENT,
                **headers(url, payload),
            }
            try:
                response = self._client.post(url, content=payload, headers=request_headers)
            except httpx.TimeoutException as exc:
                if last:
                    raise DeadlineExceededError(
                        f"{self.provider} embeddings request to {url} timed out after "
                        f"{attempts} attempt(s): {exc}"
                    ) from exc
                self._wait(attempt, None, f"timeout: {exc}")
                continue
            except httpx.TransportError as exc:
                if last:
                    raise ServiceUnavailableError(
                        f"cannot reach the {self.provider} embeddings API at {url} "
                        f"after {attempts} attempt(s): {exc}"
                    ) from exc
                self._wait(attempt, None, f"transport error: {exc}")
                continue
            if response.is_success:
                try:
                    return orjson.loads(response.content)
                except orjson.JSONDecodeError as exc:
                    raise UpstreamError(
                        f"{self.provider} answered HTTP {response.status_code} with a body "
                        f"that is not JSON: {response.text[:200]!r}"
                    ) from exc
            if _retryable_status(response.status_code) and not last:
                self._wait(
                    attempt, parse_retry_after(response.headers), f"HTTP {response.status_code}"
                )
                continue
            raise error_from_response(self.provider, response)
        raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover

    def _wait(self, attempt: int, retry_after: float | None, reason: str) -> None:
        delay = self.retry.delay(attempt, retry_after)
        logger.warning(
            "retrying embeddings call provider=%s reason=%r retry=%d/%d delay_s=%.3f",
            self.provider,
            reason,
            attempt + 1,
            self.retry.max_retries,
            delay,
        )
        self._sleep(delay)

    def close(self) -> None:
        """Close the connection pool if this poster created it."""
        if self._owns_client:
            self._client.close()


def _provider_message(response: httpx.Response) -> str:
    """The provider's own error text: OpenAI, Cohere, Jina, Zhipu, Ollama, AWS shapes (read
    by sage.common.error_bodies), else the start of the reply."""
    body = loads_error_body(response.content)
    if body is not None and body.message is not None:
        return body.message
    return response.text[:500] or response.reason_phrase


def _sent_credential(response: httpx.Response) -> str:
    """The bearer token the request carried, so an error that echoes it can be masked."""
    try:
        header = response.request.headers.get("authorization", "")
    except RuntimeError:  # a response built without its request
        return ""
    return str(header).partition(" ")[2].strip()


def error_from_response(provider: str, response: httpx.Response) -> SageError:
    """The SageError for a failed provider answer, keeping the provider's message (with
    the caller's key masked: some providers and proxies quote it back)."""
    status = response.status_code
    detail = _provider_message(response)
    credential = _sent_credential(response)
    if len(credential) >= 8:
        detail = detail.replace(credential, "***")
    message = f"{provider} embeddings API answered HTTP {status}: {detail}"
    if status == 401:
        return AuthenticationError(message + " (check the API key)")
    if status == 403:
        return PermissionDeniedError(message)
    if status == 404:
        return NotFoundError(message + " (check the model name and base_url)")
    if status == 429:
        return RateLimitError(message, retry_after=parse_retry_after(response.headers))
    if 400 <= status < 500:
        return InvalidRequestError(message)
    return UpstreamError(message)


class RemoteOptions(TypedDict, total=False):
    """Options every remote method accepts (besides its own)."""

    model: str | None
    api_key: str | None
    base_url: str | None
    dimensions: int | None
    timeout: float
    retry: RetryPolicy | None
    http_client: httpx.Client | None
    sleep: Callable[[float], None]
    env: Mapping[str, str] | None


class RemoteEmbedding(BaseEmbedding):
    """A method backed by a provider's HTTP API.

    Subclasses set the class attributes and implement `_embed_chunk` (one request for at
    most `max_batch_size` texts). Options: `model`, `api_key` (else the `api_key_env`
    variables), `base_url` (tests point it at a local fake), `dimensions`, `timeout`,
    `retry`, `http_client` (to share a pool), `sleep` (tests record waits), `env`.
    """

    default_base_url: ClassVar[str]
    default_model: ClassVar[str]
    api_key_env: ClassVar[tuple[str, ...]] = ()
    requires_api_key: ClassVar[bool] = True
    max_batch_size: ClassVar[int] = 128
    known_dimensions: ClassVar[Mapping[str, int]] = {}
    default_batch_size = 64
    max_concurrency = 4

    def __init__(
        self,
        *,
        model: str | None = None,
        api_key: str | None = None,
        base_url: str | None = None,
        dimensions: int | None = None,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        http_client: httpx.Client | None = None,
        sleep: Callable[[float], None] = time.sleep,
        env: Mapping[str, str] | None = None,
    ) -> None:
        environ = os.environ if env is None else env
        if dimensions is not None and dimensions <= 0:
            raise InvalidRequestError("dimensions must be a positive integer", param="dimensions")
        self._model = model or self.default_model
        self._api_key: str | None
        if self.requires_api_key:
            self._api_key = resolve_api_key(self.method, api_key, self.api_key_env, environ)
        else:
            self._api_key = find_api_key(api_key, self.api_key_env, environ)
        self.base_url = (base_url or self.default_base_url).rstrip("/")
        self.dimensions = dimensions
        self._observed_dim: int | None = None
        self._poster = JsonPoster(
            provider=self.method,
            retry=retry or RetryPolicy(),
            timeout=timeout,
            client=http_client,
            sleep=sleep,
        )

    @property
    def model_name(self) -> str:
        """The provider's model id."""
        return self._model

    def embed(self, text: str) -> Vector:
        """One text, one request."""
        return self.embed_batch([text])[0]

    def embed_batch(self, texts: Sequence[str]) -> list[Vector]:
        """Embeddings of `texts` in order, in requests of at most `max_batch_size` texts."""
        vectors: list[Vector] = []
        for start in range(0, len(texts), self.max_batch_size):
            chunk = list(texts[start : start + self.max_batch_size])
            got = self._embed_chunk(chunk)
            if len(got) != len(chunk):
                raise UpstreamError(
                    f"{self.method} returned {len(got)} embeddings for {len(chunk)} inputs"
                )
            vectors.extend(got)
        if vectors:
            self._observed_dim = len(vectors[0])
        return vectors

    def get_dim(self) -> int:
        """Requested `dimensions`, else the model's known size, else measured by one call."""
        if self.dimensions is not None:
            return self.dimensions
        if self._observed_dim is not None:
            return self._observed_dim
        known = self.known_dimensions.get(self._model)
        if known is not None:
            return known
        return len(self.embed("dimension probe"))

    def close(self) -> None:
        """Close the HTTP connection pool (unless it was passed in)."""
        self._poster.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self._model!r}, base_url={self.base_url!r})"

    @abstractmethod
    def _embed_chunk(self, texts: list[str]) -> list[Vector]:
        """One provider request for `texts`."""

    def _post(self, url: str, body: Mapping[str, Any]) -> Any:
        return self._poster.post(url, body, self._headers)

    def _headers(self, url: str, body: bytes) -> Mapping[str, str]:
        """Bearer auth, the scheme every provider here uses except Bedrock's SigV4."""
        if self._api_key is None:
            return {}
        return {"authorization": f"Bearer {self._api_key}"}


def float_vectors(items: Sequence[Any], provider: str) -> list[Vector]:
    """`items` as lists of floats; anything else is the provider breaking its format."""
    vectors: list[Vector] = []
    for item in items:
        if not isinstance(item, list) or not all(
            isinstance(x, int | float) and not isinstance(x, bool) for x in item
        ):
            raise UpstreamError(f"{provider} returned an embedding that is not a list of numbers")
        vectors.append([float(x) for x in item])
    return vectors


def require_key(doc: Any, key: str, provider: str) -> Any:
    """`doc[key]`, or an UpstreamError naming what was missing."""
    if not isinstance(doc, dict) or key not in doc:
        raise UpstreamError(f"{provider} response has no {key!r} field")
    return doc[key]
