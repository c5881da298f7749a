"""Infinity (michaelfeil/infinity): the `infinity_emb v2` program, an embedding server."""

from __future__ import annotations

from ..spec import EngineSpec
from ._common import (
    check_kind,
    check_single_device,
    device_flag,
    gpu_env,
    program_availability,
    require_program,
)
from .base import Availability, LaunchPlan

PROGRAM = "infinity_emb"
ENV_VAR = "SAGE_INFINITY_BIN"
_INSTALL_HINT = "pip install 'infinity-emb[all]', or use backend embedding"
# Infinity serves OpenAI routes at /embeddings and /models unless given a prefix; /v1 puts
# them where every other engine has them. /health stays unprefixed (checked on 0.0.78).
URL_PREFIX = "/v1"


class InfinityBackend:
    """Infinity serves `/v1/embeddings` and `/v1/models` (with the /v1 prefix), `/health`."""

    name = "infinity"
    kinds = frozenset({"embedding"})
    uses_gpu = True
    launches_process = True
    api_key_env = "INFINITY_API_KEY"  # infinity_emb reads --api-key from it
    shards = False

    def availability(self) -> Availability:
        """Installed when `infinity_emb` is on PATH (or in SAGE_INFINITY_BIN)."""
        return program_availability(PROGRAM, ENV_VAR, _INSTALL_HINT)

    def plan(self, spec: EngineSpec, port: int, gpu_ids: list[int]) -> LaunchPlan:
        """`infinity_emb v2 --model-id M --served-model-name M --host H --port P ...`."""
        check_kind(self.name, self.kinds, spec)
        check_single_device(self.name, spec)
        program = require_program(PROGRAM, ENV_VAR, _INSTALL_HINT, self.name)
        # Infinity takes one served name per model; aliases are the scheduler's business
        # (it does not check the request's model field when it serves a single model).
        argv = [
            program,
            "v2",
            "--model-id",
            spec.model,
            "--served-model-name",
            spec.model,
            "--host",
            spec.host,
            "--port",
            str(port),
            "--url-prefix",
            URL_PREFIX,
            "--device",
            device_flag(gpu_ids),
            # Infinity trusts a model repo's Python code by default (0.0.77); we never do.
            "--no-trust-remote-code",
        ]
        argv += list(spec.extra_args)
        return LaunchPlan(argv=argv, env=gpu_env(gpu_ids), health_path="/health")
