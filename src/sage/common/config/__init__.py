"""SAGE configuration: port constants, settings, and network (HF mirror) detection.

`ports` is imported before `settings` because settings reads SagePorts defaults.
"""

from sage.common.config.network import detect_china_mainland, ensure_hf_mirror_configured
from sage.common.config.ports import SagePorts
from sage.common.config.settings import SageSettings, load_settings

__all__ = [
    "SagePorts",
    "SageSettings",
    "detect_china_mainland",
    "ensure_hf_mirror_configured",
    "load_settings",
]
