"""The project's own chat engine over Hugging Face transformers (small models, CPU or GPU)."""

from __future__ import annotations

from sage.engines.auth import ENGINE_KEY_ENV

from ..spec import EngineSpec
from ._common import (
    check_kind,
    check_single_device,
    device_flag,
    gpu_env,
    modules_availability,
    python_module_argv,
    require,
)
from .base import Availability, LaunchPlan

_INSTALL_HINT = "pip install 'sage-llm-control-plane[engines]'"


class TransformersBackend:
    """`python -m sage.engines.transformers`: OpenAI chat/completions, one model, one device."""

    name = "transformers"
    kinds = frozenset({"llm"})
    uses_gpu = True
    launches_process = True
    api_key_env = ENGINE_KEY_ENV
    shards = False

    def availability(self) -> Availability:
        """Needs transformers and torch importable by this interpreter."""
        return modules_availability(("transformers", "torch"), _INSTALL_HINT)

    def plan(self, spec: EngineSpec, port: int, gpu_ids: list[int]) -> LaunchPlan:
        """`python -m sage.engines.transformers --model M ... --device cpu|cuda` + extra args."""
        check_kind(self.name, self.kinds, spec)
        check_single_device(self.name, spec)
        require(self.availability(), self.name)
        argv = [
            *python_module_argv("sage.engines.transformers"),
            "--model",
            spec.model,
            "--served-model-name",
            spec.model,
        ]
        for alias in spec.aliases:
            argv += ["--served-model-name", alias]
        argv += [
            "--host",
            spec.host,
            "--port",
            str(port),
            "--device",
            device_flag(gpu_ids),
        ]
        if spec.max_model_len > 0:
            argv += ["--max-model-len", str(spec.max_model_len)]
        argv += list(spec.extra_args)
        return LaunchPlan(argv=argv, env=gpu_env(gpu_ids), health_path="/health")
