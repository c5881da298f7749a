"""The project's own embedding engine: OpenAI `/v1/embeddings` over sentence-transformers."""

from sage.engines.embedding.app import create_app, main
from sage.engines.embedding.model import (
    BUNDLED_MODEL_NAME,
    EmbeddingModel,
    EngineConfig,
    resolve_model_path,
)

__all__ = [
    "BUNDLED_MODEL_NAME",
    "EmbeddingModel",
    "EngineConfig",
    "create_app",
    "main",
    "resolve_model_path",
]
