"""`cohere`: Cohere's v2 embed API, `POST https://api.cohere.com/v2/embed`.

Request `{"model", "texts", "input_type", "embedding_types": ["float"]}`; the answer
carries the vectors under `embeddings.float`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Unpack

from sage.common.components.sage_embedding.credentials import api_key_check
from sage.common.components.sage_embedding.protocols import Vector
from sage.common.components.sage_embedding.registry import MethodSpec
from sage.common.components.sage_embedding.remote import (
    RemoteEmbedding,
    RemoteOptions,
    float_vectors,
    require_key,
)
from sage.common.exceptions import UpstreamError

__all__ = ["SPEC", "CohereEmbedding"]


class CohereEmbedding(RemoteEmbedding):
    """Cohere v2 `/v2/embed`; `input_type` is required by v3+ models (`search_document`,
    `search_query`, `classification`, `clustering`); `dimensions` maps to
    `output_dimension` (embed-v4.0 only)."""

    method = "cohere"
    default_base_url = "https://api.cohere.com"
    default_model = "embed-multilingual-v3.0"
    api_key_env = ("COHERE_API_KEY", "CO_API_KEY")
    max_batch_size = 96  # Cohere's per-request limit on texts
    known_dimensions: ClassVar[Mapping[str, int]] = {
        "embed-english-v3.0": 1024,
        "embed-multilingual-v3.0": 1024,
        "embed-english-light-v3.0": 384,
        "embed-multilingual-light-v3.0": 384,
        "embed-v4.0": 1536,
    }

    def __init__(
        self,
        *,
        input_type: str = "search_document",
        truncate: str | None = None,
        **options: Unpack[RemoteOptions],
    ) -> None:
        super().__init__(**options)
        self.input_type = input_type
        self.truncate = truncate

    def _embed_chunk(self, texts: list[str]) -> list[Vector]:
        body: dict[str, Any] = {
            "model": self._model,
            "texts": texts,
            "input_type": self.input_type,
            "embedding_types": ["float"],
        }
        if self.dimensions is not None:
            body["output_dimension"] = self.dimensions
        if self.truncate is not None:
            body["truncate"] = self.truncate
        doc = self._post(self.base_url + "/v2/embed", body)
        embeddings = require_key(doc, "embeddings", self.method)
        if not isinstance(embeddings, dict) or not isinstance(embeddings.get("float"), list):
            raise UpstreamError("cohere response has no 'embeddings.float' list")
        return float_vectors(embeddings["float"], self.method)


SPEC = MethodSpec(
    name="cohere",
    display_name="Cohere",
    description="Cohere embed API v2 (embed-multilingual-v3.0, embed-english-v3.0, embed-v4.0)",
    factory=CohereEmbedding,
    requires_api_key=True,
    default_dimension=1024,
    examples=("embed-multilingual-v3.0", "embed-english-v3.0", "embed-v4.0"),
    check=api_key_check("cohere", CohereEmbedding.api_key_env),
)
