from __future__ import annotations

from sage.services.scheduler.routing import RoundRobinRouter, RouteRequest

from .helpers import engines


def test_rotates_per_model_independently() -> None:
    router = RoundRobinRouter()
    pool = engines(3)
    other = engines(2, "n")
    picks = [router.pick(RouteRequest("m"), pool).engine_id for _ in range(4)]
    assert picks == ["e0", "e1", "e2", "e0"]
    assert router.pick(RouteRequest("n"), other).engine_id == "e0"
    assert router.pick(RouteRequest("m"), pool).engine_id == "e1"
