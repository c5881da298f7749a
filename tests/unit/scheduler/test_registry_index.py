"""EngineRegistry's indexes after one change at a time: an etcd-mode replica applies every
engines/ put on its own, so a change updates only the entries of the engine's names and
kind. What routing reads (ready_for, ready) must be what a registry built from the same
engines in one go reads, and a model the change did not touch keeps its tuple (routers
cache what they derive from it by identity)."""

from __future__ import annotations

import contextlib
import random

import pytest

from sage.common.exceptions import ModelNotFoundError, NotFoundError
from sage.services.scheduler.registry import (
    EngineKind,
    EngineRecord,
    EngineRegistry,
    EngineState,
)

MODELS = ("m0", "m1", "m2")
STATES = (EngineState.READY, EngineState.READY, EngineState.DRAINING, EngineState.STARTING)


def random_record(rng: random.Random, engine_id: str) -> EngineRecord:
    """An engine of a random model, kind, state, aliases and adapters (names overlap
    across engines and kinds, so one name's entry mixes kinds)."""
    model = rng.choice(MODELS)
    return EngineRecord(
        engine_id=engine_id,
        model=model,
        kind=rng.choice(tuple(EngineKind)),
        base_url=f"http://10.0.0.{rng.randrange(250)}:8000/",
        state=rng.choice(STATES),
        aliases=tuple(rng.sample(("a0", "a1", model), rng.randrange(3))),
        adapters={name: f"/lora/{name}" for name in rng.sample(("l0", "l1"), rng.randrange(3))},
    )


def routed(registry: EngineRegistry, name: str, kind: EngineKind | None) -> list[str] | None:
    """The engine ids ready_for answers, sorted; None when it says the model has none."""
    try:
        return sorted(r.engine_id for r in registry.ready_for(name, kind))
    except ModelNotFoundError:
        return None


def assert_same_routing(registry: EngineRegistry) -> None:
    """What `registry` routes equals what one built from its engines in one pass routes."""
    fresh = EngineRegistry()
    fresh.register_many(registry.engines())
    for name in (*MODELS, "a0", "a1", "l0", "l1", "unknown"):
        for kind in (None, *EngineKind):
            assert routed(registry, name, kind) == routed(fresh, name, kind), (name, kind)
    every = registry.engines()
    assert registry.counts() == (len(every), sum(e.state is EngineState.READY for e in every))
    for kind in EngineKind:
        assert sorted(r.engine_id for r in registry.ready(kind)) == sorted(
            r.engine_id for r in fresh.ready(kind)
        )
        assert all(r.kind is kind for r in registry.ready(kind))
    for name in MODELS:
        for kind in (None, *EngineKind):
            engines = routed(registry, name, kind)
            if engines is not None:
                got = registry.ready_for(name, kind)
                assert all(r.state is EngineState.READY and r.serves(name) for r in got)
                assert kind is None or all(r.kind is kind for r in got)
                assert len(set(engines)) == len(engines)  # no engine twice


@pytest.mark.parametrize("seed", range(5))
def test_one_change_at_a_time_routes_like_a_registry_built_at_once(seed: int) -> None:
    rng = random.Random(seed)
    registry = EngineRegistry()
    registry.register_many(random_record(rng, f"e{i}") for i in range(8))
    ids = [f"e{i}" for i in range(16)]
    for _ in range(400):
        engine_id = rng.choice(ids)
        action = rng.random()
        if action < 0.6:
            registry.register(random_record(rng, engine_id))
        elif action < 0.8:
            registry.set_state(engine_id, rng.choice(STATES))
        else:
            with contextlib.suppress(NotFoundError):
                registry.deregister(engine_id)
        assert_same_routing(registry)


def engine(engine_id: str, model: str, state: EngineState = EngineState.READY) -> EngineRecord:
    return EngineRecord(engine_id, model, EngineKind.LLM, "http://127.0.0.1:9", state=state)


def test_a_change_leaves_other_models_tuples_as_they_were() -> None:
    registry = EngineRegistry()
    registry.register_many([engine("a1", "a"), engine("a2", "a"), engine("b1", "b")])
    a_before = registry.ready_for("a", EngineKind.LLM)
    b_before = registry.ready_for("b", EngineKind.LLM)

    registry.set_state("b1", EngineState.DRAINING)
    registry.register(engine("b2", "b"))

    assert registry.ready_for("a", EngineKind.LLM) is a_before
    assert registry.ready_for("b", EngineKind.LLM) is not b_before
    assert [r.engine_id for r in registry.ready_for("b")] == ["b2"]
    registry.deregister("b2")
    with pytest.raises(ModelNotFoundError, match="none ready"):
        registry.ready_for("b")
    assert registry.ready_for("a", EngineKind.LLM) is a_before


def test_an_engine_replaced_while_ready_keeps_its_place_and_serves_its_new_record() -> None:
    registry = EngineRegistry()
    registry.register_many([engine("e1", "m"), engine("e2", "m"), engine("e3", "m")])
    registry.register(EngineRecord("e1", "m", EngineKind.LLM, "http://127.0.0.1:10/"))

    engines = registry.ready_for("m")
    assert [r.engine_id for r in engines] == ["e1", "e2", "e3"]
    assert engines[0].base_url == "http://127.0.0.1:10"
    assert registry.ready(EngineKind.LLM) == engines


def test_an_engine_that_changes_model_leaves_the_old_ones_entry() -> None:
    registry = EngineRegistry()
    registry.register(engine("e1", "old"))
    registry.register(engine("e1", "new"))

    assert [r.engine_id for r in registry.ready_for("new")] == ["e1"]
    with pytest.raises(ModelNotFoundError):
        registry.ready_for("old")
    assert [m.id for m in registry.models()] == ["new"]
