"""BaseDocument: the unit of text (plus metadata and embeddings) passed between components.

One pydantic model so every component agrees on field names and validation, and a
document survives JSON / dict round trips unchanged (HTTP bodies, queues, stores).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Self

from pydantic import BaseModel, ConfigDict, Field

from sage.common.types.metadata import Metadata
from sage.common.types.vectors import DenseVector, SparseVector


def _new_id() -> str:
    return uuid.uuid4().hex


class BaseDocument(BaseModel):
    """Foundation for all document types: id, content, metadata and optional embeddings.

    `embedding` accepts a DenseVector, a list of floats or a numpy-like array; `sparse`
    a SparseVector, {"indices", "values"} or an {index: value} mapping.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    id: str = Field(default_factory=_new_id, min_length=1)
    content: str
    metadata: Metadata = Field(default_factory=Metadata)
    embedding: DenseVector | None = None
    sparse: SparseVector | None = None

    if TYPE_CHECKING:
        # The input forms validation accepts, so callers type-check without casts.
        def __init__(
            self,
            *,
            id: str = ...,
            content: str,
            metadata: Mapping[str, Any] | None = ...,
            embedding: DenseVector | Iterable[float] | None = ...,
            sparse: SparseVector | Mapping[int, float] | Mapping[str, Any] | None = ...,
        ) -> None: ...

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible dict (vectors as {"values": ...} objects)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Inverse of `to_dict`; ValidationError names any bad field."""
        return cls.model_validate(dict(data))

    def to_json(self, *, indent: int | None = None) -> str:
        """JSON text."""
        return self.model_dump_json(indent=indent)

    @classmethod
    def from_json(cls, text: str | bytes) -> Self:
        """Inverse of `to_json`."""
        return cls.model_validate_json(text)
