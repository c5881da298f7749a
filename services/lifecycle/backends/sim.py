"""The vLLM-compatible simulator (`python -m sage.engines.sim`): a testing tool, no GPU."""

from __future__ import annotations

from sage.engines.auth import ENGINE_KEY_ENV

from ..spec import EngineSpec
from ._common import check_kind, check_single_device, python_module_argv
from .base import Availability, LaunchPlan
from .vllm import lora_args

# The simulator's vectors have the size of all-MiniLM-L6-v2's, the default embedding model.
SIM_EMBEDDING_DIM = 384


class SimBackend:
    """Speaks vLLM's HTTP API and metrics with modelled latency; chat and embeddings."""

    name = "sim"
    kinds = frozenset({"llm", "embedding"})
    uses_gpu = False
    launches_process = True
    api_key_env = ENGINE_KEY_ENV
    shards = False

    def availability(self) -> Availability:
        """Always: it is part of this package."""
        return Availability(True)

    def plan(self, spec: EngineSpec, port: int, gpu_ids: list[int]) -> LaunchPlan:
        """`python -m sage.engines.sim --model M --host H --port P ...` + extra args."""
        check_kind(self.name, self.kinds, spec)
        check_single_device(self.name, spec)
        argv = [
            *python_module_argv("sage.engines.sim"),
            "--model",
            spec.model,
            "--host",
            spec.host,
            "--port",
            str(port),
        ]
        if spec.kind == "embedding":
            argv += ["--embedding-dim", str(SIM_EMBEDDING_DIM)]
        if spec.role != "both":  # PD serving: the sim plays one side of the KV exchange
            argv += ["--role", spec.role]
        for alias in spec.aliases:
            argv += ["--served-model-name", alias]
        if spec.max_concurrent_requests > 0:
            argv += ["--max-num-seqs", str(spec.max_concurrent_requests)]
        if spec.max_model_len > 0:
            argv += ["--max-model-len", str(spec.max_model_len)]
        if spec.enable_lora:  # the sim takes vLLM's flags and serves its adapter routes
            argv += lora_args(spec)
        argv += list(spec.extra_args)
        return LaunchPlan(argv=argv, health_path="/health")
