"""SAGE LLM: the unified inference client and the `sage llm` CLI."""

from sage.llm.client import UnifiedInferenceClient

__all__ = ["UnifiedInferenceClient"]
