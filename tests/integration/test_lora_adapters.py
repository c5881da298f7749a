"""LoRA adapters (issue 19, item 2) on real sim engines that lifecycle starts with
`enable_lora`: the management routes, /v1/models, routing a request naming an adapter to the
engine that has it, loading it on demand, and reloading it after a crash restart."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from sage.common.security import engine_api_key

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
BASE = "sim-lora"


def write_adapter(home: Path, name: str, rank: int = 8) -> str:
    """An adapter folder under $SAGE_HOME/models (an allowed root): the sim reads only the
    rank from adapter_config.json, as vLLM checks it against --max-lora-rank."""
    folder = home / "models" / name
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": rank, "target_modules": ["q_proj", "v_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return str(folder)


async def start_lora_engines(plane: Any, count: int, **fields: Any) -> list[dict[str, Any]]:
    """`count` sim engines of BASE with LoRA enabled, started together."""

    async def one() -> dict[str, Any]:
        body = {"model_id": BASE, "backend": "sim", "enable_lora": True, **fields}
        resp = await plane.client.post("/v1/management/engines", json=body)
        assert resp.status_code == 201, resp.text
        engine: dict[str, Any] = resp.json()
        assert engine["lora_enabled"] and engine["adapters"] == []
        return engine

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def served(engines: list[dict[str, Any]], token: str) -> list[float]:
    """Requests each engine finished, from its own vllm:request_success_total (the key
    lifecycle gave it guards its /metrics too)."""
    counts = []
    async with httpx.AsyncClient(timeout=10) as http:
        for engine in engines:
            key = engine_api_key(token, engine["engine_id"])
            text = (
                await http.get(
                    engine["base_url"] + "/metrics", headers={"Authorization": f"Bearer {key}"}
                )
            ).text
            counts.append(
                sum(
                    float(line.rsplit(" ", 1)[1])
                    for line in text.splitlines()
                    if line.startswith("vllm:request_success_total")
                )
            )
    return counts


async def models(plane: Any) -> dict[str, dict[str, Any]]:
    listed = (await plane.client.get("/v1/models")).json()["data"]
    return {m["id"]: m for m in listed}


async def load(plane: Any, engine_id: str, name: str, path: str) -> Any:
    """POST /v1/management/engines/{engine_id}/adapters."""
    return await plane.client.post(
        f"/v1/management/engines/{engine_id}/adapters", json={"name": name, "path": path}
    )


async def chat(plane: Any, model: str) -> Any:
    return await plane.client.post("/v1/chat/completions", json={"model": model, **CHAT})


async def test_load_route_list_and_unload_an_adapter(full_plane: Any, internal_token: str) -> None:
    first, second = await start_lora_engines(full_plane, 2)
    path = write_adapter(full_plane.settings.home, "sql-lora")
    loaded = await load(full_plane, first["engine_id"], "sql-lora", path)
    assert loaded.status_code == 201, loaded.text
    assert loaded.json()["adapters"] == [{"name": "sql-lora", "path": path}]
    listed = await full_plane.client.get(f"/v1/management/engines/{first['engine_id']}/adapters")
    assert listed.json()["adapters"] == [{"name": "sql-lora", "path": path}]

    # /v1/models lists the adapter with its base model, as vLLM does.
    entry = (await models(full_plane))["sql-lora"]
    assert entry["parent"] == BASE and entry["ready_engines"] == 1

    # Every request naming the adapter goes to the engine that has it (the other engine
    # would answer 404: the sim checks the name), and the body reaches it unrenamed.
    before = await served([first, second], internal_token)
    for _ in range(6):
        reply = await chat(full_plane, "sql-lora")
        assert reply.status_code == 200, reply.text
        assert reply.json()["model"] == "sql-lora"
    after = await served([first, second], internal_token)
    assert [a - b for a, b in zip(after, before, strict=True)] == [6, 0]
    assert (await chat(full_plane, BASE)).status_code == 200  # the base model still routes

    # Loading it again (same name and path) is no error; the name from another path is.
    again = await load(full_plane, first["engine_id"], "sql-lora", path)
    assert again.status_code == 201, again.text
    clash = await load(
        full_plane, first["engine_id"], "sql-lora", write_adapter(full_plane.settings.home, "other")
    )
    assert clash.status_code == 409, clash.text

    unloaded = await full_plane.client.delete(
        f"/v1/management/engines/{first['engine_id']}/adapters/sql-lora"
    )
    assert unloaded.status_code == 200, unloaded.text
    assert unloaded.json()["adapters"] == []
    assert "sql-lora" not in await models(full_plane)
    gone = await chat(full_plane, "sql-lora")
    assert gone.status_code == 404
    assert gone.json()["error"]["code"] == "model_not_found"
    twice = await full_plane.client.delete(
        f"/v1/management/engines/{first['engine_id']}/adapters/sql-lora"
    )
    assert twice.status_code == 404
    assert twice.json()["error"]["code"] == "adapter_not_found"


async def test_bad_loads_get_clear_errors(full_plane: Any) -> None:
    (engine,) = await start_lora_engines(full_plane, 1, max_lora_rank=8)
    plain = await full_plane.client.post(
        "/v1/management/engines", json={"model_id": "sim-plain", "backend": "sim"}
    )
    assert plain.status_code == 201, plain.text
    home = full_plane.settings.home
    cases = [
        # an engine started without LoRA
        (plain.json()["engine_id"], {"name": "a", "path": write_adapter(home, "a")}, 400),
        # a folder with no adapter in it
        (engine["engine_id"], {"name": "b", "path": str(home / "models")}, 400),
        # a rank above the engine's --max-lora-rank
        (engine["engine_id"], {"name": "c", "path": write_adapter(home, "c", rank=64)}, 400),
        # a path outside the allowed model roots
        (engine["engine_id"], {"name": "d", "path": "/etc"}, 400),
        # the engine's own model name
        (engine["engine_id"], {"name": BASE, "path": write_adapter(home, "e")}, 409),
        # a body with a field missing
        (engine["engine_id"], {"name": "f"}, 400),
        # no such engine
        ("no-such-engine", {"name": "g", "path": write_adapter(home, "g")}, 404),
    ]
    for engine_id, body, status in cases:
        resp = await full_plane.client.post(
            f"/v1/management/engines/{engine_id}/adapters", json=body
        )
        assert resp.status_code == status, (body, resp.text)
        assert resp.json()["error"]["message"], resp.text
    assert not {"a", "b", "c", "d", "f", "g"} & set(await models(full_plane))

    unknown = await chat(full_plane, "no-such-adapter")
    assert unknown.status_code == 404
    error = unknown.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "model_not_found"
    assert "no-such-adapter" in error["message"]


async def test_adapter_is_loaded_on_demand_after_its_engine_stops(full_plane: Any) -> None:
    first, second = await start_lora_engines(full_plane, 2)
    path = write_adapter(full_plane.settings.home, "chat-lora")
    loaded = await load(full_plane, first["engine_id"], "chat-lora", path)
    assert loaded.status_code == 201, loaded.text
    stopped = await full_plane.client.delete(f"/v1/management/engines/{first['engine_id']}")
    assert stopped.status_code == 200, stopped.text
    # Known to the stack, loaded nowhere: listed with no ready engine.
    assert (await models(full_plane))["chat-lora"]["ready_engines"] == 0

    # Concurrent requests wait for one load on the remaining engine of the base model.
    replies = await asyncio.gather(*(chat(full_plane, "chat-lora") for _ in range(4)))
    assert [r.status_code for r in replies] == [200] * 4, [r.text for r in replies]
    engine = (await full_plane.client.get(f"/v1/management/engines/{second['engine_id']}")).json()
    assert engine["adapters"] == [{"name": "chat-lora", "path": path}]
    assert (await models(full_plane))["chat-lora"]["ready_engines"] == 1


async def test_on_demand_load_without_a_lora_engine_says_why(full_plane: Any) -> None:
    (lora,) = await start_lora_engines(full_plane, 1)
    path = write_adapter(full_plane.settings.home, "tone-lora")
    loaded = await load(full_plane, lora["engine_id"], "tone-lora", path)
    assert loaded.status_code == 201, loaded.text
    plain = await full_plane.client.post(
        "/v1/management/engines", json={"model_id": BASE, "backend": "sim"}
    )
    assert plain.status_code == 201, plain.text
    await full_plane.client.delete(f"/v1/management/engines/{lora['engine_id']}")

    reply = await chat(full_plane, "tone-lora")
    assert reply.status_code == 503, reply.text
    message = reply.json()["error"]["message"]
    assert "tone-lora" in message and "LoRA enabled" in message


@pytest.mark.timeout(120)
async def test_adapters_are_reloaded_after_a_crash_restart(full_plane: Any) -> None:
    (engine,) = await start_lora_engines(full_plane, 1)
    engine_id = engine["engine_id"]
    path = write_adapter(full_plane.settings.home, "kept-lora")
    loaded = await load(full_plane, engine_id, "kept-lora", path)
    assert loaded.status_code == 201, loaded.text

    os.kill(engine["pid"], signal.SIGKILL)
    restarted = await full_plane.wait_engine(
        engine_id, lambda e: e["status"] == "RUNNING" and e["restart_count"] == 1
    )
    assert restarted["adapters"] == [{"name": "kept-lora", "path": path}]
    # The new process has it loaded: the sim would answer 404 for an unknown name.
    reply = await chat(full_plane, "kept-lora")
    assert reply.status_code == 200, reply.text
