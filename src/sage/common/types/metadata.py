"""Document metadata: a dict of str keys to JSON-safe values.

Metadata travels through JSON (HTTP), protobuf Struct (gRPC) and on-disk stores, so
values are checked when they are set: a non-JSON value (a datetime, a set, NaN) is
rejected at once with its path named, instead of failing later in some serialiser.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any, TypeAlias

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

JsonValue: TypeAlias = bool | int | float | str | list["JsonValue"] | dict[str, "JsonValue"] | None
"""What a metadata value may be (checked at run time; typed as Any for convenience)."""

_MAX_DEPTH = 64


def json_safe(value: Any, path: str = "metadata", _depth: int = 0) -> Any:
    """A validated deep copy of `value` (tuples become lists); ValueError names the path."""
    if _depth > _MAX_DEPTH:
        raise ValueError(f"{path}: nested deeper than {_MAX_DEPTH} levels (cycle?)")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{path}: float {value!r} is not JSON-safe")
        return value
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{path}: key {k!r} must be a str, got {type(k).__name__}")
            out[k] = json_safe(v, f"{path}[{k!r}]", _depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [json_safe(v, f"{path}[{i}]", _depth + 1) for i, v in enumerate(value)]
    raise ValueError(f"{path}: value of type {type(value).__name__} is not JSON-safe")


class Metadata(MutableMapping[str, Any]):
    """Dict-like metadata whose values are always JSON-safe.

    Behaves like a dict (`[]`, get, update, `in`, iteration, == with plain dicts) and works
    as a pydantic field: it validates from any mapping and serialises as a plain object.
    """

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any] | None = None, /, **kwargs: Any) -> None:
        self._data: dict[str, Any] = {}
        if data is not None:
            if not isinstance(data, Mapping):
                raise ValueError(f"metadata must be a mapping, got {type(data).__name__}")
            self.update(data)
        if kwargs:
            self.update(kwargs)

    # --- MutableMapping ---------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if not isinstance(key, str):
            raise ValueError(f"metadata key {key!r} must be a str, got {type(key).__name__}")
        self._data[key] = json_safe(value, f"metadata[{key!r}]")

    def __delitem__(self, key: str) -> None:
        del self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Metadata):
            return self._data == other._data
        if isinstance(other, Mapping):
            return self._data == dict(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable, like dict

    def __repr__(self) -> str:
        return f"Metadata({self._data!r})"

    # --- conveniences -----------------------------------------------------------------
    def set(self, key: str, value: Any) -> None:
        """Same as `self[key] = value` (validated)."""
        self[key] = value

    def copy(self) -> Metadata:
        """Independent deep copy."""
        return Metadata(self._data)

    def merged(self, *others: Mapping[str, Any], deep: bool = False, **kwargs: Any) -> Metadata:
        """New Metadata with `others` and `kwargs` laid over this one (later wins).

        With deep=True nested dicts are merged key by key instead of replaced.
        """
        result = self.copy()
        for layer in (*others, kwargs):
            for key, value in layer.items():
                if deep and isinstance(value, Mapping) and isinstance(result.get(key), dict):
                    result[key] = _deep_merge(result[key], value)
                else:
                    result[key] = value
        return result

    def to_dict(self) -> dict[str, Any]:
        """Deep copy as a plain dict."""
        copied: dict[str, Any] = json_safe(self._data)
        return copied

    def to_json(self) -> str:
        """Compact JSON text."""
        return json.dumps(self._data, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Metadata:
        """Parse JSON text holding an object."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"metadata JSON must be an object, got {type(data).__name__}")
        return cls(data)

    # --- pydantic ---------------------------------------------------------------------
    @classmethod
    def _validate(cls, value: Any) -> Metadata:
        if isinstance(value, Metadata):
            return value
        if value is None:
            return cls()
        if isinstance(value, Mapping):
            return cls(value)
        raise ValueError(f"metadata must be a mapping, got {type(value).__name__}")

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls._validate,
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda m: m.to_dict(), return_schema=core_schema.dict_schema()
            ),
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"type": "object", "additionalProperties": True}


def _deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        current = out.get(key)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            out[key] = _deep_merge(current, value)
        else:
            out[key] = value
    return out
