"""The built-in embedding methods, one module each; `BUILTIN_METHODS` is their registration list."""

from __future__ import annotations

from sage.common.components.sage_embedding.methods import (
    bedrock,
    cohere,
    hash,
    hf,
    jina,
    mockembedder,
    nvidia_openai,
    ollama,
    openai,
    siliconcloud,
    zhipu,
)
from sage.common.components.sage_embedding.registry import MethodSpec

__all__ = ["BUILTIN_METHODS"]

BUILTIN_METHODS: tuple[MethodSpec, ...] = (
    hash.SPEC,
    mockembedder.SPEC,
    hf.SPEC,
    openai.SPEC,
    jina.SPEC,
    zhipu.SPEC,
    cohere.SPEC,
    ollama.SPEC,
    siliconcloud.SPEC,
    bedrock.SPEC,
    nvidia_openai.SPEC,
)
