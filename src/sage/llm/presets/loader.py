"""Reading presets: built-ins shipped in the package, or a YAML file.

Validation errors name the field and the YAML line it sits on (from the composed node
tree's marks), because a preset is hand-written and "engines.1.modle" alone is hard to
find in a long file.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pydantic
import yaml

from sage.common.exceptions import ConfigurationError

from .schema import Preset, PresetEngine

__all__ = [
    "PresetError",
    "PresetIssue",
    "builtin_preset_names",
    "list_presets",
    "load_preset",
    "parse_preset",
]

_BUILTIN_PACKAGE = "sage.llm.presets.builtin"


@dataclass(frozen=True)
class PresetIssue:
    """One problem in a preset file: the field path, its 1-based line (0 if unknown), why."""

    field: str
    line: int
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        return f"{where}{self.field}: {self.message}" if self.field else f"{where}{self.message}"


class PresetError(ConfigurationError):
    """A preset cannot be found, parsed or validated; `issues` holds each problem."""

    default_code = "invalid_preset"

    def __init__(self, source: str, issues: list[PresetIssue], *, summary: str = "") -> None:
        details = "; ".join(str(issue) for issue in issues)
        message = summary or f"invalid preset {source}: {details}"
        super().__init__(message, param=_first_field(issues))
        self.source = source
        self.issues = issues


def _first_field(issues: list[PresetIssue]) -> str | None:
    return issues[0].field or None if issues else None


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else part)
    return path


def _mapping_get(node: yaml.Node, key: str) -> tuple[yaml.Node, yaml.Node] | None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
                return key_node, value_node
    return None


def _line_of(root: yaml.Node | None, loc: tuple[int | str, ...], at_key: bool) -> int:
    """1-based line of `loc` in the document; the nearest existing ancestor if it is absent."""
    if root is None:
        return 0
    node: yaml.Node = root
    for index, part in enumerate(loc):
        last = index == len(loc) - 1
        if isinstance(part, int):
            if not isinstance(node, yaml.SequenceNode) or not 0 <= part < len(node.value):
                break
            node = node.value[part]
            continue
        pair = _mapping_get(node, part)
        if pair is None:
            break
        key_node, value_node = pair
        if last and at_key:
            return key_node.start_mark.line + 1
        # A key with an empty value has its value's mark on the next line; the key is clearer.
        node = key_node if _is_null(value_node) else value_node
    return node.start_mark.line + 1


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")


def _allowed_fields(loc: tuple[int | str, ...]) -> list[str]:
    model: type[pydantic.BaseModel] = PresetEngine if len(loc) >= 3 else Preset
    return list(model.model_fields)


def _issue_for(error: Any, root: yaml.Node | None) -> PresetIssue:
    loc: tuple[int | str, ...] = tuple(error["loc"])
    ctx = error.get("ctx") or {}
    if error["type"] == "duplicate_engine_name" and "index" in ctx:
        loc = (*loc, int(ctx["index"]), "name")
    if error["type"] == "extra_forbidden":
        allowed = _allowed_fields(loc)
        unknown = str(loc[-1])
        hint = difflib.get_close_matches(unknown, allowed, n=1)
        message = f"unknown field {unknown!r}" + (
            f" (did you mean {hint[0]!r}?)" if hint else f" (allowed: {', '.join(allowed)})"
        )
        return PresetIssue(_field_path(loc), _line_of(root, loc, at_key=True), message)
    message = str(error["msg"])
    if error["type"] == "missing":
        message = "required field is missing"
    elif loc == ("version",):
        message = f"must be 1, the only preset format version (got {error.get('input')!r})"
    return PresetIssue(_field_path(loc), _line_of(root, loc, at_key=False), message)


def _duplicate_keys(node: yaml.Node | None, path: tuple[int | str, ...] = ()) -> list[PresetIssue]:
    """YAML keeps the last of two equal keys silently; a preset treats that as an error."""
    issues: list[PresetIssue] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in seen:
                issues.append(
                    PresetIssue(
                        _field_path((*path, key)),
                        key_node.start_mark.line + 1,
                        "key given twice",
                    )
                )
            seen.add(key)
            issues.extend(_duplicate_keys(value_node, (*path, key)))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            issues.extend(_duplicate_keys(item, (*path, index)))
    return issues


def parse_preset(text: str, source: str = "<string>") -> Preset:
    """Parse and validate preset YAML; PresetError says what is wrong and on which line."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        raise PresetError(source, [PresetIssue("", line, f"YAML syntax: {exc.problem}")]) from None
    except yaml.YAMLError as exc:
        raise PresetError(source, [PresetIssue("", 0, f"YAML: {exc}")]) from None
    if not isinstance(data, dict):
        raise PresetError(
            source, [PresetIssue("", 1, "a preset is a mapping with version, name and engines")]
        )
    duplicates = _duplicate_keys(root)
    if duplicates:
        raise PresetError(source, duplicates)
    try:
        return Preset.model_validate(data)
    except pydantic.ValidationError as exc:
        issues = sorted((_issue_for(error, root) for error in exc.errors()), key=lambda i: i.line)
        raise PresetError(source, issues) from None


def builtin_preset_names() -> list[str]:
    """Names of the presets shipped with SAGE, sorted."""
    folder = resources.files(_BUILTIN_PACKAGE)
    names = (entry.name for entry in folder.iterdir())
    return sorted(name.removesuffix(".yaml") for name in names if name.endswith(".yaml"))


def _load_builtin(name: str) -> Preset:
    entry = resources.files(_BUILTIN_PACKAGE) / f"{name}.yaml"
    return parse_preset(entry.read_text(encoding="utf-8"), f"builtin:{name}")


def list_presets() -> list[Preset]:
    """The built-in presets, sorted by name."""
    return [_load_builtin(name) for name in builtin_preset_names()]


def load_preset(name: str | None = None, file: str | Path | None = None) -> Preset:
    """A built-in preset by `name`, or the preset in YAML `file` (exactly one of them)."""
    if (name is None) == (file is None):
        raise ConfigurationError("give a preset name or a preset file, not both or neither")
    if file is not None:
        path = Path(file)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise PresetError(
                str(path),
                [PresetIssue("", 0, exc.strerror or str(exc))],
                summary=f"cannot read preset file {path}: {exc.strerror or exc}",
            ) from None
        return parse_preset(text, str(path))
    assert name is not None
    names = builtin_preset_names()
    if name not in names:
        known = ", ".join(names)
        raise PresetError(
            name,
            [PresetIssue("", 0, "unknown preset")],
            summary=f"no built-in preset named {name!r} (built-in: {known}; use -f FILE for "
            "your own)",
        )
    return _load_builtin(name)
