"""The project's own chat engine: OpenAI chat/completions over Hugging Face transformers.

Meant for small models on CPU or one GPU (vLLM is the backend for large ones); concurrent
requests are decoded together in one batch. It speaks
vLLM's JSON, SSE and `/metrics` names, so the scheduler treats it like any other engine.
"""

from sage.engines.transformers.app import create_app, main
from sage.engines.transformers.model import (
    FALLBACK_CHAT_TEMPLATE,
    CausalLM,
    EngineConfig,
    Generation,
    Outcome,
    SamplingParams,
)

__all__ = [
    "FALLBACK_CHAT_TEMPLATE",
    "CausalLM",
    "EngineConfig",
    "Generation",
    "Outcome",
    "SamplingParams",
    "create_app",
    "main",
]
