"""Autoscaler: per model, start a replica when the queue stays long or SLOs are missed, and
drain an idle replica after a cooldown, always within the model's [min, max] replicas.

Decisions live here and read the scheduler's own state through callables; acting (start /
stop an engine) goes through a `ScalerActions` the server implements over lifecycle gRPC.
At most one action per model is in flight, and each one is followed by a cooldown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from sage.common.config.settings import AutoscalerSettings
from sage.common.config.values import AutoscaleRule

log = logging.getLogger("sage.scheduler.autoscaler")


class ScalerActions(Protocol):
    """How the autoscaler changes the fleet (lifecycle gRPC in production)."""

    async def start_replica(self, model: str) -> None:
        """Start one more engine like the model's existing ones; returns once it is up."""
        ...

    async def stop_replica(self, engine_id: str) -> None:
        """Drain and stop one engine."""
        ...


class ScaleDirection(StrEnum):
    """Which way a decision scales."""

    UP = "up"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class ScaleDecision:
    """One action the autoscaler took (or, in dry-run, would have taken)."""

    model: str
    direction: ScaleDirection
    reason: str
    engine_id: str = ""


@dataclass
class _ModelState:
    queue_high_since: float | None = None
    last_action_at: float | None = None  # when the last action finished (cooldown start)
    pending: asyncio.Task[None] | None = None
    idle_since: dict[str, float] = field(default_factory=dict)


