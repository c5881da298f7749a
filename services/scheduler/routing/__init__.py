"""Instance routing: pick one engine among the ready ones for a model.

One small interface (base.Router) and one module per strategy, chosen by name from config
(SAGE_SCHEDULER_ROUTING).
"""

from __future__ import annotations

from collections.abc import Callable

from sage.common.exceptions import ConfigurationError

from .base import (
    PREFIX_CHARS,
    Annotating,
    FailoverOrder,
    LoadView,
    NoLoad,
    Router,
    RouteRequest,
    failover_order,
    failover_view,
    prefix_of,
    prompt_prefix,
)
from .kv_events import KvEventsRouter
from .least_loaded import LeastLoadedRouter
from .p2c import PowerOfTwoRouter
from .prefix_aware import PrefixAwareRouter
from .round_robin import RoundRobinRouter
from .session_affinity import SessionAffinityRouter

ROUTERS: dict[str, Callable[[LoadView], Router]] = {
    "round_robin": lambda load: RoundRobinRouter(),
    "least_loaded": LeastLoadedRouter,
    "power_of_two": PowerOfTwoRouter,
    "session_affinity": SessionAffinityRouter,
    "prefix_aware": PrefixAwareRouter,
    "kv_events": KvEventsRouter,
}
ROUTER_NAMES: tuple[str, ...] = tuple(ROUTERS)
# Short names people type (and llm-d / vllm-router spellings).
ROUTERS |= {
    "p2c": PowerOfTwoRouter,
    "prefix": PrefixAwareRouter,
    "session": SessionAffinityRouter,
    "kv": KvEventsRouter,
    "rr": lambda load: RoundRobinRouter(),
}


def create_router(name: str, load: LoadView | None = None) -> Router:
    """Build a router by its registered name, reading engine load from `load`."""
    factory = ROUTERS.get(name)
    if factory is None:
        raise ConfigurationError(
            f"unknown routing {name!r}; choose one of {', '.join(ROUTER_NAMES)}",
            param="routing",
        )
    return factory(load or NoLoad())


__all__ = [
    "PREFIX_CHARS",
    "ROUTERS",
    "ROUTER_NAMES",
    "Annotating",
    "FailoverOrder",
    "KvEventsRouter",
    "LeastLoadedRouter",
    "LoadView",
    "NoLoad",
    "PowerOfTwoRouter",
    "PrefixAwareRouter",
    "RoundRobinRouter",
    "RouteRequest",
    "Router",
    "SessionAffinityRouter",
    "create_router",
    "failover_order",
    "failover_view",
    "prefix_of",
    "prompt_prefix",
]
