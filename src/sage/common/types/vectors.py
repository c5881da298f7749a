"""Dense and sparse embedding vectors.

Embeddings come from many engines (vLLM, TEI, sentence-transformers, cloud APIs) and
often as numpy arrays; these models turn them into plain, validated, JSON-serialisable
values once, so a NaN from a broken engine is rejected at the boundary with the position
named instead of silently poisoning similarity scores later.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


def _as_list(value: Any, field: str) -> list[Any]:
    """Accept lists, tuples, generators and numpy-like arrays (anything with .tolist())."""
    if isinstance(value, (str, bytes, bytearray, Mapping)):
        raise ValueError(f"{field} must be a sequence of numbers, got {type(value).__name__}")
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        value = tolist()
    if isinstance(value, numbers.Number):  # 0-d array or a bare scalar
        raise ValueError(f"{field} must be a sequence of numbers, got a scalar")
    if not isinstance(value, Iterable):
        raise ValueError(f"{field} must be a sequence of numbers, got {type(value).__name__}")
    return list(value)


def _finite_floats(value: Any, field: str) -> list[float]:
    """Plain floats, rejecting NaN/inf and non-numbers with the offending index named."""
    out: list[float] = []
    for i, x in enumerate(_as_list(value, field)):
        if isinstance(x, bool) or not isinstance(x, numbers.Real):
            raise ValueError(f"{field}[{i}] must be a real number, got {type(x).__name__}")
        try:
            f = float(x)
        except (OverflowError, ValueError) as exc:
            raise ValueError(f"{field}[{i}] cannot be converted to float: {exc}") from None
        if math.isnan(f):
            raise ValueError(f"{field}[{i}] is NaN; vector values must be finite")
        if math.isinf(f):
            raise ValueError(f"{field}[{i}] is infinite ({f}); vector values must be finite")
        out.append(f)
    return out


def _sum(terms: list[float]) -> float:
    """Accurate sum (fsum) that degrades to a plain sum instead of raising on overflow."""
    try:
        return math.fsum(terms)
    except (OverflowError, ValueError):
        return sum(terms)


def _ints(value: Any, field: str) -> list[int]:
    out: list[int] = []
    for i, x in enumerate(_as_list(value, field)):
        if isinstance(x, bool) or not isinstance(x, numbers.Integral):
            raise ValueError(f"{field}[{i}] must be an integer, got {type(x).__name__}")
        out.append(int(x))
    return out


class DenseVector(BaseModel):
    """A dense embedding: a non-empty list of finite floats."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    values: list[float] = Field(min_length=1)

    if TYPE_CHECKING:
        # What callers may pass (numpy arrays, tuples...); validation makes it list[float].
        def __init__(self, *, values: Iterable[float]) -> None: ...

    @model_validator(mode="before")
    @classmethod
    def _wrap_sequence(cls, data: Any) -> Any:
        """Let a bare list / numpy array stand for {"values": ...}."""
        if isinstance(data, (DenseVector, Mapping)):
            return data
        return {"values": data}

    @field_validator("values", mode="before")
    @classmethod
    def _check_values(cls, value: Any) -> list[float]:
        return _finite_floats(value, "values")

    @classmethod
    def from_sequence(cls, values: Any) -> DenseVector:
        """Build from any sequence or numpy-like array of numbers."""
        return cls.model_validate({"values": values})

    @property
    def dim(self) -> int:
        """Number of dimensions."""
        return len(self.values)

    def __len__(self) -> int:
        return len(self.values)

    def to_list(self) -> list[float]:
        """A copy of the values, safe to mutate."""
        return list(self.values)

    def norm(self) -> float:
        """Euclidean (L2) norm (hypot: no intermediate overflow)."""
        return math.hypot(*self.values)

    def _other_values(self, other: DenseVector | Sequence[float]) -> list[float]:
        vals = other.values if isinstance(other, DenseVector) else _finite_floats(other, "other")
        if len(vals) != self.dim:
            raise ValueError(f"dimension mismatch: {self.dim} vs {len(vals)}")
        return vals

    def dot(self, other: DenseVector | Sequence[float]) -> float:
        """Inner product with a vector of the same dimension."""
        return _sum([a * b for a, b in zip(self.values, self._other_values(other), strict=True)])

    def cosine_similarity(self, other: DenseVector | Sequence[float]) -> float:
        """Cosine similarity in [-1, 1]; ValueError for a zero vector (undefined)."""
        vals = self._other_values(other)
        na = self.norm()
        nb = math.hypot(*vals)
        if na == 0.0 or nb == 0.0:
            raise ValueError("cosine similarity is undefined for a zero vector")
        # Scale before multiplying so huge components cannot overflow.
        sim = _sum([(a / na) * (b / nb) for a, b in zip(self.values, vals, strict=True)])
        return max(-1.0, min(1.0, sim))

    def normalized(self) -> DenseVector:
        """Unit-length copy; ValueError for a zero vector."""
        n = self.norm()
        if n == 0.0:
            raise ValueError("cannot normalise a zero vector")
        return DenseVector(values=[v / n for v in self.values])


