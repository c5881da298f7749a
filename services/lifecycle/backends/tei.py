"""Hugging Face Text Embeddings Inference: the `text-embeddings-router` program."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..spec import EngineSpec
from ._common import (
    check_kind,
    check_single_device,
    gpu_env,
    program_availability,
    require_program,
)
from .base import Availability, LaunchPlan

PROGRAM = "text-embeddings-router"
ENV_VAR = "SAGE_TEI_BIN"
_INSTALL_HINT = (
    "install Text Embeddings Inference "
    "(https://huggingface.co/docs/text-embeddings-inference), or use backend embedding"
)
# The embedding service sends micro-batches of up to a few hundred texts in one call;
# TEI refuses more than 32 inputs per request and bodies over 2 MB by default.
MAX_CLIENT_BATCH_SIZE = 2048
PAYLOAD_LIMIT_BYTES = 16 * 1024 * 1024


class TeiBackend:
    """TEI serves `/embed` and OpenAI `/v1/embeddings`; one model on one device."""

    name = "tei"
    kinds = frozenset({"embedding"})
    uses_gpu = True
    launches_process = True
    api_key_env = "API_KEY"  # text-embeddings-router reads --api-key from it (guards every route)
    shards = False

    def availability(self) -> Availability:
        """Installed when `text-embeddings-router` is on PATH (or in SAGE_TEI_BIN)."""
        return program_availability(PROGRAM, ENV_VAR, _INSTALL_HINT)

    def side_ports(self, spec: EngineSpec) -> int:
        """TEI's Prometheus listener takes the port after the HTTP port (lifecycle reserves
        it); left alone it binds 9000, where two TEI engines (or anything else) clash."""
        return 1

    def plan(self, spec: EngineSpec, port: int, gpu_ids: list[int]) -> LaunchPlan:
        """`text-embeddings-router --model-id M --hostname H --port P ...` + extra args."""
        check_kind(self.name, self.kinds, spec)
        check_single_device(self.name, spec)
        program = require_program(PROGRAM, ENV_VAR, _INSTALL_HINT, self.name)
        argv = [
            program,
            "--model-id",
            spec.model,
            "--hostname",
            spec.host,
            "--port",
            str(port),
            # Long inputs are cut to the model's window, as the own embedding engine does,
            # instead of failing the whole micro-batch they arrived in.
            "--auto-truncate",
            "--max-client-batch-size",
            str(MAX_CLIENT_BATCH_SIZE),
            "--payload-limit",
            str(PAYLOAD_LIMIT_BYTES),
            # TEI's backends talk over a unix socket whose default path is shared by every
            # instance on the host; one per port keeps two engines apart.
            "--uds-path",
            str(Path(tempfile.gettempdir()) / f"sage-tei-{port}"),
            "--prometheus-port",
            str(port + 1),
        ]
        if spec.max_concurrent_requests > 0:
            argv += ["--max-concurrent-requests", str(spec.max_concurrent_requests)]
        argv += list(spec.extra_args)
        return LaunchPlan(argv=argv, env=gpu_env(gpu_ids), health_path="/health")
