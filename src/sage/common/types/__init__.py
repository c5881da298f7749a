"""Shared data types: documents, dense/sparse vectors, and JSON-safe metadata."""

from sage.common.types.document import BaseDocument
from sage.common.types.metadata import JsonValue, Metadata
from sage.common.types.vectors import DenseVector, SparseVector

__all__ = ["BaseDocument", "DenseVector", "JsonValue", "Metadata", "SparseVector"]