class SparseVector(BaseModel):
    """A sparse vector (e.g. SPLADE / BM25 weights): sorted unique indices and their values."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    indices: list[int] = Field(default_factory=list)
    values: list[float] = Field(default_factory=list)
    dim: int | None = Field(default=None, ge=0)

    if TYPE_CHECKING:

        def __init__(
            self,
            *,
            indices: Iterable[int] = ...,
            values: Iterable[float] = ...,
            dim: int | None = ...,
        ) -> None: ...

    @model_validator(mode="before")
    @classmethod
    def _from_index_mapping(cls, data: Any) -> Any:
        """Let {index: value} (int keys) stand for the indices/values form."""
        if (
            isinstance(data, Mapping)
            and data
            and all(isinstance(k, numbers.Integral) and not isinstance(k, bool) for k in data)
        ):
            items = sorted((int(k), v) for k, v in data.items())
            return {"indices": [k for k, _ in items], "values": [v for _, v in items]}
        return data

    @field_validator("indices", mode="before")
    @classmethod
    def _check_indices(cls, value: Any) -> list[int]:
        idx = _ints(value, "indices")
        for i, x in enumerate(idx):
            if x < 0:
                raise ValueError(f"indices[{i}] is negative ({x})")
            if i and x <= idx[i - 1]:
                raise ValueError(
                    f"indices must be sorted and unique: indices[{i}]={x} "
                    f"follows indices[{i - 1}]={idx[i - 1]}"
                )
        return idx

    @field_validator("values", mode="before")
    @classmethod
    def _check_values(cls, value: Any) -> list[float]:
        return _finite_floats(value, "values")

    @model_validator(mode="after")
    def _check_shape(self) -> SparseVector:
        if len(self.indices) != len(self.values):
            raise ValueError(
                f"indices and values must have the same length "
                f"({len(self.indices)} != {len(self.values)})"
            )
        if self.dim is not None and self.indices and self.indices[-1] >= self.dim:
            raise ValueError(f"index {self.indices[-1]} is out of range for dim {self.dim}")
        return self

    @classmethod
    def from_mapping(cls, mapping: Mapping[int, float], dim: int | None = None) -> SparseVector:
        """Build from {index: value}; indices are sorted for you."""
        items = sorted(mapping.items())
        return cls(indices=[k for k, _ in items], values=[v for _, v in items], dim=dim)

    @classmethod
    def from_dense(cls, values: Any, *, keep_zeros: bool = False) -> SparseVector:
        """Sparse form of a dense sequence (dim = its length), dropping zeros by default."""
        dense = _finite_floats(values, "values")
        pairs = [(i, v) for i, v in enumerate(dense) if keep_zeros or v != 0.0]
        return cls(indices=[i for i, _ in pairs], values=[v for _, v in pairs], dim=len(dense))

    @property
    def nnz(self) -> int:
        """Number of stored entries."""
        return len(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def to_mapping(self) -> dict[int, float]:
        """{index: value} copy."""
        return dict(zip(self.indices, self.values, strict=True))

    def norm(self) -> float:
        """Euclidean (L2) norm (hypot: no intermediate overflow)."""
        return math.hypot(*self.values)

    def dot(self, other: SparseVector) -> float:
        """Inner product with another sparse vector (merge of the sorted indices)."""
        if self.dim is not None and other.dim is not None and self.dim != other.dim:
            raise ValueError(f"dimension mismatch: {self.dim} vs {other.dim}")
        i = j = 0
        terms: list[float] = []
        a_idx, b_idx = self.indices, other.indices
        while i < len(a_idx) and j < len(b_idx):
            if a_idx[i] == b_idx[j]:
                terms.append(self.values[i] * other.values[j])
                i += 1
                j += 1
            elif a_idx[i] < b_idx[j]:
                i += 1
            else:
                j += 1
        return _sum(terms)

    def to_dense(self, dim: int | None = None) -> DenseVector:
        """Dense form with `dim` dimensions (default: this vector's dim)."""
        size = dim if dim is not None else self.dim
        if size is None:
            raise ValueError("to_dense needs a dim: pass one or set SparseVector.dim")
        if self.dim is not None and dim is not None and dim != self.dim:
            raise ValueError(f"dim {dim} does not match the vector's dim {self.dim}")
        if self.indices and self.indices[-1] >= size:
            raise ValueError(f"index {self.indices[-1]} is out of range for dim {size}")
        if size < 1:
            raise ValueError("a dense vector needs at least one dimension")
        out = [0.0] * size
        for k, v in zip(self.indices, self.values, strict=True):
            out[k] = v
        return DenseVector(values=out)
