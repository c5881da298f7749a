"""BaseDocument, Metadata, DenseVector, SparseVector: validation and round trips."""

from __future__ import annotations

import copy
import json
import math
import pickle
from array import array
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from sage.common.types import BaseDocument, DenseVector, Metadata, SparseVector

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    HAVE_HYPOTHESIS = True
except ImportError:  # pragma: no cover
    HAVE_HYPOTHESIS = False


class FakeArray:
    """Stands in for a numpy array: only has .tolist()."""

    def __init__(self, data: list[Any]) -> None:
        self._data = data

    def tolist(self) -> list[Any]:
        return list(self._data)


# --- DenseVector ----------------------------------------------------------------------


def test_dense_basics() -> None:
    v = DenseVector(values=[3, 4])
    assert v.values == [3.0, 4.0]
    assert all(type(x) is float for x in v.values)
    assert v.dim == 2
    assert len(v) == 2
    assert v.norm() == 5.0
    assert v.normalized().values == pytest.approx([0.6, 0.8])
    lst = v.to_list()
    lst.append(1.0)
    assert v.dim == 2  # to_list is a copy


def test_dense_from_sequences() -> None:
    assert DenseVector.from_sequence((1.0, 2.0)).values == [1.0, 2.0]
    assert DenseVector.from_sequence(array("f", [0.5, 0.25])).values == [0.5, 0.25]
    assert DenseVector.from_sequence(FakeArray([1, 2.5])).values == [1.0, 2.5]
    assert DenseVector.from_sequence(x / 2 for x in range(3)).values == [0.0, 0.5, 1.0]
    assert DenseVector.model_validate([1.0, 2.0]).values == [1.0, 2.0]
    assert DenseVector.model_validate(FakeArray([1.0])).values == [1.0]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([1.0, float("nan")], r"values\[1\] is NaN"),
        ([float("inf")], r"values\[0\] is infinite"),
        ([1.0, float("-inf")], r"values\[1\] is infinite"),
        ([1.0, "2.0"], r"values\[1\] must be a real number"),
        ([True], r"values\[0\] must be a real number"),
        ([None], r"values\[0\] must be a real number"),
        ([10**400], r"values\[0\] cannot be converted"),
        ("abc", "sequence of numbers"),
        (5.0, "sequence of numbers"),
        ([], "at least 1"),
    ],
)
def test_dense_rejects(values: Any, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        DenseVector(values=values)


def test_dense_validate_assignment() -> None:
    v = DenseVector(values=[1.0])
    with pytest.raises(ValidationError, match="NaN"):
        v.values = [math.nan]


def test_dense_math_with_huge_values() -> None:
    big = DenseVector(values=[1e308, 1e308])
    assert math.isinf(big.dot(big))  # overflow gives inf, not an exception
    assert big.norm() == pytest.approx(math.sqrt(2) * 1e308)
    assert big.cosine_similarity(big) == pytest.approx(1.0)
    assert big.normalized().values == pytest.approx([math.sqrt(0.5)] * 2)
    huge = SparseVector(indices=[0, 1], values=[1e308, -1e308])
    huge.dot(SparseVector(indices=[0, 1], values=[1e308, 1e308]))  # does not raise


def test_cosine_similarity() -> None:
    a = DenseVector(values=[1.0, 0.0])
    assert a.cosine_similarity(DenseVector(values=[2.0, 0.0])) == pytest.approx(1.0)
    assert a.cosine_similarity([0.0, 3.0]) == pytest.approx(0.0)
    assert a.cosine_similarity([-1.0, 0.0]) == pytest.approx(-1.0)
    assert a.dot([2.0, 5.0]) == 2.0
    with pytest.raises(ValueError, match="dimension mismatch"):
        a.cosine_similarity([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="zero vector"):
        a.cosine_similarity([0.0, 0.0])
    with pytest.raises(ValueError, match="zero vector"):
        DenseVector(values=[0.0, 0.0]).normalized()


# --- SparseVector ---------------------------------------------------------------------


def test_sparse_basics() -> None:
    s = SparseVector(indices=[1, 4], values=[2, 0.5], dim=6)
    assert s.nnz == len(s) == 2
    assert s.to_mapping() == {1: 2.0, 4: 0.5}
    assert s.to_dense().values == [0.0, 2.0, 0.0, 0.0, 0.5, 0.0]
    assert s.to_dense(6) == s.to_dense()
    assert SparseVector.from_mapping({4: 0.5, 1: 2.0}, dim=6) == s
    assert SparseVector.model_validate({4: 0.5, 1: 2.0}).indices == [1, 4]
    assert SparseVector.from_dense([0.0, 2.0, 0.0, 0.0, 0.5, 0.0]) == s
    assert SparseVector.from_dense([0.0, 1.0], keep_zeros=True).indices == [0, 1]
    assert (
        SparseVector.model_validate(
            {"indices": FakeArray([0, 2]), "values": FakeArray([1.0, 1.0])}
        ).nnz
        == 2
    )
    assert SparseVector().nnz == 0
    assert s.norm() == pytest.approx(math.sqrt(4.25))


def test_sparse_dot() -> None:
    a = SparseVector(indices=[0, 2, 5], values=[1.0, 2.0, 3.0])
    b = SparseVector(indices=[2, 3, 5], values=[10.0, 7.0, 1.0])
    assert a.dot(b) == 23.0
    assert b.dot(a) == 23.0
    assert a.dot(SparseVector()) == 0.0
    with pytest.raises(ValueError, match="dimension mismatch"):
        SparseVector(indices=[0], values=[1.0], dim=3).dot(
            SparseVector(indices=[0], values=[1.0], dim=4)
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"indices": [3, 1], "values": [1.0, 1.0]}, r"sorted and unique: indices\[1\]=1"),
        ({"indices": [1, 1], "values": [1.0, 1.0]}, "sorted and unique"),
        ({"indices": [-1], "values": [1.0]}, r"indices\[0\] is negative"),
        ({"indices": [1, 2], "values": [1.0]}, "same length"),
        ({"indices": [5], "values": [1.0], "dim": 5}, "out of range for dim 5"),
        ({"indices": [0], "values": [math.nan]}, r"values\[0\] is NaN"),
        ({"indices": [0.5], "values": [1.0]}, r"indices\[0\] must be an integer"),
        ({"indices": [], "values": [], "dim": -1}, "greater than or equal to 0"),
    ],
)
def test_sparse_rejects(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SparseVector(**kwargs)


def test_sparse_to_dense_errors() -> None:
    s = SparseVector(indices=[3], values=[1.0])
    with pytest.raises(ValueError, match="needs a dim"):
        s.to_dense()
    with pytest.raises(ValueError, match="out of range"):
        s.to_dense(3)
    assert s.to_dense(4).values == [0.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="does not match"):
        SparseVector(indices=[0], values=[1.0], dim=2).to_dense(3)


# --- Metadata -------------------------------------------------------------------------


def test_metadata_dict_like() -> None:
    m = Metadata({"a": 1}, b="x")
    m["c"] = [1, (2, 3)]
    m.set("d", {"e": None})
    assert m == {"a": 1, "b": "x", "c": [1, [2, 3]], "d": {"e": None}}
    assert m.get("missing") is None
    assert m.get("a") == 1
    assert "a" in m
    assert len(m) == 4
    assert sorted(m) == ["a", "b", "c", "d"]
    del m["a"]
    assert "a" not in m
    m.update({"z": 1.5})
    assert m.pop("z") == 1.5
    assert dict(m) == m.to_dict()
    assert repr(m).startswith("Metadata(")
    assert m != 3
    with pytest.raises(TypeError):
        hash(m)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({1, 2}, "type set is not JSON-safe"),
        (math.nan, "nan is not JSON-safe"),
        ([1, math.inf], r"\[1\]: float inf is not JSON-safe"),
        ({"k": object()}, r"\['k'\]: value of type object"),
        ({1: "x"}, "key 1 must be a str"),
        (b"bytes", "type bytes is not JSON-safe"),
    ],
)
def test_metadata_rejects_non_json(value: Any, message: str) -> None:
    m = Metadata()
    with pytest.raises(ValueError, match=message):
        m["bad"] = value
    assert "bad" not in m


