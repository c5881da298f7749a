"""How to launch each backend: the argv of its process (no shell, ever)."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field

from sage.common.exceptions import EngineStartError, InvalidRequestError


@dataclass(frozen=True)
class EngineSpec:
    """What the caller asked for."""

    model: str
    kind: str = "llm"  # "llm" | "embedding"
    backend: str = ""  # "" = auto
    port: int = 0
    host: str = "127.0.0.1"
    engine_id: str = ""
    base_url: str = ""  # set: an external engine, nothing to launch
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.0
    extra_args: tuple[str, ...] = ()
    startup_timeout_s: float = 300.0
    aliases: tuple[str, ...] = ()
    role: str = "both"
    labels: dict[str, str] = field(default_factory=dict)


SIM_EMBEDDING_DIM = 384


def resolve_backend(spec: EngineSpec) -> str:
    """`auto` picks `external` for a base_url, `sim` for the model name `sim`, else vllm."""
    if spec.backend:
        return spec.backend
    if spec.base_url:
        return "external"
    if spec.model == "sim" or spec.model.startswith("sim-"):
        return "sim"
    # Embeddings default to the project's own engine (sentence-transformers); vLLM for chat.
    return "embedding" if spec.kind == "embedding" else "vllm"


def build_command(spec: EngineSpec, backend: str, port: int) -> list[str]:
    """The argv that starts this engine listening on `host:port`."""
    if backend == "sim":
        argv = [
            sys.executable,
            "-m",
            "sage.engines.sim",
            "--model",
            spec.model,
            "--host",
            spec.host,
            "--port",
            str(port),
        ]
        if spec.kind == "embedding":
            argv += ["--embedding-dim", str(SIM_EMBEDDING_DIM)]
        for alias in spec.aliases:
            argv += ["--served-model-name", alias]
        return argv + list(spec.extra_args)
    if backend == "embedding":
        if spec.kind != "embedding":
            raise InvalidRequestError(
                "backend embedding serves embedding engines only", param="backend"
            )
        argv = [
            sys.executable,
            "-m",
            "sage.engines.embedding",
            "--model",
            spec.model,
            "--served-model-name",
            spec.model,
            "--host",
            spec.host,
            "--port",
            str(port),
        ]
        for alias in spec.aliases:
            argv += ["--alias", alias]
        return argv + list(spec.extra_args)
    if backend == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise EngineStartError(
                "backend vllm is not installed here (pip install vllm), "
                "or use --backend sim to try the stack without a GPU",
                param="backend",
            )
        argv = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            spec.model,
            "--host",
            spec.host,
            "--port",
            str(port),
            "--tensor-parallel-size",
            str(max(1, spec.tensor_parallel_size)),
        ]
        if spec.gpu_memory_utilization:
            argv += ["--gpu-memory-utilization", f"{spec.gpu_memory_utilization:g}"]
        return argv + list(spec.extra_args)
    raise InvalidRequestError(
        f"unknown backend {backend!r}; choose sim, embedding, vllm or external (with base_url)",
        param="backend",
    )