class Autoscaler:
    """Decides scale up/down per model each `tick` and acts through `ScalerActions`. Its
    thresholds and timings are the settings' own (AutoscalerSettings, SAGE_AUTOSCALE_*),
    so their defaults live in one place."""

    def __init__(
        self,
        config: AutoscalerSettings,
        actions: ScalerActions,
        *,
        replicas: Callable[[str], Sequence[str]],
        queued: Callable[[str], int],
        in_flight: Callable[[str], int],
        slo_attainment: Callable[[str], float | None],
        clock: Callable[[], float] = time.monotonic,
        active: Callable[[], bool] = lambda: True,
    ) -> None:
        self.config = config
        self.actions = actions
        self._replicas = replicas
        self._queued = queued
        self._in_flight = in_flight
        self._slo_attainment = slo_attainment
        self.clock = clock
        self._ranges = {rule.model: rule for rule in config.models}
        self._models = {model: _ModelState() for model in self._ranges}
        self._task: asyncio.Task[None] | None = None
        # Only one scheduler replica decides (etcd mode: the elected leader); the others'
        # loops idle, so two replicas never start the same replica twice.
        self.active = active
        self._was_active = True
        # (model, direction) -> decisions taken (or logged, in dry-run), for /metrics.
        self.decisions: dict[tuple[str, str], int] = {}

    def in_flight_action(self, model: str) -> bool:
        """True while a scaling action for `model` is running."""
        pending = self._models[model].pending
        return pending is not None and not pending.done()

    async def tick(self, now: float | None = None) -> list[ScaleDecision]:
        """Decide for every model and start the actions (they run as tasks)."""
        at = self.clock() if now is None else now
        decisions: list[ScaleDecision] = []
        for model, limits in self._ranges.items():
            decision = self._decide(model, limits, at)
            if decision is not None:
                decisions.append(decision)
                self._act(decision, at)
        return decisions

    def _slo_missed(self, model: str) -> float | None:
        attainment = self._slo_attainment(model)
        if attainment is None or math.isnan(attainment):
            return None  # unknown: no evidence either way
        return attainment if attainment < self.config.slo_target else None

    def _decide(self, model: str, limits: AutoscaleRule, now: float) -> ScaleDecision | None:
        state = self._models[model]
        replicas = list(self._replicas(model))
        queued = self._queued(model)
        # Sample the signals every tick, even when no action is possible, so "sustained"
        # and "idle for" are measured from what was observed, not from the last action.
        if queued > self.config.queue_threshold:
            if state.queue_high_since is None:
                state.queue_high_since = now
        else:
            state.queue_high_since = None
        for engine_id in [e for e in state.idle_since if e not in replicas]:
            del state.idle_since[engine_id]
        for engine_id in replicas:
            if self._in_flight(engine_id) > 0:
                state.idle_since.pop(engine_id, None)
            else:
                state.idle_since.setdefault(engine_id, now)

        if self.in_flight_action(model):
            return None
        if state.last_action_at is not None and now - state.last_action_at < self.config.cooldown_s:
            return None
        if not replicas:
            return None  # nothing to copy a new replica from; lifecycle owns the first one

        count = len(replicas)
        if count < limits.max:
            if count < limits.min:
                return ScaleDecision(model, ScaleDirection.UP, f"below min {limits.min}")
            high_since = state.queue_high_since
            if high_since is not None and now - high_since >= self.config.up_after_s:
                return ScaleDecision(
                    model,
                    ScaleDirection.UP,
                    f"queue {queued} > {self.config.queue_threshold} for {now - high_since:.1f}s",
                )
            missed = self._slo_missed(model)
            if missed is not None:
                return ScaleDecision(
                    model,
                    ScaleDirection.UP,
                    f"slo attainment {missed:.2f} < {self.config.slo_target:.2f}",
                )
        if count > limits.min and queued == 0:
            idle = [
                (since, engine_id)
                for engine_id, since in state.idle_since.items()
                if now - since >= self.config.idle_s
            ]
            if idle:
                since, engine_id = min(idle)  # the one idle longest
                return ScaleDecision(
                    model, ScaleDirection.DOWN, f"idle for {now - since:.1f}s", engine_id
                )
        return None

    def _act(self, decision: ScaleDecision, now: float) -> None:
        state = self._models[decision.model]
        log.info(
            "autoscale model=%s direction=%s engine_id=%s reason=%r dry_run=%s",
            decision.model,
            decision.direction.value,
            decision.engine_id,
            decision.reason,
            self.config.dry_run,
        )
        key = (decision.model, decision.direction.value)
        self.decisions[key] = self.decisions.get(key, 0) + 1
        state.queue_high_since = None  # a new replica must see its own sustained queue
        if decision.engine_id:
            state.idle_since.pop(decision.engine_id, None)
        if self.config.dry_run:
            state.last_action_at = now  # cooldown as if acted, so the log is not a flood
            return
        state.pending = asyncio.create_task(self._run(decision))

    async def _run(self, decision: ScaleDecision) -> None:
        state = self._models[decision.model]
        try:
            if decision.direction is ScaleDirection.UP:
                await self.actions.start_replica(decision.model)
            else:
                await self.actions.stop_replica(decision.engine_id)
        except asyncio.CancelledError:
            raise
        except Exception:  # a failed action is logged; the cooldown still applies
            log.exception(
                "autoscale action failed model=%s direction=%s engine_id=%s",
                decision.model,
                decision.direction.value,
                decision.engine_id,
            )
        finally:
            state.last_action_at = self.clock()

    async def wait_actions(self) -> None:
        """Wait until every action in flight has finished."""
        pending = [s.pending for s in self._models.values() if s.pending is not None]
        await asyncio.gather(*pending, return_exceptions=True)

    def _idle(self) -> bool:
        """True while another replica decides; what this one observed is then dropped, so
        one that takes over measures "sustained" and "idle for" from its own samples."""
        active = self.active()
        if active != self._was_active:
            self._was_active = active
            log.info("autoscaler %s", "runs here" if active else "idles (another replica leads)")
        if active:
            return False
        for state in self._models.values():
            state.queue_high_since = None
            state.idle_since.clear()
        return True

    async def _run_forever(self) -> None:
        while True:
            try:
                if not self._idle():
                    await self.tick()
            except Exception:  # one bad round must not stop autoscaling
                log.exception("autoscale tick failed")
            await asyncio.sleep(self.config.interval_s)

    def start(self) -> None:
        """Tick every interval_s in the running loop."""
        if self._task is None:
            self._task = asyncio.create_task(self._run_forever())

    async def aclose(self) -> None:
        """Stop ticking and cancel actions still in flight."""
        tasks = [s.pending for s in self._models.values() if s.pending is not None]
        if self._task is not None:
            tasks.append(self._task)
            self._task = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
