"""HTTP front of the embedding engine: OpenAI `/v1/embeddings`, `/v1/models`, `/health`,
`/metrics`. Requests are batched across callers in-process (see batching.py)."""

from __future__ import annotations

import argparse
import base64
import time
from collections.abc import Sequence
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from sage.common.exceptions import ConfigurationError, InvalidRequestError, ModelNotFoundError
from sage.common.http.asgi import App, JSONResponse, Request, Response
from sage.common.http.server import serve_app
from sage.common.utils.logging import configure_logging
from sage.engines.auth import add_api_key_argument, protect, resolve_api_key

from .batching import InProcessBatcher
from .model import EmbeddingModel, EngineConfig

__all__ = ["create_app", "main", "parse_embedding_request"]

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def parse_embedding_request(
    body: bytes, names: Sequence[str], dim: int, max_inputs: int
) -> tuple[str, list[str], str]:
    """(model, inputs, encoding_format) or a 4xx naming the bad field."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidRequestError("request body must be a JSON object")
    model = doc.get("model") or names[0]
    if not isinstance(model, str):
        raise InvalidRequestError("model must be a string", param="model")
    if model not in names:
        raise ModelNotFoundError(model)
    raw = doc.get("input")
    if raw is None:
        raise InvalidRequestError("input is required", param="input")
    inputs = [raw] if isinstance(raw, str) else raw
    if not isinstance(inputs, list) or not inputs:
        raise InvalidRequestError(
            "input must be a string or a non-empty array of strings", param="input"
        )
    if len(inputs) > max_inputs:
        raise InvalidRequestError(
            f"input has {len(inputs)} items; at most {max_inputs} per request", param="input"
        )
    for i, text in enumerate(inputs):
        if not isinstance(text, str):
            raise InvalidRequestError(
                f"input[{i}] must be a string (token arrays are not supported)",
                param=f"input[{i}]",
            )
        if not text:
            raise InvalidRequestError(f"input[{i}] must not be empty", param=f"input[{i}]")
    encoding = doc.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise InvalidRequestError(
            "encoding_format must be float or base64", param="encoding_format"
        )
    dimensions = doc.get("dimensions")
    if dimensions is not None and dimensions != dim:
        raise InvalidRequestError(
            f"this model produces {dim}-dimensional vectors; dimensions={dimensions!r} is not "
            "supported",
            param="dimensions",
        )
    return model, inputs, encoding


class _Engine:
    def __init__(self, config: EngineConfig, model: EmbeddingModel) -> None:
        self.config = config
        self.model = model
        self.names = config.names
        self.registry = CollectorRegistry()
        label = ["model_name"]
        name = self.names[0]
        self.requests = Counter(
            "sage_embedding_requests", "Embedding requests served.", label, registry=self.registry
        ).labels(model_name=name)
        self.tokens = Counter(
            "sage_embedding_prompt_tokens", "Tokens embedded.", label, registry=self.registry
        ).labels(model_name=name)
        self.batch_size = Histogram(
            "sage_embedding_batch_size",
            "Texts per model batch.",
            label,
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        ).labels(model_name=name)
        self.latency = Histogram(
            "sage_embedding_request_latency_seconds",
            "Arrival to reply, queueing included.",
            label,
            registry=self.registry,
        ).labels(model_name=name)
        self.batcher = InProcessBatcher(
            self._compute,
            max_batch_size=config.max_batch_size,
            max_batch_chars=config.max_batch_tokens * 4,
            # The model truncates at its window: a longer text costs one window.
            max_text_chars=model.max_seq_length * 4,
            max_wait_ms=config.max_wait_ms,
            on_batch=self.batch_size.observe,
        )
        Gauge(
            "sage_embedding_queue_texts",
            "Texts waiting for a batch.",
            label,
            registry=self.registry,
        ).labels(model_name=name).set_function(lambda: self.batcher.stats.queued_texts)

    def _compute(self, texts: list[str]) -> tuple[Any, list[int]]:
        return self.model.encode_with_counts(texts)

    async def embeddings(self, request: Request) -> Response:
        started = time.perf_counter()
        model, inputs, encoding = parse_embedding_request(
            await request.body(), self.names, self.model.dim, self.config.max_inputs
        )
        vectors, tokens = await self.batcher.embed(inputs)
        total = int(sum(tokens))
        if encoding == "base64":
            # Imported here so the engine's modules import on the base install (no numpy);
            # a loaded model means the engines extra, and numpy, are there.
            import numpy as np

            rows: list[Any] = [
                base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() for v in vectors
            ]
        else:
            rows = list(vectors)
        body = orjson.dumps(
            {
                "object": "list",
                "model": model,
                "data": [
                    {"object": "embedding", "index": i, "embedding": row}
                    for i, row in enumerate(rows)
                ],
                "usage": {"prompt_tokens": total, "total_tokens": total},
                # Per-input counts (not in OpenAI's schema): lets a batching caller give
                # each of its own callers exact usage.
                "sage_tokens": tokens,
            },
            option=orjson.OPT_SERIALIZE_NUMPY,
        )
        self.requests.inc()
        self.tokens.inc(total)
        self.latency.observe(time.perf_counter() - started)
        return Response(body)

    async def models(self, request: Request) -> Response:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": n,
                        "object": "model",
                        "created": 0,
                        "owned_by": "sage",
                        "root": self.names[0],
                        "dimensions": self.model.dim,
                        "max_model_len": self.model.max_seq_length,
                    }
                    for n in self.names
                ],
            }
        )

    async def health(self, request: Request) -> Response:
        return Response(b"", content_type=b"text/plain")

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), content_type=CONTENT_TYPE_LATEST.encode())


def create_app(config: EngineConfig, model: EmbeddingModel | None = None) -> App:
    """The engine's ASGI app; loads the model now unless one is passed in."""
    engine = _Engine(config, model or EmbeddingModel(config))
    app = App(on_shutdown=engine.batcher.close)
    app.add("POST", "/v1/embeddings", engine.embeddings)
    app.add("GET", "/v1/models", engine.models)
    app.add("GET", "/health", engine.health)
    app.add("GET", "/metrics", engine.metrics)
    return app


