"""The interface every engine backend implements: one module per backend.

A backend knows how to launch its program (argv + env, never a shell), how to tell that it
is ready, and whether it can run on this host. Lifecycle owns ports, GPUs, processes, logs
and restarts; a backend owns only what is specific to its program.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ..spec import EngineSpec


@dataclass(frozen=True)
class LaunchPlan:
    """How to start one engine process."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # added to lifecycle's environment
    health_path: str = "/health"  # GET → 200 when ready to serve
    startup_timeout_s: float | None = None  # None = the spec's
    # Labels the engine is registered with besides the spec's (vLLM: kv_events_endpoint,
    # where the scheduler subscribes to its KV-cache events).
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here, and if not, what to do about it."""

    ok: bool
    reason: str = ""


class Backend(Protocol):
    """One way to serve models (vllm, tei, infinity, embedding, transformers, sim, external)."""

    name: str
    kinds: frozenset[str]  # which engine kinds it serves: {"llm"}, {"embedding"}, or both
    uses_gpu: bool  # whether it wants GPUs when the host has them
    launches_process: bool  # False for external (a URL registered as it is)
    # Environment variable the program reads its API key from ("" = it takes none): the
    # key lifecycle gives each engine goes there, never into argv (visible in `ps`).
    api_key_env: str

    def availability(self) -> Availability:
        """Installed and runnable here? (cheap: no process is started)"""
        ...

    def plan(self, spec: EngineSpec, port: int, gpu_ids: list[int]) -> LaunchPlan:
        """argv/env to serve `spec` on `spec.host:port` using `gpu_ids` (empty: CPU)."""
        ...
