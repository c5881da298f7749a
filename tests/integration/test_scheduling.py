"""Admission and queueing through the real edge and scheduler: when the engine's slots are
full, the configured policy decides who runs next."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sage.common.config.settings import SageSettings


@pytest.fixture
def settings(tmp_path: Path) -> SageSettings:
    """One request in flight per engine, the rest wait in the priority policy."""
    return SageSettings(
        home=tmp_path / "sage",
        request_timeout_s=30.0,
        disable_nvml=True,
        scheduler_policy="priority",
        scheduler_max_inflight_per_engine=1,
    )


async def test_high_priority_overtakes_queued_low_priority(
    control_plane: Any, sim_engine: Callable[..., str]
) -> None:
    await control_plane.register("slow", "sim", sim_engine("--tpot-ms", "15"))
    body = {"model": "sim", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}
    done: list[str] = []

    async def send(name: str, priority: str) -> None:
        resp = await control_plane.client.post(
            "/v1/chat/completions", json=body, headers={"x-sage-priority": priority}
        )
        assert resp.status_code == 200, resp.text
        done.append(name)

    blocker = asyncio.create_task(send("blocker", "normal"))
    await asyncio.sleep(0.05)
    lows = [asyncio.create_task(send(f"low{i}", "low")) for i in range(3)]
    await asyncio.sleep(0.05)
    high = asyncio.create_task(send("high", "high"))
    await asyncio.gather(blocker, *lows, high)
    assert done[0] == "blocker"
    assert done[1] == "high"  # overtook the three low-priority requests queued before it
    status = (await control_plane.client.get("/v1/management/status")).json()
    assert status["control_plane"]["policy"] == "priority/least_loaded"  # default routing


async def test_bad_scheduling_headers_are_400s(
    control_plane: Any, sim_engine: Callable[..., str]
) -> None:
    await control_plane.register("e", "sim", sim_engine())
    body = {"model": "sim", "messages": [{"role": "user", "content": "x"}]}
    bad_priority = await control_plane.client.post(
        "/v1/chat/completions", json=body, headers={"x-sage-priority": "urgent!!"}
    )
    assert bad_priority.status_code == 400
    assert bad_priority.json()["error"]["param"] == "priority"
    bad_slo = await control_plane.client.post(
        "/v1/chat/completions", json=body, headers={"x-sage-slo-e2e-ms": "-5"}
    )
    assert bad_slo.status_code == 400
    assert bad_slo.json()["error"]["param"] == "x-sage-slo-e2e-ms"
    started = time.monotonic()
    ok = await control_plane.client.post(
        "/v1/chat/completions", json=body, headers={"x-sage-slo-e2e-ms": "5000"}
    )
    assert ok.status_code == 200 and time.monotonic() - started < 5
