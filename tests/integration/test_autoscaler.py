"""The scheduler's autoscaler against real lifecycle and sim engines: a sustained queue
starts a second replica through lifecycle, and idleness drains it again."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from sage.common.config.settings import SageSettings

CHAT = {"model": "sim", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}


@pytest.fixture
def settings(tmp_path: Path) -> SageSettings:
    """One request in flight per engine so requests queue in the scheduler; fast scaling."""
    return SageSettings(
        home=tmp_path / "sage",
        request_timeout_s=30.0,
        disable_nvml=True,
        scheduler_max_inflight_per_engine=1,
        autoscale="sim:1:2",
        autoscale_interval_s=0.1,
        autoscale_queue_threshold=1,
        autoscale_up_after_s=0.3,
        autoscale_idle_s=1.0,
        autoscale_cooldown_s=1.0,
    )


async def engine_ids(plane: Any) -> list[str]:
    resp = await plane.client.get("/v1/management/engines")
    assert resp.status_code == 200, resp.text
    return [
        e["engine_id"] for e in resp.json()["engines"] if e["status"] in ("STARTING", "RUNNING")
    ]


async def test_queue_adds_a_replica_and_idleness_removes_it(full_plane: Any) -> None:
    resp = await full_plane.client.post(
        "/v1/management/engines",
        json={"model_id": "sim", "backend": "sim", "extra_args": ["--tpot-ms", "20"]},
    )
    assert resp.status_code in (201, 202), resp.text
    stop = asyncio.Event()

    async def keep_sending() -> None:
        while not stop.is_set():
            reply = await full_plane.client.post("/v1/chat/completions", json=CHAT)
            assert reply.status_code == 200, reply.text

    senders = [asyncio.create_task(keep_sending()) for _ in range(6)]
    try:
        deadline = time.monotonic() + 15
        while len(await engine_ids(full_plane)) < 2:
            assert time.monotonic() < deadline, "no second replica was started"
            await asyncio.sleep(0.1)
        # The replica is a copy of the first engine's whole spec, extra args included.
        listed = (await full_plane.client.get("/v1/management/engines")).json()["engines"]
        pids = [e["pid"] for e in listed if e.get("pid")]
        assert len(pids) == 2
        for pid in pids:
            cmdline = psutil.Process(pid).cmdline()
            assert cmdline[cmdline.index("--tpot-ms") + 1] == "20", cmdline
    finally:
        stop.set()
        await asyncio.gather(*senders)

    deadline = time.monotonic() + 15
    while len(ids := await engine_ids(full_plane)) > 1:
        assert time.monotonic() < deadline, f"idle replica not removed: {ids}"
        await asyncio.sleep(0.1)
    assert len(ids) == 1  # never below min
    chat = await full_plane.client.post("/v1/chat/completions", json=CHAT)
    assert chat.status_code == 200, chat.text
