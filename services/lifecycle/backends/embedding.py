"""The project's own embedding engine (`python -m sage.engines.embedding`)."""

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


class EmbeddingBackend:
    """sentence-transformers behind OpenAI `/v1/embeddings`, with in-process batching."""

    name = "embedding"
    kinds = frozenset({"embedding"})
    uses_gpu = True
    launches_process = True
    api_key_env = ENGINE_KEY_ENV
    shards = False

    def availability(self) -> Availability:
        """Needs sentence-transformers and torch importable by this interpreter."""
        return modules_availability(("sentence_transformers", "torch"), _INSTALL_HINT)

    def plan(self, spec: EngineSpec, port: int, gpu_ids: list[int]) -> LaunchPlan:
        """`python -m sage.engines.embedding --model M ... --device cpu|cuda` + extra args."""
        check_kind(self.name, self.kinds, spec)
        check_single_device(self.name, spec)
        require(self.availability(), self.name)
        argv = [
            *python_module_argv("sage.engines.embedding"),
            "--model",
            spec.model,
            "--served-model-name",
            spec.model,
            "--host",
            spec.host,
            "--port",
            str(port),
            "--device",
            device_flag(gpu_ids),
        ]
        for alias in spec.aliases:
            argv += ["--alias", alias]
        argv += list(spec.extra_args)
        return LaunchPlan(argv=argv, env=gpu_env(gpu_ids), health_path="/health")
