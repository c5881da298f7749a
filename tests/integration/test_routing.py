"""Instance routing through the real edge and scheduler, over three simulator engines:
which engine served a request is read from each engine's own request counter."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sage.common.config.settings import SageSettings
from tests.conftest import served_by_engine


@pytest.fixture
def routing() -> str:
    """The router under test; each test parametrizes it."""
    return "round_robin"


@pytest.fixture
def settings(tmp_path: Path, routing: str) -> SageSettings:
    """Default settings with SAGE_SCHEDULER_ROUTING set to the test's router."""
    return SageSettings(
        home=tmp_path / "sage",
        request_timeout_s=30.0,
        disable_nvml=True,
        scheduler_routing=routing,
    )


async def _engines(
    control_plane: Any, sim_engine: Callable[..., str], *args: str
) -> dict[str, str]:
    urls = {f"e{i}": sim_engine(*args) for i in range(3)}
    for engine_id, url in urls.items():
        await control_plane.register(engine_id, "sim", url)
    return urls


def _chat(text: str, max_tokens: int = 4) -> dict[str, Any]:
    return {
        "model": "sim",
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": text}],
    }


@pytest.mark.parametrize("routing", ["session_affinity"])
async def test_session_affinity_keeps_a_session_on_one_engine(
    control_plane: Any, sim_engine: Callable[..., str]
) -> None:
    urls = await _engines(control_plane, sim_engine)
    homes: dict[str, set[str]] = {}
    for round_ in range(4):
        for session in ("alice", "bob", "carol", "dave", "erin"):
            before = await served_by_engine(urls)
            resp = await control_plane.client.post(
                "/v1/chat/completions",
                json=_chat(f"turn {round_}"),
                headers={"x-session-id": session},
            )
            assert resp.status_code == 200, resp.text
            after = await served_by_engine(urls)
            served = [e for e in urls if after[e] > before[e]]
            assert len(served) == 1
            homes.setdefault(session, set()).update(served)
    assert all(len(engines) == 1 for engines in homes.values()), homes
    no_key = await control_plane.client.post("/v1/chat/completions", json=_chat("hi"))
    assert no_key.status_code == 200
    too_long = await control_plane.client.post(
        "/v1/chat/completions", json=_chat("hi"), headers={"x-session-id": "s" * 257}
    )
    assert too_long.status_code == 400
    assert too_long.json()["error"]["param"] == "x-session-id"
    status = (await control_plane.client.get("/v1/management/status")).json()
    assert status["control_plane"]["policy"] == "adaptive/session_affinity"  # default policy


@pytest.mark.parametrize("routing", ["least_loaded"])
async def test_least_loaded_spreads_concurrent_slow_requests_evenly(
    control_plane: Any, sim_engine: Callable[..., str]
) -> None:
    urls = await _engines(control_plane, sim_engine, "--tpot-ms", "20")
    before = await served_by_engine(urls)

    async def send(i: int) -> None:
        resp = await control_plane.client.post(
            "/v1/chat/completions", json=_chat(f"slow {i}", max_tokens=20)
        )
        assert resp.status_code == 200, resp.text

    await asyncio.gather(*(send(i) for i in range(9)))
    after = await served_by_engine(urls)
    assert sorted(after[e] - before[e] for e in urls) == [3, 3, 3]


@pytest.mark.parametrize("routing", ["prefix_aware"])
async def test_prefix_aware_sends_a_shared_prompt_prefix_to_one_engine(
    control_plane: Any, sim_engine: Callable[..., str]
) -> None:
    urls = await _engines(control_plane, sim_engine)
    system = "You are a terse assistant who answers in one word. " * 8
    before = await served_by_engine(urls)
    for i in range(6):
        body = {
            "model": "sim",
            "max_tokens": 2,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": f"question {i}"},
            ],
        }
        resp = await control_plane.client.post("/v1/chat/completions", json=body)
        assert resp.status_code == 200, resp.text
    after = await served_by_engine(urls)
    assert sorted(after[e] - before[e] for e in urls) == [0, 0, 6]
