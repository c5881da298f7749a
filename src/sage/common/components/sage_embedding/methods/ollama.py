"""`ollama`: a local Ollama server's `POST /api/embed` (`{model, input}` -> `{embeddings}`).

No API key: Ollama listens on localhost. A key in `api_key` / `OLLAMA_API_KEY` is sent
as a Bearer token for servers behind an authenticating proxy. The address comes from
`base_url`, else `OLLAMA_HOST`, else http://localhost:11434.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, ClassVar, Unpack

from sage.common.components.sage_embedding.protocols import ModelAvailability, Vector
from sage.common.components.sage_embedding.registry import MethodSpec
from sage.common.components.sage_embedding.remote import (
    RemoteEmbedding,
    RemoteOptions,
    float_vectors,
    require_key,
)

__all__ = ["SPEC", "OllamaEmbedding"]

DEFAULT_OLLAMA_URL = "http://localhost:11434"


def ollama_base_url(env: Mapping[str, str]) -> str:
    """`OLLAMA_HOST` as a URL (it may be a bare `host:port`), else the default address."""
    host = (env.get("OLLAMA_HOST") or "").strip()
    if not host:
        return DEFAULT_OLLAMA_URL
    if "://" not in host:
        host = "http://" + host
    return host.rstrip("/")


class OllamaEmbedding(RemoteEmbedding):
    """Ollama `/api/embed`; `truncate` and `keep_alive` are passed through when given."""

    method = "ollama"
    default_base_url = DEFAULT_OLLAMA_URL
    default_model = "nomic-embed-text"
    api_key_env = ("OLLAMA_API_KEY",)
    requires_api_key = False
    max_batch_size = 256
    max_concurrency = 2  # one local server: more parallel requests only queue there
    known_dimensions: ClassVar[Mapping[str, int]] = {
        "nomic-embed-text": 768,
        "mxbai-embed-large": 1024,
        "all-minilm": 384,
        "bge-m3": 1024,
    }

    def __init__(
        self,
        *,
        truncate: bool | None = None,
        keep_alive: str | None = None,
        **options: Unpack[RemoteOptions],
    ) -> None:
        if not options.get("base_url"):
            env = options.get("env")
            options["base_url"] = ollama_base_url(os.environ if env is None else env)
        super().__init__(**options)
        self.truncate = truncate
        self.keep_alive = keep_alive

    def _embed_chunk(self, texts: list[str]) -> list[Vector]:
        body: dict[str, Any] = {"model": self._model, "input": texts}
        if self.truncate is not None:
            body["truncate"] = self.truncate
        if self.keep_alive is not None:
            body["keep_alive"] = self.keep_alive
        if self.dimensions is not None:
            body["dimensions"] = self.dimensions
        doc = self._post(self.base_url + "/api/embed", body)
        embeddings = require_key(doc, "embeddings", self.method)
        if not isinstance(embeddings, list):
            embeddings = [embeddings]
        return float_vectors(embeddings, self.method)


def _check(model: str | None, env: Mapping[str, str]) -> ModelAvailability:
    name = model or OllamaEmbedding.default_model
    return {
        "status": "available",
        "message": (
            f"ollama needs no API key; {name!r} must be pulled on the server at "
            f"{ollama_base_url(env)} (not checked, to avoid a network call)"
        ),
        "action": f"ollama pull {name}",
    }


SPEC = MethodSpec(
    name="ollama",
    display_name="Ollama",
    description="A local Ollama server (/api/embed); no API key, models pulled with `ollama pull`",
    factory=OllamaEmbedding,
    default_dimension=768,
    examples=("nomic-embed-text", "mxbai-embed-large", "bge-m3"),
    check=_check,
)
