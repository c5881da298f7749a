"""EmbeddingExecutor: one `/v1/embeddings` call per batch to an OpenAI-compatible engine.

Batches ask for `encoding_format: base64` (little-endian float32, as OpenAI, vLLM, TEI,
Infinity and our own engine send it): the engine skips printing ~50k floats as JSON text,
the reply is under half the bytes, and the caller gets the engine's float32 values exactly. An
engine that rejects base64 gets the batch again without the field (float, today's
request) and is remembered, so its later batches go that way directly.

Vectors stay as the engine's bytes (packed little-endian float32, sage.common.float32) from
here to the HTTP edge: base64 is decoded once, a float list (float-only engines) packed once.
"""

from __future__ import annotations

import binascii
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from sage.common.engine_errors import engine_error
from sage.common.engine_keys import engine_auth_headers
from sage.common.error_bodies import loads_error_body
from sage.common.exceptions import DeadlineExceededError, SageError, UpstreamError
from sage.common.float32 import pack
from sage.common.http.http1 import (
    ConnectError,
    DisconnectedError,
    Http1Error,
    Http1Pool,
    engine_tls_context,
)

log = logging.getLogger("sage.embedding")

_ENCODING_FIELD = "encoding_format"


@dataclass(frozen=True)
class Endpoint:
    """An embedding engine to send batches to; `managed` ones (started by lifecycle)
    require their key, derived from the stack's token (sage.common.engine_keys)."""

    engine_id: str
    base_url: str
    managed: bool = False


class EngineUnreachableError(UpstreamError):
    """The engine refused the connection; the batch may go to another engine."""

    default_code = "engine_unreachable"


class EngineDisconnectedError(UpstreamError):
    """The engine dropped the connection before its reply was whole (it died, or the
    scheduler cut it off as lost); embedding changes nothing, so the batch may go to
    another engine."""

    default_code = "engine_disconnected"


@dataclass(frozen=True)
class BatchReply:
    """Vectors in input order (packed little-endian float32) and tokens per input."""

    vectors: list[bytes]
    tokens: list[int]


def split_tokens(total: int, texts: Sequence[str]) -> list[int]:
    """Share a batch's token total across its texts by length (sums back to `total`)."""
    weights = [max(1, len(t)) for t in texts]
    scale = total / sum(weights)
    shares = [int(w * scale) for w in weights]
    for i in range(total - sum(shares)):
        shares[i % len(shares)] += 1
    return shares


def _vector(embedding: Any, index: Any) -> bytes:
    """One item's vector as packed float32: a base64 string is decoded (already that
    layout), a list of floats packed."""
    if isinstance(embedding, str):
        try:
            raw = binascii.a2b_base64(embedding, strict_mode=True)
        except ValueError as exc:  # binascii.Error, or a non-ASCII string
            raise UpstreamError(
                f"engine returned an invalid embeddings reply: data[{index}].embedding is not "
                f"valid base64: {exc}"
            ) from exc
        if len(raw) % 4:
            raise UpstreamError(
                f"engine returned an invalid embeddings reply: data[{index}].embedding decodes "
                f"to {len(raw)} bytes, not a whole number of float32 values"
            )
        return raw
    if isinstance(embedding, list):
        try:
            return pack(embedding)
        except (TypeError, OverflowError) as exc:
            raise UpstreamError(
                f"engine returned an invalid embeddings reply: data[{index}].embedding is not "
                f"a list of numbers: {exc}"
            ) from exc
    raise UpstreamError(
        f"engine returned an invalid embeddings reply: data[{index}].embedding is a "
        f"{type(embedding).__name__}, not a list of floats or a base64 string"
    )


def parse_embeddings(content: bytes, texts: Sequence[str]) -> BatchReply:
    """Vectors ordered by `index`, checked for count; per-input tokens when the engine
    reports them (`sage_tokens`, our own engine), else the total split by length.

    Each `embedding` may be a base64 string (little-endian float32) or a list of floats;
    either way the reply carries packed float32 bytes."""
    try:
        doc: Any = orjson.loads(content)
        items = sorted(doc["data"], key=lambda d: d["index"])
        embeddings = [(item["index"], item["embedding"]) for item in items]
        usage = doc.get("usage") or {}
        total = int(usage.get("prompt_tokens") or usage.get("total_tokens") or 0)
        per_input = doc.get("sage_tokens")
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UpstreamError(f"engine returned an invalid embeddings reply: {exc!r}") from exc
    if len(embeddings) != len(texts):
        raise UpstreamError(f"engine returned {len(embeddings)} vectors for {len(texts)} inputs")
    vectors = [_vector(embedding, index) for index, embedding in embeddings]
    if isinstance(per_input, list) and len(per_input) == len(texts):
        tokens = [int(t) for t in per_input]
    else:
        tokens = split_tokens(total, texts)
    return BatchReply(vectors, tokens)


