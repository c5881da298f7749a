"""LoRA adapters on demand: a request naming an adapter no ready engine has loaded waits
(bounded) while the adapter is loaded on the least-loaded LoRA engine of its base model.

Which engine has which adapter is part of the routing table (each registration lists its
engine's adapters, registry.py), so routing to an engine that has it loaded is plain model
routing. Loading goes through lifecycle (it owns the engines, and reloads their adapters
after a crash restart); this module only decides where and bounds the wait.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from sage.common.exceptions import (
    DeadlineExceededError,
    ModelNotFoundError,
    SageError,
    ServiceUnavailableError,
)

from .registry import AdapterEntry, EngineKind, EngineRecord, EngineRegistry
from .routing import LoadView, NoLoad
from .routing.base import least_loaded

log = logging.getLogger("sage.scheduler")

# Loads `adapter` on the engine and returns the engine as registered after it.
AdapterLoader = Callable[[EngineRecord, AdapterEntry], Awaitable[EngineRecord]]
# A vLLM load reads the adapter's weights; seconds on CPU, more from a slow disk or the Hub.
DEFAULT_LOAD_TIMEOUT_S = 60.0


class AdapterPlacer:
    """Loads an adapter where a request needs it; concurrent requests for the same adapter
    share one load."""

    def __init__(
        self,
        registry: EngineRegistry,
        loader: AdapterLoader,
        load: LoadView | None = None,
        timeout_s: float = DEFAULT_LOAD_TIMEOUT_S,
    ) -> None:
        self.registry = registry
        self._loader = loader
        self._load = load or NoLoad()
        self.timeout_s = timeout_s
        self._pending: dict[str, asyncio.Task[EngineRecord]] = {}

    async def engines_for(self, model: str) -> tuple[EngineRecord, ...]:
        """Ready engines with adapter `model` loaded, loading it first when none has;
        ModelNotFoundError when `model` is no adapter the stack knows."""
        adapter = self.registry.adapter(model)
        if adapter is None:
            raise ModelNotFoundError(model)
        loaded = self._loaded(model)
        if loaded:  # a load that finished since the caller looked
            return loaded
        task = self._pending.get(model)
        if task is None:
            engine = self._pick(adapter)
            task = asyncio.get_running_loop().create_task(self._place(engine, adapter))
            self._pending[model] = task
            task.add_done_callback(lambda _: self._pending.pop(model, None))
        try:
            # shield: a caller that times out or goes away leaves the load to finish for
            # the next request (vLLM cannot cancel a load half-way anyway).
            await asyncio.wait_for(asyncio.shield(task), self.timeout_s)
        except TimeoutError:
            raise DeadlineExceededError(
                f"loading LoRA adapter {model!r} took longer than {self.timeout_s:g}s; "
                "the request was not run (the load goes on: retry shortly)"
            ) from None
        return self.registry.ready_for(model, EngineKind.LLM)

    def _loaded(self, model: str) -> tuple[EngineRecord, ...]:
        try:
            return self.registry.ready_for(model, EngineKind.LLM)
        except ModelNotFoundError:
            return ()

    def _pick(self, adapter: AdapterEntry) -> EngineRecord:
        try:
            engines = self.registry.ready_for(adapter.base_model, EngineKind.LLM)
        except ModelNotFoundError:
            raise ServiceUnavailableError(
                f"LoRA adapter {adapter.name!r} needs its base model {adapter.base_model!r}, "
                "which has no ready engine"
            ) from None
        capable = [e for e in engines if e.lora_enabled]
        if not capable:
            raise ServiceUnavailableError(
                f"LoRA adapter {adapter.name!r} is not loaded, and no ready engine of its "
                f"base model {adapter.base_model!r} was started with LoRA enabled"
            )
        return least_loaded(capable, self._load)[0]

    async def _place(self, engine: EngineRecord, adapter: AdapterEntry) -> EngineRecord:
        log.info(
            "loading LoRA adapter on demand",
            extra={"adapter": adapter.name, "engine_id": engine.engine_id},
        )
        try:
            updated = await self._loader(engine, adapter)
        except SageError as exc:
            raise ServiceUnavailableError(
                f"could not load LoRA adapter {adapter.name!r} on engine "
                f"{engine.engine_id}: {exc.message}",
                code="adapter_load_failed",
            ) from None
        # Lifecycle registered it already; registering the reply too covers a registration
        # that has not arrived yet.
        self.registry.register(updated)
        return updated
