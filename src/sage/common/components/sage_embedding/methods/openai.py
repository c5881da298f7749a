"""`openai`: OpenAI's `POST /v1/embeddings` (or any OpenAI-compatible server via `base_url`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from sage.common.components.sage_embedding.credentials import api_key_check
from sage.common.components.sage_embedding.openai_compat import OpenAICompatibleEmbedding
from sage.common.components.sage_embedding.registry import MethodSpec

__all__ = ["SPEC", "OpenAIEmbedding"]


class OpenAIEmbedding(OpenAICompatibleEmbedding):
    """`{"model", "input", "encoding_format": "float", "dimensions"?}` with a Bearer key."""

    method = "openai"
    default_base_url = "https://api.openai.com/v1"
    default_model = "text-embedding-3-small"
    api_key_env = ("OPENAI_API_KEY",)
    max_batch_size = 2048  # OpenAI's documented per-request input limit
    known_dimensions: ClassVar[Mapping[str, int]] = {
        "text-embedding-3-small": 1536,
        "text-embedding-3-large": 3072,
        "text-embedding-ada-002": 1536,
    }


SPEC = MethodSpec(
    name="openai",
    display_name="OpenAI",
    description="OpenAI embeddings API (/v1/embeddings); base_url reaches compatible servers",
    factory=OpenAIEmbedding,
    requires_api_key=True,
    default_dimension=1536,
    examples=("text-embedding-3-small", "text-embedding-3-large", "text-embedding-ada-002"),
    check=api_key_check("openai", OpenAIEmbedding.api_key_env),
)
