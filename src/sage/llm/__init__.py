"""SAGE LLM: the unified inference clients and the `sage llm` CLI."""

from sage.llm.async_client import (
    AsyncResponseStream,
    AsyncTextStream,
    AsyncUnifiedInferenceClient,
)
from sage.llm.client import ResponseStream, TextStream, UnifiedInferenceClient
from sage.llm.result import (
    InferenceResult,
    RerankResult,
    ResponseEvent,
    ResponsesResult,
    ResponseUsage,
    Usage,
)

__all__ = [
    "AsyncResponseStream",
    "AsyncTextStream",
    "AsyncUnifiedInferenceClient",
    "InferenceResult",
    "RerankResult",
    "ResponseEvent",
    "ResponseStream",
    "ResponseUsage",
    "ResponsesResult",
    "TextStream",
    "UnifiedInferenceClient",
    "Usage",
]
