"""Autoscaler decisions on an injected clock with a recording ScalerActions."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

import pytest

from sage.common.config.settings import AutoscalerSettings
from sage.common.config.values import AutoscaleRule, parse_autoscale
from sage.common.exceptions import ConfigurationError
from sage.services.scheduler.autoscaler import Autoscaler, ScaleDirection


@dataclass
class Clock:
    """A manual monotonic clock."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class RecordingActions:
    """ScalerActions that records calls and changes the fake fleet; `gate` holds them open."""

    fleet: dict[str, list[str]]
    calls: list[tuple[str, str]] = field(default_factory=list)
    gate: asyncio.Event | None = None
    started: int = 0

    async def start_replica(self, model: str) -> None:
        self.calls.append(("start", model))
        if self.gate is not None:
            await self.gate.wait()
        self.started += 1
        self.fleet[model].append(f"{model}-new{self.started}")

    async def stop_replica(self, engine_id: str) -> None:
        self.calls.append(("stop", engine_id))
        if self.gate is not None:
            await self.gate.wait()
        for engines in self.fleet.values():
            if engine_id in engines:
                engines.remove(engine_id)


@dataclass
class Signals:
    """The scheduler state the autoscaler reads."""

    queued: dict[str, int] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)
    slo: dict[str, float | None] = field(default_factory=dict)


def make(
    *,
    replicas: int = 1,
    low: int = 1,
    high: int = 3,
    dry_run: bool = False,
    gate: asyncio.Event | None = None,
) -> tuple[Autoscaler, RecordingActions, Signals, Clock]:
    fleet = {"m": [f"m-{i}" for i in range(replicas)]}
    actions = RecordingActions(fleet, gate=gate)
    signals = Signals()
    clock = Clock()
    config = AutoscalerSettings(
        models=[AutoscaleRule(model="m", min=low, max=high)],
        dry_run=dry_run,
        queue_threshold=4,
        up_after_s=5.0,
        idle_s=60.0,
        cooldown_s=30.0,
        slo_target=0.9,
    )
    scaler = Autoscaler(
        config,
        actions,
        replicas=lambda model: list(fleet.get(model, [])),
        queued=lambda model: signals.queued.get(model, 0),
        in_flight=lambda engine_id: signals.in_flight.get(engine_id, 0),
        slo_attainment=lambda model: signals.slo.get(model),
        clock=clock,
    )
    return scaler, actions, signals, clock


async def run_tick(scaler: Autoscaler, clock: Clock, advance: float = 0.0) -> list[str]:
    clock.now += advance
    decisions = await scaler.tick()
    await scaler.wait_actions()
    return [d.direction.value for d in decisions]


def busy(signals: Signals, *engine_ids: str) -> None:
    signals.in_flight = dict.fromkeys(engine_ids, 1)


async def test_scales_up_after_a_sustained_queue_not_on_a_blip() -> None:
    scaler, actions, signals, clock = make()
    busy(signals, "m-0")
    signals.queued["m"] = 10
    assert await run_tick(scaler, clock) == []
    signals.queued["m"] = 0  # the blip ends before up_after_s
    assert await run_tick(scaler, clock, 3) == []
    signals.queued["m"] = 10
    assert await run_tick(scaler, clock, 3) == []  # high again: the timer restarts
    assert await run_tick(scaler, clock, 4) == []
    assert await run_tick(scaler, clock, 1.5) == ["up"]
    assert actions.calls == [("start", "m")]


async def test_never_above_max() -> None:
    scaler, actions, signals, clock = make(replicas=2, high=2)
    busy(signals, "m-0", "m-1")
    signals.queued["m"] = 50
    signals.slo["m"] = 0.1
    for _ in range(10):
        assert await run_tick(scaler, clock, 40) == []
    assert actions.calls == []


async def test_scales_up_to_max_then_stops_with_cooldown_between() -> None:
    scaler, actions, signals, clock = make(high=3)
    signals.queued["m"] = 50
    busy(signals, "m-0")
    await run_tick(scaler, clock)
    assert await run_tick(scaler, clock, 6) == ["up"]
    assert await run_tick(scaler, clock, 10) == []  # cooling down
    assert await run_tick(scaler, clock, 25) == ["up"]  # queue stayed high through cooldown
    for _ in range(5):
        assert await run_tick(scaler, clock, 40) == []
    assert [c for c, _ in actions.calls] == ["start", "start"]
    assert len(actions.fleet["m"]) == 3


async def test_scales_down_an_idle_replica_after_cooldown_never_below_min() -> None:
    scaler, actions, signals, clock = make(replicas=3, low=1)
    busy(signals, "m-0")  # m-1 and m-2 idle from now
    assert await run_tick(scaler, clock) == []
    assert await run_tick(scaler, clock, 59) == []  # not idle long enough yet
    assert await run_tick(scaler, clock, 2) == ["down"]
    stopped = actions.calls[-1]
    assert stopped[0] == "stop" and stopped[1] in ("m-1", "m-2")
    assert await run_tick(scaler, clock, 10) == []  # cooldown after the action
    assert await run_tick(scaler, clock, 25) == ["down"]
    assert actions.fleet["m"] == ["m-0"]
    busy(signals)  # everything idle, but min is 1
    for _ in range(5):
        assert await run_tick(scaler, clock, 100) == []
    assert actions.fleet["m"] == ["m-0"]


