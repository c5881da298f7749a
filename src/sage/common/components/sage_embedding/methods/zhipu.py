"""`zhipu`: Zhipu AI (BigModel) `POST https://open.bigmodel.cn/api/paas/v4/embeddings`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from sage.common.components.sage_embedding.credentials import api_key_check
from sage.common.components.sage_embedding.openai_compat import OpenAICompatibleEmbedding
from sage.common.components.sage_embedding.registry import MethodSpec

__all__ = ["SPEC", "ZhipuEmbedding"]


class ZhipuEmbedding(OpenAICompatibleEmbedding):
    """`{"model", "input", "dimensions"?}` with a Bearer key; OpenAI-shaped answer."""

    method = "zhipu"
    default_base_url = "https://open.bigmodel.cn/api/paas/v4"
    default_model = "embedding-3"
    api_key_env = ("ZHIPU_API_KEY", "ZHIPUAI_API_KEY")
    send_encoding_format = False
    max_batch_size = 64  # embedding-3 accepts at most 64 inputs per request
    known_dimensions: ClassVar[Mapping[str, int]] = {"embedding-3": 2048, "embedding-2": 1024}


SPEC = MethodSpec(
    name="zhipu",
    display_name="Zhipu AI (BigModel)",
    description="Zhipu AI embeddings API (embedding-3 with 256-2048 dims, embedding-2)",
    factory=ZhipuEmbedding,
    requires_api_key=True,
    default_dimension=2048,
    examples=("embedding-3", "embedding-2"),
    check=api_key_check("zhipu", ZhipuEmbedding.api_key_env),
)
