"""Queueing policies by name. Choosing one is configuration; an unknown name is an error."""

from __future__ import annotations

from collections.abc import Callable

from sage.common.exceptions import ConfigurationError

from .adaptive import AdaptivePolicy
from .base import QueuedRequest, RequestClass, SchedulingPolicy, Shed
from .cost_optimized import CostOptimizedPolicy
from .fair import FairPolicy
from .fifo import FifoPolicy
from .hybrid import HybridPolicy
from .priority import PriorityPolicy
from .slo_aware import Predictor, SloAwarePolicy

__all__ = [
    "POLICY_NAMES",
    "QueuedRequest",
    "RequestClass",
    "SchedulingPolicy",
    "Shed",
    "create_policy",
]

_FACTORIES: dict[str, Callable[[Predictor | None], SchedulingPolicy]] = {
    "fifo": lambda predict: FifoPolicy(),
    "priority": lambda predict: PriorityPolicy(),
    "fair": lambda predict: FairPolicy(),
    "slo_aware": lambda predict: SloAwarePolicy(predict, on_miss="demote"),
    "slo_aware_shed": lambda predict: SloAwarePolicy(predict, on_miss="shed"),
    "cost_optimized": lambda predict: CostOptimizedPolicy(),
    "adaptive": lambda predict: AdaptivePolicy(predict=predict),
}
POLICY_NAMES = sorted([*_FACTORIES, "hybrid"])


def create_policy(name: str, predict: Predictor | None = None) -> SchedulingPolicy:
    """`fifo`, `priority`, `fair`, `slo_aware`, `cost_optimized`, `adaptive`, or
    `hybrid[:inner]` (default inner: slo_aware)."""
    base, _, inner = name.partition(":")
    if base == "hybrid":
        return HybridPolicy(create_policy(inner or "slo_aware", predict))
    factory = _FACTORIES.get(base)
    if factory is None or inner:
        raise ConfigurationError(
            f"unknown scheduling policy {name!r}; choose one of {POLICY_NAMES}",
            param="policy",
        )
    return factory(predict)
