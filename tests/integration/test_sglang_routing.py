"""Load-aware routing over SGLang engines (the sim's sglang flavor, real processes): the
scheduler reads SGLang's gauges from /metrics and keeps requests off the busy engine."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from sage.common.config.settings import SageSettings
from sage.rpc.scheduler.v1 import scheduler_pb2

BODY = {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def settings(tmp_path: Path) -> SageSettings:
    """least_loaded routing, engines' /metrics read every 0.2 s."""
    return SageSettings(
        home=tmp_path / "sage",
        request_timeout_s=30.0,
        disable_nvml=True,
        scheduler_routing="least_loaded",
        scheduler_scrape_interval_s=0.2,
    )


async def _served(http: httpx.AsyncClient, url: str) -> float:
    """Requests the engine finished, from SGLang's own counter."""
    text = (await http.get(url + "/metrics")).text
    found = re.search(r"^sglang:num_requests_total\{[^}]*\} (\S+)$", text, re.M)
    assert found is not None, text
    return float(found.group(1))


async def _routing_load(control_plane: Any, engine_id: str) -> float:
    reply = await control_plane.scheduler.GetMetrics(
        scheduler_pb2.GetMetricsRequest(families=["sage:engine_routing_load"])
    )
    text = reply.prometheus_text.decode()
    found = re.search(rf'^sage:engine_routing_load\{{engine="{engine_id}"\}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


async def test_requests_avoid_the_sglang_engine_its_metrics_show_busy(
    control_plane: Any, sim_engine: Callable[..., str]
) -> None:
    # e0: one batch slot and a first token that takes 20 s; e1: idle and fast.
    busy = sim_engine("--flavor", "sglang", "--max-num-seqs", "1", "--ttft-ms", "20000", model="m")
    idle = sim_engine("--flavor", "sglang", model="m")
    await control_plane.register("e0", "m", busy)
    await control_plane.register("e1", "m", idle)
    async with httpx.AsyncClient(timeout=60) as http:
        # Load the scheduler did not send: clients of e0's own (1 running, 2 queued).
        direct = [
            asyncio.create_task(http.post(busy + "/v1/chat/completions", json=BODY))
            for _ in range(3)
        ]
        try:
            for _ in range(150):
                if await _routing_load(control_plane, "e0") >= 3.0:
                    break
                await asyncio.sleep(0.1)
            assert await _routing_load(control_plane, "e0") >= 3.0  # read from sglang: gauges
            before = {url: await _served(http, url) for url in (busy, idle)}
            for _ in range(4):
                resp = await control_plane.client.post("/v1/chat/completions", json=BODY)
                assert resp.status_code == 200, resp.text
            after = {url: await _served(http, url) for url in (busy, idle)}
        finally:
            for call in direct:
                call.cancel()
            await asyncio.gather(*direct, return_exceptions=True)
    assert after[idle] - before[idle] == 4
    assert after[busy] == before[busy]
