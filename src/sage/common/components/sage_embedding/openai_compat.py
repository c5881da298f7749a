"""The OpenAI `/embeddings` wire format, shared by OpenAI, Jina, Zhipu, SiliconFlow and NVIDIA.

Request: `POST {base_url}/embeddings` with `{"model", "input": [...], ...}` and
`Authorization: Bearer <key>`. Response: `{"data": [{"index", "embedding"}, ...]}`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from sage.common.components.sage_embedding.protocols import Vector
from sage.common.components.sage_embedding.remote import (
    RemoteEmbedding,
    float_vectors,
    require_key,
)
from sage.common.exceptions import UpstreamError

__all__ = ["OpenAICompatibleEmbedding", "parse_openai_embeddings"]


class OpenAICompatibleEmbedding(RemoteEmbedding):
    """A provider speaking OpenAI's embeddings format; subclasses add their extra fields."""

    embeddings_path: ClassVar[str] = "/embeddings"
    # OpenAI, SiliconFlow and NVIDIA take `encoding_format`; Zhipu and Jina do not document it.
    send_encoding_format: ClassVar[bool] = True

    def _request_body(self, texts: list[str]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self._model, "input": texts}
        if self.send_encoding_format:
            body["encoding_format"] = "float"
        if self.dimensions is not None:
            body["dimensions"] = self.dimensions
        return body

    def _embed_chunk(self, texts: list[str]) -> list[Vector]:
        doc = self._post(self.base_url + self.embeddings_path, self._request_body(texts))
        return parse_openai_embeddings(doc, len(texts), self.method)


def parse_openai_embeddings(doc: Any, count: int, provider: str) -> list[Vector]:
    """Vectors from an OpenAI-format response, put back in input order by `index`."""
    data = require_key(doc, "data", provider)
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise UpstreamError(f"{provider} response field 'data' is not a list of objects")
    if len(data) != count:
        raise UpstreamError(f"{provider} returned {len(data)} embeddings for {count} inputs")
    indices = [item.get("index") for item in data]
    if all(isinstance(i, int) for i in indices):
        if sorted(indices) != list(range(count)):
            raise UpstreamError(f"{provider} returned embedding indices {indices}")
        data = sorted(data, key=lambda item: int(item["index"]))
    return float_vectors([item.get("embedding") for item in data], provider)