def test_metadata_rejects_cycles_and_bad_keys() -> None:
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    with pytest.raises(ValueError, match="nested deeper"):
        Metadata(x=cyclic)
    with pytest.raises(ValueError, match="must be a str"):
        Metadata()[1] = "x"  # type: ignore[index]
    with pytest.raises(ValueError, match="must be a mapping"):
        Metadata([("a", 1)])  # type: ignore[arg-type]


def test_metadata_is_isolated_from_inputs() -> None:
    nested = {"inner": [1, 2]}
    m = Metadata(n=nested)
    nested["inner"].append(3)
    assert m["n"] == {"inner": [1, 2]}
    out = m.to_dict()
    out["n"]["inner"].append(9)
    assert m["n"] == {"inner": [1, 2]}


def test_metadata_merged() -> None:
    base = Metadata(a=1, nested={"x": 1, "y": 2})
    shallow = base.merged({"a": 2}, nested={"y": 3})
    assert shallow == {"a": 2, "nested": {"y": 3}}
    deep = base.merged({"nested": {"y": 3, "z": {"q": 1}}}, deep=True)
    assert deep == {"a": 1, "nested": {"x": 1, "y": 3, "z": {"q": 1}}}
    assert base == {"a": 1, "nested": {"x": 1, "y": 2}}  # unchanged
    with pytest.raises(ValueError, match="not JSON-safe"):
        base.merged(bad={1, 2})


