"""`nvidia_openai`: NVIDIA NIM `POST https://integrate.api.nvidia.com/v1/embeddings`.

OpenAI-shaped, plus `input_type` (`query` or `passage`: the retrieval models embed the
two sides differently) and `truncate` (`NONE`, `START`, `END`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Unpack

from sage.common.components.sage_embedding.credentials import api_key_check
from sage.common.components.sage_embedding.openai_compat import OpenAICompatibleEmbedding
from sage.common.components.sage_embedding.registry import MethodSpec
from sage.common.components.sage_embedding.remote import RemoteOptions

__all__ = ["SPEC", "NvidiaOpenAIEmbedding"]


class NvidiaOpenAIEmbedding(OpenAICompatibleEmbedding):
    """`{"model", "input", "input_type", "encoding_format": "float", "truncate", ...}`."""

    method = "nvidia_openai"
    default_base_url = "https://integrate.api.nvidia.com/v1"
    default_model = "nvidia/nv-embedqa-e5-v5"
    api_key_env = ("NVIDIA_OPENAI_API_KEY", "NVIDIA_API_KEY")
    max_batch_size = 50
    known_dimensions: ClassVar[Mapping[str, int]] = {
        "nvidia/nv-embedqa-e5-v5": 1024,
        "nvidia/nv-embed-v1": 4096,
        "nvidia/llama-3.2-nv-embedqa-1b-v2": 2048,
        "baai/bge-m3": 1024,
    }

    def __init__(
        self,
        *,
        input_type: str = "passage",
        truncate: str = "NONE",
        **options: Unpack[RemoteOptions],
    ) -> None:
        super().__init__(**options)
        self.input_type = input_type
        self.truncate = truncate

    def _request_body(self, texts: list[str]) -> dict[str, Any]:
        body = super()._request_body(texts)
        body["input_type"] = self.input_type
        body["truncate"] = self.truncate
        return body


SPEC = MethodSpec(
    name="nvidia_openai",
    display_name="NVIDIA NIM",
    description="NVIDIA NIM / API catalog embeddings (OpenAI-compatible, with input_type)",
    factory=NvidiaOpenAIEmbedding,
    requires_api_key=True,
    default_dimension=1024,
    examples=("nvidia/nv-embedqa-e5-v5", "nvidia/llama-3.2-nv-embedqa-1b-v2"),
    aliases=("nvidia",),
    check=api_key_check("nvidia_openai", NvidiaOpenAIEmbedding.api_key_env),
)
