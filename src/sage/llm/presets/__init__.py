"""Presets: several engines described in one YAML file and started together.

`sage llm preset list|show|apply` is the CLI over this package; built-in presets ship as
YAML files in `sage.llm.presets.builtin`.
"""

from .apply import (
    AppliedEngine,
    ApplyEvent,
    ApplyResult,
    EngineControl,
    PresetApplyError,
    ProgressCallback,
    apply_preset,
)
from .loader import (
    PresetError,
    PresetIssue,
    builtin_preset_names,
    list_presets,
    load_preset,
    parse_preset,
)
from .schema import Preset, PresetEngine

__all__ = [
    "AppliedEngine",
    "ApplyEvent",
    "ApplyResult",
    "EngineControl",
    "Preset",
    "PresetApplyError",
    "PresetEngine",
    "PresetError",
    "PresetIssue",
    "ProgressCallback",
    "apply_preset",
    "builtin_preset_names",
    "list_presets",
    "load_preset",
    "parse_preset",
]