def test_metadata_json_and_copy() -> None:
    m = Metadata(title="文档", tags=["a"], score=0.5)
    assert Metadata.from_json(m.to_json()) == m
    assert "文档" in m.to_json()
    with pytest.raises(ValueError, match="must be an object"):
        Metadata.from_json("[1]")
    c = m.copy()
    c["tags"].append("b")
    assert m["tags"] == ["a"]
    assert copy.deepcopy(m) == m
    assert pickle.loads(pickle.dumps(m)) == m


def test_metadata_as_pydantic_field() -> None:
    class Holder(BaseModel):
        meta: Metadata

    h = Holder.model_validate({"meta": {"a": [1]}})
    assert isinstance(h.meta, Metadata)
    assert h.model_dump() == {"meta": {"a": [1]}}
    assert h.model_dump_json() == '{"meta":{"a":[1]}}'
    assert Holder.model_validate_json('{"meta": {"k": "v"}}').meta == {"k": "v"}
    assert Holder.model_json_schema()["properties"]["meta"]["type"] == "object"
    with pytest.raises(ValidationError, match="must be a mapping"):
        Holder.model_validate({"meta": [1, 2]})
    with pytest.raises(ValidationError, match="not JSON-safe"):
        Holder.model_validate({"meta": {"s": {1}}})


# --- BaseDocument ---------------------------------------------------------------------


def test_document_defaults() -> None:
    a, b = BaseDocument(content="x"), BaseDocument(content="x")
    assert len(a.id) == 32
    int(a.id, 16)
    assert a.id != b.id
    assert a.metadata == {}
    assert isinstance(a.metadata, Metadata)
    assert a.embedding is None
    assert a.sparse is None
    a.metadata["k"] = 1
    assert b.metadata == {}  # no shared default


def test_document_round_trip_full() -> None:
    doc = BaseDocument(
        id="doc-1",
        content="你好, world",
        metadata={"source": "unit", "page": 3, "tags": ["a", "b"], "extra": {"n": None}},
        embedding=(0.1, -0.2, 0.3),
        sparse={7: 0.5, 2: 1.25},
    )
    assert isinstance(doc.embedding, DenseVector)
    assert doc.sparse is not None
    assert doc.sparse.indices == [2, 7]
    d = doc.to_dict()
    json.dumps(d)  # plain JSON types only
    assert d["embedding"] == {"values": [0.1, -0.2, 0.3]}
    assert BaseDocument.from_dict(d) == doc
    assert BaseDocument.from_json(doc.to_json()) == doc
    assert BaseDocument.from_json(doc.to_json(indent=2).encode()) == doc
    assert doc.model_copy(deep=True) == doc


