"""The engine enums of `sage.rpc.common.v1` as the lowercase names domain code and JSON use.

`ENGINE_KIND_EMBEDDING` <-> "embedding", `ENGINE_STATE_READY` <-> "ready", and so on,
derived from the proto descriptors so a value added to the contract needs no edit here.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import EnumDescriptor

from sage.common.exceptions import InvalidRequestError
from sage.rpc.common.v1 import common_pb2


def _maps(enum: EnumDescriptor, prefix: str) -> tuple[dict[int, str], dict[str, Any]]:
    names = {v.number: v.name.removeprefix(prefix).lower() for v in enum.values if v.number != 0}
    return names, {name: number for number, name in names.items()}


_KINDS, _KIND_VALUES = _maps(common_pb2.EngineKind.DESCRIPTOR, "ENGINE_KIND_")
_ROLES, _ROLE_VALUES = _maps(common_pb2.EngineRole.DESCRIPTOR, "ENGINE_ROLE_")
_STATES, _STATE_VALUES = _maps(common_pb2.EngineState.DESCRIPTOR, "ENGINE_STATE_")


def kind_name(value: int, default: str | None = None, *, param: str = "kind") -> str:
    """ "llm" / "embedding"; UNSPECIFIED gives `default`, or a 400 naming `param`."""
    name = _KINDS.get(value, default)
    if name is None:
        raise InvalidRequestError(f"{param} must be one of {sorted(_KIND_VALUES)}", param=param)
    return name


def kind_value(name: str) -> Any:
    """The EngineKind value for "llm" / "embedding"."""
    try:
        return _KIND_VALUES[name]
    except KeyError:
        raise InvalidRequestError(
            f"kind must be one of {sorted(_KIND_VALUES)}, got {name!r}", param="kind"
        ) from None


def role_name(value: int) -> str:
    """ "both" / "prefill" / "decode"; UNSPECIFIED means both."""
    return _ROLES.get(value, "both")


def role_value(name: str) -> Any:
    """The EngineRole value for a role name (unknown names mean both)."""
    return _ROLE_VALUES.get(name, common_pb2.ENGINE_ROLE_BOTH)


def state_name(value: int, default: str = "unspecified") -> str:
    """ "starting" / "ready" / ... ; UNSPECIFIED gives `default`."""
    return _STATES.get(value, default)


def state_value(name: str) -> Any:
    """The EngineState value for a state name."""
    return _STATE_VALUES.get(name, common_pb2.ENGINE_STATE_UNSPECIFIED)