def rejects_base64(status: int, content: bytes) -> bool:
    """Whether an engine's error reply refuses `encoding_format` (an engine that only
    speaks float): any 4xx naming param `encoding_format`, or a 400/422 whose error
    message mentions it. Other 4xx are the request's own fault and are not retried."""
    if not 400 <= status < 500 or _ENCODING_FIELD.encode() not in content:
        return False
    mentions = status in (400, 422)
    body = loads_error_body(content)  # OpenAI's, vLLM's, TEI's or FastAPI's error shapes
    if body is None:  # plain text, or a shape we do not know, naming the field somewhere
        return mentions
    return body.param == _ENCODING_FIELD or (mentions and _ENCODING_FIELD in (body.message or ""))


def _engine_error(engine: Endpoint, status: int, content: bytes) -> SageError:
    """An engine's non-2xx reply as a SageError, summarised exactly as the scheduler does
    (sage.common.engine_errors): an OpenAI-shaped error keeps its message, clipped; any
    other body (an HTML page, some internal service's reply, a redirect) is summarised, so
    a caller never reads what an address answered."""
    return engine_error(
        engine.engine_id, status, content, label="embedding engine", default_param="input"
    )


class EmbeddingExecutor:
    """Sends batches over pooled keep-alive connections (Http1Pool, the scheduler's engine
    client: a fraction of aiohttp's CPU per call). At most 1024 batches are in flight; more
    wait for a connection within their timeout."""

    def __init__(self, *, timeout_s: float = 120.0) -> None:
        self._timeout_s = timeout_s
        # https engines are verified against SAGE_TLS_CA_FILE (our cert for mTLS).
        self._pool = Http1Pool(
            connect_timeout_s=5.0, max_connections=1024, ssl_context=engine_tls_context
        )
        # Engines (base URL) that rejected encoding_format=base64: they get float.
        self._float_only: set[str] = set()

    async def aclose(self) -> None:
        """Close pooled connections (the executor stays usable)."""
        await self._pool.aclose()

    async def send(
        self, engine: Endpoint, model: str, texts: Sequence[str], dimensions: int = 0
    ) -> BatchReply:
        """Embed one batch on one engine (base64 vectors unless the engine only does float)."""
        payload: dict[str, Any] = {"model": model, "input": list(texts)}
        if dimensions:
            payload["dimensions"] = dimensions
        base = engine.base_url.rstrip("/")
        if base not in self._float_only:
            status, content = await self._post(engine, base, {**payload, _ENCODING_FIELD: "base64"})
            if 200 <= status < 300:
                return parse_embeddings(content, texts)
            if not rejects_base64(status, content):
                raise _engine_error(engine, status, content)
            self._float_only.add(base)
            log.warning(
                "embedding engine rejects encoding_format=base64; sending it float from now on",
                extra={"engine_id": engine.engine_id, "status": status},
            )
        # The request as an OpenAI client sends it by default: float, no encoding_format
        # (an engine that rejected the field may not know it at all).
        status, content = await self._post(engine, base, payload)
        if not 200 <= status < 300:  # a 3xx too: redirects are never followed
            raise _engine_error(engine, status, content)
        return parse_embeddings(content, texts)

    def abort(self, base_url: str, reason: str) -> int:
        """Break every connection to the engine at `base_url` now (its node was found
        lost): each batch waiting there raises EngineDisconnectedError. How many were cut."""
        return self._pool.abort(base_url.rstrip("/"), reason)

    def float_only(self, engine: Endpoint) -> bool:
        """Whether `engine` is sent float because it rejected base64."""
        return engine.base_url.rstrip("/") in self._float_only

    async def _post(
        self, engine: Endpoint, base: str, payload: dict[str, Any]
    ) -> tuple[int, bytes]:
        """(status, body) of one POST to `base`/v1/embeddings; connection failures and
        timeouts as SageErrors. A redirect is never followed (an engine that passed the
        registration probe could otherwise send batches to loopback or metadata
        addresses): a 3xx comes back as an engine error."""
        headers = {
            "content-type": "application/json",
            **engine_auth_headers(engine.engine_id, engine.managed),
        }
        try:
            return await self._pool.post(
                base, "/v1/embeddings", orjson.dumps(payload), headers, self._timeout_s
            )
        except ConnectError as exc:
            raise EngineUnreachableError(
                f"embedding engine {engine.engine_id} unreachable: {exc}"
            ) from exc
        except DisconnectedError as exc:
            raise EngineDisconnectedError(
                f"embedding engine {engine.engine_id} dropped the connection: {exc}"
            ) from exc
        except TimeoutError as exc:
            raise DeadlineExceededError(f"embedding engine {engine.engine_id} timed out") from exc
        except Http1Error as exc:  # not HTTP
            raise UpstreamError(f"embedding engine {engine.engine_id} failed: {exc!r}") from exc
