"""`jina`: Jina AI's `POST https://api.jina.ai/v1/embeddings` (OpenAI-shaped, own options)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Unpack

from sage.common.components.sage_embedding.credentials import api_key_check
from sage.common.components.sage_embedding.openai_compat import OpenAICompatibleEmbedding
from sage.common.components.sage_embedding.registry import MethodSpec
from sage.common.components.sage_embedding.remote import RemoteOptions

__all__ = ["SPEC", "JinaEmbedding"]


class JinaEmbedding(OpenAICompatibleEmbedding):
    """`{"model", "input", "embedding_type": "float", "task"?, "dimensions"?, "normalized"?}`.

    `task` picks the v3 LoRA adapter (`retrieval.query`, `retrieval.passage`,
    `text-matching`, `classification`, `separation`).
    """

    method = "jina"
    default_base_url = "https://api.jina.ai/v1"
    default_model = "jina-embeddings-v3"
    api_key_env = ("JINA_API_KEY",)
    send_encoding_format = False
    max_batch_size = 512
    known_dimensions: ClassVar[Mapping[str, int]] = {
        "jina-embeddings-v3": 1024,
        "jina-embeddings-v2-base-en": 768,
        "jina-embeddings-v2-base-zh": 768,
        "jina-embeddings-v2-small-en": 512,
    }

    def __init__(
        self,
        *,
        task: str | None = None,
        normalized: bool | None = None,
        **options: Unpack[RemoteOptions],
    ) -> None:
        super().__init__(**options)
        self.task = task
        self.normalized = normalized

    def _request_body(self, texts: list[str]) -> dict[str, Any]:
        body = super()._request_body(texts)
        body["embedding_type"] = "float"
        if self.task is not None:
            body["task"] = self.task
        if self.normalized is not None:
            body["normalized"] = self.normalized
        return body


SPEC = MethodSpec(
    name="jina",
    display_name="Jina AI",
    description="Jina AI embeddings API (jina-embeddings-v3, task adapters, Matryoshka dims)",
    factory=JinaEmbedding,
    requires_api_key=True,
    default_dimension=1024,
    examples=("jina-embeddings-v3", "jina-embeddings-v2-base-zh"),
    check=api_key_check("jina", JinaEmbedding.api_key_env),
)
