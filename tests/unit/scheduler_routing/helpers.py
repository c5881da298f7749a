"""Engines and a settable load view shared by the routing tests."""

from __future__ import annotations

from sage.services.scheduler.registry import EngineKind, EngineRecord


def engines(n: int, model: str = "m") -> list[EngineRecord]:
    """`n` ready LLM engines e0..e{n-1} serving `model`."""
    return [
        EngineRecord(f"e{i}", model, EngineKind.LLM, f"http://127.0.0.1:{9000 + i}")
        for i in range(n)
    ]


class FixedLoad:
    """A LoadView whose values a test sets directly."""

    def __init__(self, values: dict[str, float] | None = None) -> None:
        self.values = dict(values or {})

    def load(self, engine_id: str) -> float:
        """The value set for `engine_id`, else 0."""
        return self.values.get(engine_id, 0.0)
