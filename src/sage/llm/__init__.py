"""SAGE LLM: the unified inference clients and the `sage llm` CLI."""

from sage.llm.async_client import AsyncTextStream, AsyncUnifiedInferenceClient
from sage.llm.client import TextStream, UnifiedInferenceClient
from sage.llm.result import InferenceResult, RerankResult, Usage

__all__ = [
    "AsyncTextStream",
    "AsyncUnifiedInferenceClient",
    "InferenceResult",
    "RerankResult",
    "TextStream",
    "UnifiedInferenceClient",
    "Usage",
]