def main(argv: Sequence[str] | None = None) -> int:
    """Load the model, then serve until SIGTERM/SIGINT."""
    defaults = EngineConfig()
    parser = argparse.ArgumentParser(
        prog="python -m sage.engines.embedding",
        description="OpenAI-compatible embedding server over sentence-transformers, with "
        "dynamic batching across callers.",
    )
    parser.add_argument(
        "--model",
        default=defaults.model,
        help="local path or HF id; default: the bundled all-MiniLM-L6-v2",
    )
    parser.add_argument("--served-model-name", default="", help="name clients use")
    parser.add_argument("--alias", action="append", default=[], help="extra served name")
    parser.add_argument("--host", default=defaults.host)
    parser.add_argument("--port", type=int, default=defaults.port)
    parser.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    parser.add_argument("--max-batch-tokens", type=int, default=defaults.max_batch_tokens)
    parser.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms)
    parser.add_argument(
        "--max-inputs", type=int, default=defaults.max_inputs, help="most inputs in one request"
    )
    parser.add_argument("--log-level", default="INFO", type=str.upper)
    add_api_key_argument(parser)
    args = parser.parse_args(None if argv is None else list(argv))
    configure_logging("embedding-engine", args.log_level)
    config = EngineConfig(
        model=args.model,
        served_name=args.served_model_name,
        aliases=tuple(args.alias),
        host=args.host,
        port=args.port,
        device=args.device,
        max_batch_size=args.max_batch_size,
        max_batch_tokens=args.max_batch_tokens,
        max_wait_ms=args.max_wait_ms,
        max_inputs=args.max_inputs,
    )
    try:
        model = EmbeddingModel(config)
    except ConfigurationError as exc:
        parser.exit(2, f"error: {exc.message}\n")
    return serve_app(
        protect(create_app(config, model), resolve_api_key(args.api_key)),
        config.host,
        config.port,
        what="embedding engine",
        info={"model": config.names[0], "device": model.device, "dim": model.dim},
    )
