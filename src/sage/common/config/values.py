"""The string forms settings accept from environment variables, parsed in one place.

An environment variable holds one string, so a few settings have a small syntax there
(`model:min:max`, `id=host:port`, `NxG`); a config file may give the same values as
structured YAML/TOML/JSON instead. Both forms become the typed values below.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sage.common.exceptions import ConfigurationError


class AutoscaleRule(BaseModel):
    """How many replicas of one model the autoscaler may run (`model:min:max`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(min_length=1)
    min: int = Field(ge=1)
    max: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> AutoscaleRule:
        if self.max < self.min:
            raise ValueError(f"needs min <= max, got min={self.min} max={self.max}")
        return self


class StaticNodeAddress(BaseModel):
    """A node agent the scheduler polls (`id=host:port`): its id and lifecycle address."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1)
    address: str

    @model_validator(mode="after")
    def _host_port(self) -> StaticNodeAddress:
        host, colon, port = self.address.rpartition(":")
        if not colon or not host or not port.isdigit():
            raise ValueError(f"node {self.id!r} address {self.address!r} is not host:port")
        return self


def parse_autoscale(spec: str) -> list[AutoscaleRule]:
    """`model:min:max[,model:min:max]`; a bad entry is a ConfigurationError naming it."""
    rules: list[AutoscaleRule] = []
    for raw in spec.split(","):
        entry = raw.strip()
        if not entry:
            continue
        # The model name may itself contain ':' (e.g. "qwen:7b"), so split from the right.
        parts = entry.rsplit(":", 2)
        if len(parts) != 3 or not parts[0].strip():
            raise ConfigurationError(
                f"SAGE_AUTOSCALE entries must be model:min:max, got {entry!r}",
                param="SAGE_AUTOSCALE",
            )
        try:
            low, high = int(parts[1]), int(parts[2])
        except ValueError:
            raise ConfigurationError(
                f"SAGE_AUTOSCALE min and max must be integers, got {entry!r}",
                param="SAGE_AUTOSCALE",
            ) from None
        if low < 1 or high < low:
            raise ConfigurationError(
                f"SAGE_AUTOSCALE needs 1 <= min <= max, got {entry!r}", param="SAGE_AUTOSCALE"
            )
        rules.append(AutoscaleRule(model=parts[0].strip(), min=low, max=high))
    return check_autoscale(rules)


def check_autoscale(rules: list[AutoscaleRule]) -> list[AutoscaleRule]:
    """A model may be named once."""
    seen: set[str] = set()
    for rule in rules:
        if rule.model in seen:
            raise ConfigurationError(
                f"SAGE_AUTOSCALE names model {rule.model!r} twice", param="SAGE_AUTOSCALE"
            )
        seen.add(rule.model)
    return rules


def parse_nodes(spec: str) -> list[StaticNodeAddress]:
    """`id=host:port[,id=host:port]`; a malformed or repeated entry is a ValueError naming it."""
    nodes: list[StaticNodeAddress] = []
    for raw in spec.split(","):
        entry = raw.strip()
        if not entry:
            continue
        node_id, sep, addr = entry.partition("=")
        host, colon, port = addr.strip().rpartition(":")
        if not sep or not node_id.strip() or not colon or not host or not port.isdigit():
            raise ValueError(f"SAGE_NODES entry {entry!r} is not id=host:port")
        nodes.append(StaticNodeAddress(id=node_id.strip(), address=addr.strip()))
    return check_nodes(nodes)


def check_nodes(nodes: list[StaticNodeAddress]) -> list[StaticNodeAddress]:
    """A node id may be named once."""
    seen: set[str] = set()
    for node in nodes:
        if node.id in seen:
            raise ValueError(f"SAGE_NODES names node {node.id!r} twice")
        seen.add(node.id)
    return nodes


def policy_name(value: Any) -> Any:
    """`{name: hybrid, inner: fair}` (a file's form) -> `hybrid:fair`, the policy's name."""
    if not isinstance(value, dict):
        return value
    unknown = set(value) - {"name", "inner"}
    if unknown or not isinstance(value.get("name"), str):
        raise ValueError(f"a policy is {{name, inner?}}, got {value!r}")
    inner = value.get("inner")
    if inner is None:
        return value["name"]
    return f"{value['name']}:{policy_name(inner)}"


def comma_list(value: Any) -> Any:
    """A file's list (`model_roots: [/a, /b]`) -> the variable's comma-separated string."""
    if isinstance(value, list | tuple):
        if not all(isinstance(item, str) and "," not in item for item in value):
            raise ValueError(f"expected a list of names without commas, got {value!r}")
        return ",".join(value)
    return value


def port_range(value: Any) -> Any:
    """A file's `{first: 8900, last: 8999}` -> the variable's `8900-8999`."""
    if not isinstance(value, dict):
        return value
    if set(value) != {"first", "last"} or not all(isinstance(v, int) for v in value.values()):
        raise ValueError(f"a port range is {{first, last}}, got {value!r}")
    return f"{value['first']}-{value['last']}"


def parse_gpu_simulation(spec: str) -> tuple[int, float]:
    """`N` (N GPUs of 80 GiB) or `NxG` (G GiB each) -> (count, GiB); else a ValueError."""
    count_text, _, size_text = spec.lower().partition("x")
    try:
        count = int(count_text)
        size = float(size_text) if size_text else 80.0
    except ValueError:
        raise ValueError(f"expected N or NxGiB, e.g. 2x80, got {spec!r}") from None
    if count < 0 or size <= 0:
        raise ValueError(f"expected a GPU count >= 0 and a size > 0, got {spec!r}")
    return count, size
