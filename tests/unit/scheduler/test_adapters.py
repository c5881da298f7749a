"""AdapterPlacer: where a LoRA adapter no engine has loaded goes, one load for concurrent
requests, and a bounded wait. The loader stands in for lifecycle's LoadAdapter (its gRPC
path is covered by tests/integration/test_lora_adapters.py)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from sage.common.exceptions import (
    DeadlineExceededError,
    ModelNotFoundError,
    ServiceUnavailableError,
    UpstreamError,
)
from sage.services.scheduler.adapters import AdapterPlacer
from sage.services.scheduler.registry import (
    AdapterEntry,
    EngineKind,
    EngineRecord,
    EngineRegistry,
)


def engine(engine_id: str, lora: bool = True, **adapters: str) -> EngineRecord:
    return EngineRecord(
        engine_id,
        "base",
        EngineKind.LLM,
        f"http://127.0.0.1:1/{engine_id}",
        lora_enabled=lora,
        adapters=dict(adapters),
    )


class Loads:
    """A load that takes `delay_s` and then reports the adapter loaded, as lifecycle does."""

    def __init__(self, delay_s: float = 0.0, error: Exception | None = None) -> None:
        self.delay_s = delay_s
        self.error = error
        self.calls: list[tuple[str, str]] = []

    async def __call__(self, target: EngineRecord, adapter: AdapterEntry) -> EngineRecord:
        self.calls.append((target.engine_id, adapter.name))
        await asyncio.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return replace(target, adapters={**target.adapters, adapter.name: adapter.path})


class Load:
    def __init__(self, loads: dict[str, float]) -> None:
        self.loads = loads

    def load(self, engine_id: str) -> float:
        return self.loads.get(engine_id, 0.0)


def registry_with_known_adapter() -> EngineRegistry:
    """Engines a (busy), b (idle), c (idle, no LoRA); adapter `ad` known from an engine
    that has since gone."""
    registry = EngineRegistry()
    registry.register(engine("gone", ad="/models/ad"))
    registry.deregister("gone")
    for record in (engine("a"), engine("b"), engine("c", lora=False)):
        registry.register(record)
    return registry


async def test_loads_on_the_least_loaded_lora_engine_once_for_concurrent_requests() -> None:
    registry = registry_with_known_adapter()
    loads = Loads(delay_s=0.05)
    placer = AdapterPlacer(registry, loads, Load({"a": 3, "b": 1, "c": 0}))
    results = await asyncio.gather(*(placer.engines_for("ad") for _ in range(5)))
    assert loads.calls == [("b", "ad")]  # c is idler but cannot load adapters
    assert all([e.engine_id for e in r] == ["b"] for r in results)
    assert registry.ready_for("ad")[0].adapters == {"ad": "/models/ad"}


async def test_a_slow_load_times_out_and_the_next_request_finds_it_loaded() -> None:
    registry = registry_with_known_adapter()
    loads = Loads(delay_s=0.3)
    placer = AdapterPlacer(registry, loads, timeout_s=0.05)
    with pytest.raises(DeadlineExceededError, match=r"'ad'.*0\.05s"):
        await placer.engines_for("ad")
    placer.timeout_s = 30
    # The load went on without the caller: the next request waits for it, not a new one.
    assert [e.engine_id for e in await placer.engines_for("ad")] == ["a"]
    assert [e.engine_id for e in await placer.engines_for("ad")] == ["a"]  # loaded: no load
    assert len(loads.calls) == 1


async def test_failures_say_which_adapter_and_why() -> None:
    registry = registry_with_known_adapter()
    failing = AdapterPlacer(registry, Loads(error=UpstreamError("engine a crashed")))
    with pytest.raises(ServiceUnavailableError, match="'ad' on engine a: engine a crashed"):
        await failing.engines_for("ad")
    with pytest.raises(ModelNotFoundError):
        await failing.engines_for("never-loaded")
    for engine_id in ("a", "b"):
        registry.deregister(engine_id)
    with pytest.raises(ServiceUnavailableError, match="LoRA enabled"):
        await AdapterPlacer(registry, Loads()).engines_for("ad")
    registry.deregister("c")
    with pytest.raises(ServiceUnavailableError, match="base model 'base'"):
        await AdapterPlacer(registry, Loads()).engines_for("ad")


def test_registry_lists_adapters_and_forgets_one_unloaded_everywhere() -> None:
    registry = EngineRegistry()
    registry.register(engine("a", ad="/models/ad"))
    registry.register(engine("b", ad="/models/ad"))
    models = {m.id: m for m in registry.models()}
    assert (models["ad"].parent, models["ad"].ready_engines) == ("base", 2)
    registry.register(engine("a"))  # unloaded from a: b still has it
    assert registry.adapter("ad") is not None
    assert [e.engine_id for e in registry.ready_for("ad")] == ["b"]
    registry.register(engine("b"))  # unloaded from the last engine
    assert registry.adapter("ad") is None
    assert "ad" not in {m.id for m in registry.models()}
