"""sage_embedding: one interface over many embedding methods.

    from sage.common.components.sage_embedding import (
        EmbeddingFactory, EmbeddingClientAdapter, list_embedding_models,
    )
    embedder = EmbeddingFactory.create("hash", dim=384)   # single text: embedder.embed(text)
    client = EmbeddingClientAdapter(embedder)             # batches: client.embed([...])

Methods: hash, mockembedder, hf, openai, jina, zhipu, cohere, ollama, siliconcloud,
bedrock, nvidia_openai. `hf` imports torch only when a model is created.
"""

from __future__ import annotations

from sage.common.components.sage_embedding.adapter import EmbeddingClientAdapter
from sage.common.components.sage_embedding.base import BaseEmbedding
from sage.common.components.sage_embedding.factory import (
    EmbeddingFactory,
    check_model_availability,
    default_registry,
    get_embedding_model,
    list_embedding_models,
)
from sage.common.components.sage_embedding.methods.bedrock import BedrockEmbedding
from sage.common.components.sage_embedding.methods.cohere import CohereEmbedding
from sage.common.components.sage_embedding.methods.hash import HashEmbedding
from sage.common.components.sage_embedding.methods.hf import HFEmbedding
from sage.common.components.sage_embedding.methods.jina import JinaEmbedding
from sage.common.components.sage_embedding.methods.mockembedder import MockEmbedding
from sage.common.components.sage_embedding.methods.nvidia_openai import NvidiaOpenAIEmbedding
from sage.common.components.sage_embedding.methods.ollama import OllamaEmbedding
from sage.common.components.sage_embedding.methods.openai import OpenAIEmbedding
from sage.common.components.sage_embedding.methods.siliconcloud import SiliconCloudEmbedding
from sage.common.components.sage_embedding.methods.zhipu import ZhipuEmbedding
from sage.common.components.sage_embedding.protocols import (
    AvailabilityStatus,
    BatchEmbeddingProtocol,
    EmbeddingModelInfo,
    EmbeddingProtocol,
    ModelAvailability,
    Vector,
)
from sage.common.components.sage_embedding.registry import MethodRegistry, MethodSpec
from sage.common.components.sage_embedding.remote import RemoteEmbedding, RetryPolicy

__all__ = [
    "AvailabilityStatus",
    "BaseEmbedding",
    "BatchEmbeddingProtocol",
    "BedrockEmbedding",
    "CohereEmbedding",
    "EmbeddingClientAdapter",
    "EmbeddingFactory",
    "EmbeddingModelInfo",
    "EmbeddingProtocol",
    "HFEmbedding",
    "HashEmbedding",
    "JinaEmbedding",
    "MethodRegistry",
    "MethodSpec",
    "MockEmbedding",
    "ModelAvailability",
    "NvidiaOpenAIEmbedding",
    "OllamaEmbedding",
    "OpenAIEmbedding",
    "RemoteEmbedding",
    "RetryPolicy",
    "SiliconCloudEmbedding",
    "Vector",
    "ZhipuEmbedding",
    "check_model_availability",
    "default_registry",
    "get_embedding_model",
    "list_embedding_models",
]