def test_document_validation_names_field() -> None:
    with pytest.raises(ValidationError, match="content"):
        BaseDocument.from_dict({"metadata": {}})
    with pytest.raises(ValidationError, match=r"embedding\.values"):
        BaseDocument(content="x", embedding=[1.0, math.nan])
    with pytest.raises(ValidationError, match="contnet"):
        BaseDocument.from_dict({"content": "x", "contnet": "typo"})
    with pytest.raises(ValidationError, match="metadata"):
        BaseDocument(content="x", metadata={"when": object()})
    with pytest.raises(ValidationError, match="id"):
        BaseDocument(id="", content="x")
    doc = BaseDocument(content="x")
    with pytest.raises(ValidationError, match="sorted and unique"):
        doc.sparse = {"indices": [2, 1], "values": [1.0, 1.0]}  # type: ignore[assignment]


def test_document_subclass_round_trip() -> None:
    class Chunk(BaseDocument):
        position: int = 0

    c = Chunk(content="part", position=2, embedding=DenseVector(values=[1.0]))
    back = Chunk.from_json(c.to_json())
    assert isinstance(back, Chunk)
    assert back == c


# --- property-based round trips ---------------------------------------------------------

if HAVE_HYPOTHESIS:
    finite = st.floats(allow_nan=False, allow_infinity=False)
    json_leaf = st.none() | st.booleans() | st.integers() | finite | st.text(max_size=10)
    json_value = st.recursive(
        json_leaf,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
        max_leaves=10,
    )
    sparse_vectors = st.dictionaries(st.integers(0, 10_000), finite, max_size=20).map(
        SparseVector.from_mapping
    )
    moderate = st.floats(-1e6, 1e6, allow_nan=False)
    moderate_sparse = st.dictionaries(st.integers(0, 500), moderate, max_size=20).map(
        SparseVector.from_mapping
    )
    documents = st.builds(
        BaseDocument,
        id=st.text(min_size=1, max_size=20),
        content=st.text(max_size=50),
        metadata=st.dictionaries(st.text(max_size=8), json_value, max_size=5),
        embedding=st.none() | st.lists(finite, min_size=1, max_size=16),
        sparse=st.none() | sparse_vectors,
    )

    @settings(max_examples=150, deadline=None)
    @given(documents)
    def test_document_round_trip_property(doc: BaseDocument) -> None:
        assert BaseDocument.from_json(doc.to_json()) == doc
        assert BaseDocument.from_dict(doc.to_dict()) == doc
        assert BaseDocument.from_dict(json.loads(json.dumps(doc.to_dict()))) == doc

    @settings(max_examples=100, deadline=None)
    @given(st.dictionaries(st.text(max_size=8), json_value, max_size=6))
    def test_metadata_round_trip_property(data: dict[str, Any]) -> None:
        m = Metadata(data)
        assert Metadata.from_json(m.to_json()) == m
        assert m == data

    @settings(max_examples=100, deadline=None)
    @given(moderate_sparse, moderate_sparse)
    def test_sparse_dot_matches_dense(a: SparseVector, b: SparseVector) -> None:
        dim = max([*a.indices, *b.indices, 0]) + 1
        assert a.dot(b) == pytest.approx(a.to_dense(dim).dot(b.to_dense(dim)))
        assert a.dot(b) == b.dot(a)

    @settings(max_examples=100, deadline=None)
    @given(st.lists(finite, min_size=1, max_size=8), st.lists(finite, min_size=1, max_size=8))
    def test_dense_math_never_crashes_on_finite_input(xs: list[float], ys: list[float]) -> None:
        a = DenseVector(values=xs)
        b = DenseVector(values=(ys * 8)[: len(xs)])
        assert a.norm() >= 0.0
        a.dot(b)
        if a.norm() > 0 and b.norm() > 0:
            assert -1.0 <= a.cosine_similarity(b) <= 1.0