async def test_busy_replicas_and_a_queue_prevent_scale_down() -> None:
    scaler, _actions, signals, clock = make(replicas=2)
    busy(signals, "m-0", "m-1")
    await run_tick(scaler, clock)
    assert await run_tick(scaler, clock, 100) == []
    busy(signals)
    signals.queued["m"] = 1  # something waits: do not shrink
    await run_tick(scaler, clock)
    assert await run_tick(scaler, clock, 100) == []
    signals.queued["m"] = 0
    assert await run_tick(scaler, clock, 1) == ["down"]


async def test_dry_run_never_acts() -> None:
    scaler, actions, signals, clock = make(dry_run=True)
    signals.queued["m"] = 50
    busy(signals, "m-0")
    await run_tick(scaler, clock)
    assert await run_tick(scaler, clock, 6) == ["up"]  # decided and logged
    assert await run_tick(scaler, clock, 1) == []  # the cooldown applies as if it acted
    assert actions.calls == []
    assert actions.fleet["m"] == ["m-0"]


async def test_slo_miss_scales_up_and_unknown_slo_does_not() -> None:
    scaler, actions, signals, clock = make()
    busy(signals, "m-0")
    signals.slo["m"] = None
    assert await run_tick(scaler, clock) == []
    signals.slo["m"] = math.nan
    assert await run_tick(scaler, clock, 1) == []
    signals.slo["m"] = 0.95
    assert await run_tick(scaler, clock, 1) == []
    signals.slo["m"] = 0.5
    assert await run_tick(scaler, clock, 1) == ["up"]
    assert actions.calls == [("start", "m")]


async def test_one_action_in_flight_per_model() -> None:
    gate = asyncio.Event()
    scaler, actions, signals, clock = make(gate=gate)
    signals.slo["m"] = 0.1
    busy(signals, "m-0")
    clock.now += 1
    assert [d.direction for d in await scaler.tick()] == [ScaleDirection.UP]
    await asyncio.sleep(0)
    assert scaler.in_flight_action("m")
    for _ in range(3):
        clock.now += 100  # past any cooldown, but the start is still running
        assert await scaler.tick() == []
    assert actions.calls == [("start", "m")]
    gate.set()
    await scaler.wait_actions()
    assert not scaler.in_flight_action("m")
    assert await scaler.tick() == []  # cooldown runs from when the action finished
    clock.now += 31
    assert [d.direction for d in await scaler.tick()] == [ScaleDirection.UP]
    await scaler.aclose()


async def test_failed_action_is_logged_and_cooled_down() -> None:
    scaler, actions, signals, clock = make()

    async def boom(model: str) -> None:
        actions.calls.append(("start", model))
        raise RuntimeError("lifecycle down")

    actions.start_replica = boom  # type: ignore[method-assign]
    signals.slo["m"] = 0.1
    busy(signals, "m-0")
    assert await run_tick(scaler, clock, 1) == ["up"]
    assert await run_tick(scaler, clock, 1) == []
    assert await run_tick(scaler, clock, 30) == ["up"]
    assert len(actions.calls) == 2


async def test_no_replicas_means_no_action() -> None:
    scaler, actions, signals, clock = make(replicas=0)
    signals.queued["m"] = 50
    signals.slo["m"] = 0.0
    await run_tick(scaler, clock)
    assert await run_tick(scaler, clock, 100) == []
    assert actions.calls == []


async def test_start_ticks_in_the_background_and_aclose_stops_it() -> None:
    first, actions, _signals, _clock = make()
    scaler = Autoscaler(
        AutoscalerSettings(models=first.config.models, interval_s=0.01, slo_target=0.9),
        actions,
        replicas=lambda model: ["m-0"],
        queued=lambda model: 0,
        in_flight=lambda engine_id: 1,
        slo_attainment=lambda model: 0.0,
    )
    scaler.start()
    for _ in range(100):
        if actions.calls:
            break
        await asyncio.sleep(0.01)
    await scaler.aclose()
    assert actions.calls[0] == ("start", "m")


async def test_a_replica_that_does_not_lead_idles_until_it_does() -> None:
    first, actions, _signals, _clock = make()
    leads = False
    scaler = Autoscaler(
        AutoscalerSettings(models=first.config.models, interval_s=0.01, slo_target=0.9),
        actions,
        replicas=lambda model: ["m-0"],
        queued=lambda model: 0,
        in_flight=lambda engine_id: 1,
        slo_attainment=lambda model: 0.0,  # missed: the leader scales up at once
        active=lambda: leads,
    )
    scaler.start()
    await asyncio.sleep(0.2)  # twenty intervals as a follower
    assert actions.calls == [] and scaler.decisions == {}
    leads = True
    for _ in range(100):
        if actions.calls:
            break
        await asyncio.sleep(0.01)
    await scaler.aclose()
    assert actions.calls[0] == ("start", "m")
    assert scaler.decisions == {("m", "up"): 1}


def test_parse_autoscale() -> None:
    assert parse_autoscale("") == []
    assert parse_autoscale(" sim:1:2 , qwen:7b:2:4 ") == [
        AutoscaleRule(model="sim", min=1, max=2),
        AutoscaleRule(model="qwen:7b", min=2, max=4),
    ]


@pytest.mark.parametrize(
    "spec", ["sim", "sim:1", ":1:2", "sim:a:2", "sim:1:x", "sim:0:2", "sim:3:2", "a:1:2,a:1:3"]
)
def test_parse_autoscale_errors_name_the_variable(spec: str) -> None:
    with pytest.raises(ConfigurationError) as err:
        parse_autoscale(spec)
    assert "SAGE_AUTOSCALE" in err.value.message
    assert err.value.param == "SAGE_AUTOSCALE"
