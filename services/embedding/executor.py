"""EmbeddingExecutor: one `/v1/embeddings` call per batch to an OpenAI-compatible engine."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from sage.common.exceptions import (
    DeadlineExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    UpstreamError,
)
from sage.common.grpc.tls import process_tls


@dataclass(frozen=True)
class Endpoint:
    """An embedding engine to send batches to."""

    engine_id: str
    base_url: str


class EngineUnreachableError(UpstreamError):
    """The engine refused the connection; the batch may go to another engine."""

    default_code = "engine_unreachable"


@dataclass(frozen=True)
class BatchReply:
    """Vectors in input order and tokens per input."""

    vectors: list[list[float]]
    tokens: list[int]


def split_tokens(total: int, texts: Sequence[str]) -> list[int]:
    """Share a batch's token total across its texts by length (sums back to `total`)."""
    weights = [max(1, len(t)) for t in texts]
    scale = total / sum(weights)
    shares = [int(w * scale) for w in weights]
    for i in range(total - sum(shares)):
        shares[i % len(shares)] += 1
    return shares


def parse_embeddings(content: bytes, texts: Sequence[str]) -> BatchReply:
    """Vectors ordered by `index`, checked for count; per-input tokens when the engine
    reports them (`sage_tokens`, our own engine), else the total split by length."""
    try:
        doc: Any = orjson.loads(content)
        items = sorted(doc["data"], key=lambda d: d["index"])
        vectors = [item["embedding"] for item in items]
        usage = doc.get("usage") or {}
        total = int(usage.get("prompt_tokens") or usage.get("total_tokens") or 0)
        per_input = doc.get("sage_tokens")
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UpstreamError(f"engine returned an invalid embeddings reply: {exc!r}") from exc
    if len(vectors) != len(texts):
        raise UpstreamError(f"engine returned {len(vectors)} vectors for {len(texts)} inputs")
    if isinstance(per_input, list) and len(per_input) == len(texts):
        tokens = [int(t) for t in per_input]
    else:
        tokens = split_tokens(total, texts)
    return BatchReply(vectors, tokens)


def _engine_error(engine: Endpoint, status: int, content: bytes) -> Exception:
    message = content.decode(errors="replace")[:500]
    param = None
    try:
        err = orjson.loads(content).get("error", {})
        message = str(err.get("message") or message)
        param = err.get("param") if isinstance(err.get("param"), str) else None
    except (orjson.JSONDecodeError, AttributeError):
        pass
    if status == 404:
        return ModelNotFoundError(param or "model", message=message)
    if status in (400, 413, 422):
        return InvalidRequestError(message, param=param or "input")
    if status == 429:
        return OverloadedError(f"embedding engine {engine.engine_id} is overloaded: {message}")
    return UpstreamError(f"embedding engine {engine.engine_id} returned HTTP {status}: {message}")


class EmbeddingExecutor:
    """Sends batches over one pooled keep-alive session (aiohttp: cheapest per call)."""

    def __init__(self, *, timeout_s: float = 120.0) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=5.0)
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                # https engines are verified against SAGE_TLS_CA_FILE (our cert for mTLS).
                connector=aiohttp.TCPConnector(
                    limit=1024, limit_per_host=0, ssl=process_tls().httpx_verify()
                ),
                timeout=self._timeout,
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def aclose(self) -> None:
        """Close pooled connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(
        self, engine: Endpoint, model: str, texts: Sequence[str], dimensions: int = 0
    ) -> BatchReply:
        """Embed one batch on one engine."""
        payload: dict[str, Any] = {"model": model, "input": list(texts)}
        if dimensions:
            payload["dimensions"] = dimensions
        url = engine.base_url.rstrip("/") + "/v1/embeddings"
        try:
            async with self._http().post(
                url, data=orjson.dumps(payload), headers={"content-type": "application/json"}
            ) as resp:
                content = await resp.read()
        except aiohttp.ClientConnectorError as exc:
            raise EngineUnreachableError(
                f"embedding engine {engine.engine_id} unreachable: {exc}"
            ) from exc
        except TimeoutError as exc:
            raise DeadlineExceededError(f"embedding engine {engine.engine_id} timed out") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"embedding engine {engine.engine_id} failed: {exc!r}") from exc
        if resp.status >= 400:
            raise _engine_error(engine, resp.status, content)
        return parse_embeddings(content, texts)
