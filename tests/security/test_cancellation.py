"""Issue 16 item 7: a non-streamed request whose client disconnects is cancelled up to the
engine. Before, 300 aborted clients (max_tokens 500) left the scheduler running 300 and the
engine 256 for over 15 s; streams were already cancelled. A real stack: the edge and the
scheduler in this loop, the simulator engine as a child process."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

from sage.rpc.scheduler.v1 import scheduler_pb2

from .conftest import TENANT_KEY, tenant

ABORTED = 40
# The engine generates 500 tokens at 100 ms each: a request left running lasts ~50 s.
TPOT_MS = "100"
MAX_TOKENS = 500
# How soon after the clients leave the engine must be idle (generous for a loaded host).
BOUND_S = 5.0


async def _engine_running(client: httpx.AsyncClient, base_url: str) -> float:
    """The sim's `vllm:num_requests_running`, as vLLM names it."""
    text = (await client.get(f"{base_url}/metrics")).text
    for family in text_string_to_metric_families(text):
        if family.name == "vllm:num_requests_running":
            return sum(sample.value for sample in family.samples)
    raise AssertionError("the engine exports no vllm:num_requests_running")


async def _scheduler_in_flight(plane: Any) -> int:
    status = await plane.scheduler.GetStatus(scheduler_pb2.GetStatusRequest())
    return int(status.in_flight)


async def _eventually(check: Any, timeout_s: float, what: str) -> float:
    """Seconds until `await check()` is true; fails after `timeout_s`."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s:g} s")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def test_aborted_non_streamed_clients_cancel_the_engine_work(
    control_plane: Any, sim_engine: Any
) -> None:
    """40 clients send a non-streamed chat (max_tokens 500) and drop their connections once
    the engine runs them all: within 5 s the engine runs none of them and the scheduler has
    nothing in flight, instead of ~50 s of work for nobody. The edge still serves after."""
    engine_url = sim_engine("--tpot-ms", TPOT_MS, model="sim")
    await control_plane.register("sim-1", "sim", engine_url)
    port = control_plane.client.base_url.port
    body = orjson.dumps(
        {
            "model": "sim",
            "messages": [{"role": "user", "content": "tell me a long story"}],
            "max_tokens": MAX_TOKENS,
        }
    )
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {TENANT_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    async with httpx.AsyncClient(timeout=10, trust_env=False) as probe:
        clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(ABORTED)]
        for _, writer in clients:
            writer.write(request)

        async def all_running() -> bool:
            return await _engine_running(probe, engine_url) >= ABORTED

        await _eventually(all_running, 30, "the engine never ran every request")
        for _, writer in clients:
            writer.close()

        async def engine_idle() -> bool:
            return await _engine_running(probe, engine_url) == 0

        async def scheduler_idle() -> bool:
            return await _scheduler_in_flight(control_plane) == 0

        await _eventually(engine_idle, BOUND_S, "the engine kept running abandoned requests")
        await _eventually(scheduler_idle, 1.0, "the scheduler kept abandoned requests")
    reply = await control_plane.client.post(
        "/v1/chat/completions",
        json={"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        headers=tenant(),
    )
    assert reply.status_code == 200, reply.text


async def test_a_client_that_stays_gets_its_reply(control_plane: Any, sim_engine: Any) -> None:
    """The disconnect watch does not cut a waiting client short: a slow non-streamed reply
    (20 tokens at 100 ms) arrives whole."""
    engine_url = sim_engine("--tpot-ms", TPOT_MS, model="sim")
    await control_plane.register("sim-1", "sim", engine_url)
    reply = await control_plane.client.post(
        "/v1/chat/completions",
        json={"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20},
        headers=tenant(),
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 20
