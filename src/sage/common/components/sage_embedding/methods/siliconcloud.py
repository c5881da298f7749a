"""`siliconcloud`: SiliconFlow's `POST https://api.siliconflow.cn/v1/embeddings` (OpenAI-like)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from sage.common.components.sage_embedding.credentials import api_key_check
from sage.common.components.sage_embedding.openai_compat import OpenAICompatibleEmbedding
from sage.common.components.sage_embedding.registry import MethodSpec

__all__ = ["SPEC", "SiliconCloudEmbedding"]


class SiliconCloudEmbedding(OpenAICompatibleEmbedding):
    """`{"model", "input", "encoding_format": "float", "dimensions"?}` with a Bearer key."""

    method = "siliconcloud"
    default_base_url = "https://api.siliconflow.cn/v1"
    default_model = "BAAI/bge-large-zh-v1.5"
    api_key_env = ("SILICONCLOUD_API_KEY", "SILICONFLOW_API_KEY")
    max_batch_size = 32
    known_dimensions: ClassVar[Mapping[str, int]] = {
        "BAAI/bge-large-zh-v1.5": 1024,
        "BAAI/bge-large-en-v1.5": 1024,
        "BAAI/bge-m3": 1024,
        "netease-youdao/bce-embedding-base_v1": 768,
    }


SPEC = MethodSpec(
    name="siliconcloud",
    display_name="SiliconFlow (SiliconCloud)",
    description="SiliconFlow hosted open embedding models (BGE, BCE, Qwen3) via an OpenAI-like API",
    factory=SiliconCloudEmbedding,
    requires_api_key=True,
    default_dimension=1024,
    examples=("BAAI/bge-large-zh-v1.5", "BAAI/bge-m3"),
    aliases=("siliconflow",),
    check=api_key_check("siliconcloud", SiliconCloudEmbedding.api_key_env),
)
