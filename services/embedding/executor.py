"""EmbeddingExecutor: one `/v1/embeddings` call per batch to an OpenAI-compatible engine."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from sage.common.exceptions import (
    DeadlineExceededError,
    InvalidRequestError,
    SageError,
    ServiceUnavailableError,
    UpstreamError,
)


@dataclass(frozen=True)
class Endpoint:
    """An embedding engine to send batches to."""

    engine_id: str
    base_url: str


@dataclass(frozen=True)
class BatchResult:
    """Vectors in input order, the prompt token count, and the engine that served them."""

    vectors: list[list[float]]
    prompt_tokens: int
    engine_id: str


def parse_embeddings(content: bytes, expected: int) -> tuple[list[list[float]], int]:
    """Vectors ordered by `index` from an OpenAI embeddings reply, checked for count."""
    try:
        doc: Any = orjson.loads(content)
        items = sorted(doc["data"], key=lambda d: d["index"])
        vectors = [[float(x) for x in item["embedding"]] for item in items]
        tokens = int((doc.get("usage") or {}).get("prompt_tokens") or 0)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise UpstreamError(f"engine returned an invalid embeddings reply: {exc!r}") from exc
    if len(vectors) != expected:
        raise UpstreamError(f"engine returned {len(vectors)} vectors for {expected} inputs")
    return vectors, tokens


class EmbeddingExecutor:
    """Sends batches over pooled connections, rotating engines and failing over on refusal."""

    def __init__(self, *, timeout_s: float = 120.0) -> None:
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=5.0),
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=512),
            trust_env=False,
        )
        self._turn = itertools.count()

    async def aclose(self) -> None:
        """Close pooled connections."""
        await self._client.aclose()

    async def embed(
        self, model: str, inputs: Sequence[str], engines: Sequence[Endpoint], dimensions: int = 0
    ) -> BatchResult:
        """Embed one batch on one engine."""
        if not engines:
            raise ServiceUnavailableError(f"no embedding engine is ready for model {model!r}")
        if not inputs:
            raise InvalidRequestError("input must not be empty", param="input")
        payload: dict[str, Any] = {"model": model, "input": list(inputs)}
        if dimensions:
            payload["dimensions"] = dimensions
        body = orjson.dumps(payload)
        start = next(self._turn)
        last: SageError | None = None
        for i in range(len(engines)):
            engine = engines[(start + i) % len(engines)]
            try:
                resp = await self._client.post(
                    engine.base_url.rstrip("/") + "/v1/embeddings",
                    content=body,
                    headers={"content-type": "application/json"},
                )
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                last = UpstreamError(f"embedding engine {engine.engine_id} unreachable: {exc}")
                continue
            except httpx.TimeoutException as exc:
                raise DeadlineExceededError(
                    f"embedding engine {engine.engine_id} timed out"
                ) from exc
            if resp.status_code >= 400:
                message = resp.text[:500]
                if resp.status_code in (400, 422):
                    raise InvalidRequestError(
                        f"embedding engine rejected the input: {message}", param="input"
                    )
                raise UpstreamError(
                    f"embedding engine {engine.engine_id} returned HTTP {resp.status_code}: "
                    f"{message}"
                )
            vectors, tokens = parse_embeddings(resp.content, len(inputs))
            return BatchResult(vectors, tokens, engine.engine_id)
        assert last is not None
        raise last
