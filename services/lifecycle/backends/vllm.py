"""vLLM: `vllm serve MODEL ...`, the backend for chat/generation on GPUs (shards with TP/PP)."""

from __future__ import annotations

import importlib.util

from sage.common.exceptions import EngineStartError

from ..spec import EngineSpec
from ._common import check_kind, find_program, gpu_env, python_module_argv
from .base import Availability, LaunchPlan

ENV_VAR = "SAGE_VLLM_BIN"
_INSTALL_HINT = "pip install vllm (needs a GPU), or use backend transformers or sim"


def vllm_importable() -> bool:
    """Whether this interpreter can import vllm (checked without importing it)."""
    return importlib.util.find_spec("vllm") is not None


class VllmBackend:
    """vLLM's OpenAI server; the `vllm` program when installed, else its Python module."""

    name = "vllm"
    # vLLM also serves embedding (pooling) models, and picks the pooling runner itself
    # from the model's architecture; older versions may need `--task embed` in extra_args.
    kinds = frozenset({"llm", "embedding"})
    uses_gpu = True
    launches_process = True
    api_key_env = "VLLM_API_KEY"  # vLLM reads --api-key from it (guards its /v1 routes)
    shards = True

    def availability(self) -> Availability:
        """Installed when the `vllm` program or the vllm package is present."""
        if find_program("vllm", ENV_VAR) or vllm_importable():
            return Availability(True)
        return Availability(False, f"vllm is not installed; {_INSTALL_HINT}")

    def plan(self, spec: EngineSpec, port: int, gpu_ids: list[int]) -> LaunchPlan:
        """`vllm serve MODEL --host H --port P --tensor-parallel-size N ...` + extra args."""
        check_kind(self.name, self.kinds, spec)
        program = find_program("vllm", ENV_VAR)
        if program is not None:
            argv = [program, "serve", spec.model]
        elif vllm_importable():
            # Older installs without the console script: the server module takes --model.
            argv = [
                *python_module_argv("vllm.entrypoints.openai.api_server"),
                "--model",
                spec.model,
            ]
        else:
            raise EngineStartError(f"vllm is not installed; {_INSTALL_HINT}", param="backend")
        argv += [
            "--host",
            spec.host,
            "--port",
            str(port),
            "--tensor-parallel-size",
            str(spec.tensor_parallel_size),
        ]
        if spec.pipeline_parallel_size > 1:
            argv += ["--pipeline-parallel-size", str(spec.pipeline_parallel_size)]
        if spec.gpu_memory_utilization > 0:
            argv += ["--gpu-memory-utilization", f"{spec.gpu_memory_utilization:g}"]
        if spec.max_model_len > 0:
            argv += ["--max-model-len", str(spec.max_model_len)]
        if spec.aliases:
            # vLLM answers only to the served names once any is given: list the model too.
            argv += ["--served-model-name", spec.model, *spec.aliases]
        if spec.max_concurrent_requests > 0:
            argv += ["--max-num-seqs", str(spec.max_concurrent_requests)]
        argv += list(spec.extra_args)
        return LaunchPlan(argv=argv, env=gpu_env(gpu_ids), health_path="/health")
