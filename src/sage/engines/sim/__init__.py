"""A vLLM-compatible simulator engine, a tool for testing and benchmarking the control plane.

It speaks vLLM's OpenAI HTTP API and exposes vLLM's `/metrics` names, with latency from a
continuous-batching model instead of a GPU, so schedulers can be exercised without one.
"""

from sage.engines.sim.app import create_app, main
from sage.engines.sim.model import (
    AdmissionQueue,
    Generation,
    SimConfig,
    chat_prompt_text,
    count_tokens,
    embedding_vector,
    expected_text,
    generate,
    generate_ids,
    tokenize,
)

__all__ = [
    "AdmissionQueue",
    "Generation",
    "SimConfig",
    "chat_prompt_text",
    "count_tokens",
    "create_app",
    "embedding_vector",
    "expected_text",
    "generate",
    "generate_ids",
    "main",
    "tokenize",
]
