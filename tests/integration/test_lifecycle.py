"""Lifecycle with real engine processes, driven through the edge's management API."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psutil
import pytest

from sage.rpc.scheduler.v1 import scheduler_pb2

CHAT = {"messages": [{"role": "user", "content": "写一份日报"}], "max_tokens": 4}


async def start(plane: Any, **body: Any) -> dict[str, Any]:
    resp = await plane.client.post("/v1/management/engines", json=body)
    assert resp.status_code in (201, 202), resp.text
    engine: dict[str, Any] = resp.json()
    return engine


async def routed(plane: Any) -> list[str]:
    reply = await plane.scheduler.ListEngines(scheduler_pb2.ListEnginesRequest())
    return [e.engine_id for e in reply.engines]


async def test_start_use_stop_prune_a_sim_engine(full_plane: Any) -> None:
    engine = await start(
        full_plane, model_id="sim", backend="sim", engine_label="demo", metadata={"team": "a"}
    )
    assert engine["status"] == "RUNNING" and engine["pid"] and engine["port"]
    # A process group of its own, which stop and crash clean-up signal whole (vLLM's
    # EngineCore outlives its API server otherwise).
    assert os.getpgid(engine["pid"]) == engine["pid"]
    assert engine["engine_label"] == "demo" and engine["metadata"] == {"team": "a"}
    assert await routed(full_plane) == [engine["engine_id"]]
    chat = await full_plane.client.post("/v1/chat/completions", json={"model": "sim", **CHAT})
    assert chat.status_code == 200, chat.text

    listed = (await full_plane.client.get("/v1/management/engines")).json()
    assert listed["count"] == 1 and listed["engines"][0]["engine_id"] == engine["engine_id"]
    logs = (
        await full_plane.client.get(f"/v1/management/engines/{engine['engine_id']}/logs?lines=20")
    ).json()
    assert any("starting" in line for line in logs["lines"])

    stopped = (
        await full_plane.client.delete(f"/v1/management/engines/{engine['engine_id']}?drain=true")
    ).json()
    assert stopped["status"] == "STOPPED"
    assert (
        not psutil.pid_exists(engine["pid"])
        or psutil.Process(engine["pid"]).status() == psutil.STATUS_ZOMBIE
    )
    assert await routed(full_plane) == []
    pruned = (await full_plane.client.post("/v1/management/engines/prune", json={})).json()
    assert pruned == {"pruned": [engine["engine_id"]], "count": 1}


async def wait_engine(
    plane: Any, engine_id: str, ok: Callable[[dict[str, Any]], bool], within_s: float = 30
) -> dict[str, Any]:
    engine: dict[str, Any] = await plane.wait_engine(engine_id, ok, within_s)
    return engine


async def test_killed_engine_is_restarted_then_failed_after_repeated_crashes(
    full_plane: Any,
) -> None:
    engine = await start(full_plane, model_id="sim", backend="sim")
    engine_id = engine["engine_id"]
    os.kill(engine["pid"], signal.SIGKILL)
    again = await wait_engine(
        full_plane, engine_id, lambda e: e["status"] == "RUNNING" and e["restart_count"] == 1
    )
    assert again["pid"] != engine["pid"]
    chat = await full_plane.client.post("/v1/chat/completions", json={"model": "sim", **CHAT})
    assert chat.status_code == 200
    assert engine_id in await routed(full_plane)

    # max_crashes is 2 in this fixture: the third crash in the window marks it failed.
    os.kill(again["pid"], signal.SIGKILL)
    again = await wait_engine(
        full_plane, engine_id, lambda e: e["status"] == "RUNNING" and e["restart_count"] == 2
    )
    os.kill(again["pid"], signal.SIGKILL)
    failed = await wait_engine(full_plane, engine_id, lambda e: e["status"] == "FAILED")
    assert "crashed 3 times" in failed["error"]
    assert engine_id not in await routed(full_plane)


async def test_restarted_lifecycle_readopts_live_engines_and_cleans_dead_ones(
    full_plane: Any,
) -> None:
    alive = await start(full_plane, model_id="sim", backend="sim")
    doomed = await start(full_plane, model_id="sim-b", backend="sim")
    await full_plane.restart_lifecycle()  # engines keep running meanwhile
    os.kill(doomed["pid"], signal.SIGKILL)  # dies while nobody watches
    await full_plane.restart_lifecycle()
    readopted = (await full_plane.client.get(f"/v1/management/engines/{alive['engine_id']}")).json()
    assert readopted["status"] == "RUNNING" and readopted["pid"] == alive["pid"]
    cleaned = (await full_plane.client.get(f"/v1/management/engines/{doomed['engine_id']}")).json()
    assert cleaned["status"] == "FAILED"
    assert await routed(full_plane) == [alive["engine_id"]]
    chat = await full_plane.client.post("/v1/chat/completions", json={"model": "sim", **CHAT})
    assert chat.status_code == 200
    # and the re-adopted engine can still be stopped (it is not a child of the new lifecycle)
    stopped = (
        await full_plane.client.delete(f"/v1/management/engines/{alive['engine_id']}")
    ).json()
    assert stopped["status"] == "STOPPED"
    assert (
        not psutil.pid_exists(alive["pid"])
        or psutil.Process(alive["pid"]).status() == psutil.STATUS_ZOMBIE
    )


async def test_scheduler_restart_is_healed_by_resync(full_plane: Any) -> None:
    engine = await start(full_plane, model_id="sim", backend="sim")
    await full_plane.scheduler.DeregisterEngine(
        scheduler_pb2.DeregisterEngineRequest(engine_id=engine["engine_id"])
    )
    assert await routed(full_plane) == []  # what a restarted scheduler would know
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not await routed(full_plane):  # noqa: ASYNC110
        await asyncio.sleep(0.2)
    assert await routed(full_plane) == [engine["engine_id"]]


async def test_minilm_embedding_engine_through_the_api(full_plane: Any) -> None:
    engine = await start(
        full_plane,
        model_id="sentence-transformers/all-MiniLM-L6-v2",
        engine_kind="embedding",
        startup_timeout_s=120,
    )
    assert engine["backend"] == "embedding" and engine["status"] == "RUNNING"
    resp = await full_plane.client.post(
        "/v1/embeddings",
        json={"model": "sentence-transformers/all-MiniLM-L6-v2", "input": ["Hello", "World"]},
    )
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["data"][0]["embedding"]) == 384
    status = (await full_plane.client.get("/v1/management/status")).json()
    assert status["embedding_available"] and not status["llm_available"]


def _busy_port() -> socket.socket:
    """A listening socket on a port of the engine port range (8900-8999 by default)."""
    for port in range(8900, 9000):
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            sock.close()
            continue
        sock.listen()
        return sock
    raise AssertionError("every port of the engine range is taken")


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"engine_kind": "llm"}, 400, "model_id"),
        ({"model_id": "sim", "engine_kind": "vision"}, 400, "engine_kind"),
        ({"model_id": "sim", "backend": "warp-drive"}, 400, "backend"),
        ({"model_id": "sim; rm -rf /", "backend": "sim"}, 400, "model_id"),
        ({"model_id": "$(reboot)"}, 400, "model_id"),
        ({"model_id": "/no/such/model/dir"}, 400, "model_id"),
        ({"model_id": "sim", "tensor_parallel_size": 0}, 400, "tensor_parallel_size"),
        ({"model_id": "sim", "tensor_parallel_size": "two"}, 400, "tensor_parallel_size"),
        ({"model_id": "x", "engine_kind": "embedding", "use_gpu": True}, 409, "use_gpu"),
        ({"model_id": "sim", "backend": "sim", "engine_id": "../etc"}, 400, "engine_id"),
        ({"model_id": "sim", "tensor_paralel_size": 2}, 400, "tensor_paralel_size"),
    ],
)
async def test_bad_start_requests_are_4xx_and_leave_nothing_behind(
    full_plane: Any, body: dict[str, Any], status: int, param: str
) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    resp = await full_plane.client.post("/v1/management/engines", json=body)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["param"] == param
    listed = (await full_plane.client.get("/v1/management/engines")).json()
    assert listed["count"] == 0
    after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert after <= before


async def test_port_in_use_and_unknown_ids(full_plane: Any) -> None:
    with _busy_port() as busy:
        resp = await full_plane.client.post(
            "/v1/management/engines",
            json={"model_id": "sim", "backend": "sim", "port": busy.getsockname()[1]},
        )
    assert resp.status_code == 409 and resp.json()["error"]["param"] == "port"
    missing = await full_plane.client.delete("/v1/management/engines/nope")
    assert missing.status_code == 404
    traversal = await full_plane.client.get("/v1/management/engines/..%2f..%2fetc/logs")
    assert traversal.status_code in (400, 404)


async def test_a_stranger_on_the_engines_port_is_not_taken_for_the_engine(
    full_plane: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another stack's engine grabbing the port between the check and the bind: the health
    probe answers 200, but from someone else; the start must fail, nothing gets routed."""
    from sage.common.config.ports import SagePorts

    with _busy_port() as reserved:
        port = reserved.getsockname()[1]
    stranger = ThreadingHTTPServer(("127.0.0.1", port), _Health)
    threading.Thread(target=stranger.serve_forever, daemon=True).start()
    monkeypatch.setattr(SagePorts, "is_available", staticmethod(lambda *a, **k: True))
    try:
        resp = await full_plane.client.post(
            "/v1/management/engines",
            json={"model_id": "sim", "backend": "sim", "port": port, "startup_timeout_s": 30},
        )
    finally:
        stranger.shutdown()
        stranger.server_close()
    assert resp.status_code >= 400, resp.text
    assert "exited" in resp.json()["error"]["message"]
    assert await routed(full_plane) == []


async def test_a_port_taken_before_the_engine_binds_it_is_replaced_by_another(
    full_plane: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process binds the port lifecycle chose between its check and the engine's
    bind (seen in CI: an engine 'exited with code 3 while starting'): the engine is started
    again on another free port instead of failing the user's start."""
    from sage.services.lifecycle import manager as manager_module
    from sage.services.lifecycle.policy import LaunchPolicy

    real_free = manager_module._port_free
    real_candidates = LaunchPolicy.candidate_ports
    with _busy_port() as stranger:
        taken = stranger.getsockname()[1]

        def candidates(self: LaunchPolicy, rng: Any = None) -> Any:
            yield taken  # the race: this port looked free when it was checked
            yield from (p for p in real_candidates(self, rng) if p != taken)

        monkeypatch.setattr(LaunchPolicy, "candidate_ports", candidates)
        monkeypatch.setattr(
            manager_module,
            "_port_free",
            lambda port, host, *, bindable: (
                port == taken or real_free(port, host, bindable=bindable)
            ),
        )
        engine = await start(full_plane, model_id="sim", backend="sim", startup_timeout_s=30)
    assert engine["status"] == "RUNNING" and engine["port"] != taken, engine
    assert engine["base_url"].endswith(f":{engine['port']}")
    logs = await full_plane.client.get(f"/v1/management/engines/{engine['engine_id']}/logs")
    assert "address already in use" in "\n".join(logs.json()["lines"]).lower()
    chat = await full_plane.client.post(
        "/v1/chat/completions",
        json={"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )
    assert chat.status_code == 200, chat.text


async def test_engine_that_fails_to_start_releases_everything(full_plane: Any) -> None:
    resp = await full_plane.client.post(
        "/v1/management/engines",
        json={
            "model_id": "sim",
            "backend": "sim",
            "extra_args": ["--max-num-seqs", "many"],  # allowed flag, value the sim refuses
            "startup_timeout_s": 30,
        },
    )
    assert resp.status_code >= 400
    assert "exited" in resp.json()["error"]["message"]
    listed = (await full_plane.client.get("/v1/management/engines")).json()
    assert [e["status"] for e in listed["engines"]] == ["FAILED"]
    assert await routed(full_plane) == []


async def test_backends_and_gpu_views(full_plane: Any) -> None:
    backends = (await full_plane.client.get("/v1/management/backends")).json()["backends"]
    by_name = {b["name"]: b for b in backends}
    assert {"vllm", "tei", "infinity", "embedding", "transformers", "sim", "external"} <= set(
        by_name
    )
    assert by_name["sim"]["available"] is True
    gpu = (await full_plane.client.get("/v1/management/gpu")).json()
    assert "gpus" in gpu and "nvml_available" in gpu


@pytest.fixture
def two_simulated_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """gpu_manager reports two 80 GiB GPUs (its NVML stand-in) on this CPU host."""
    monkeypatch.setenv("SAGE_GPU_SIMULATE", "2x80")


async def reservations(plane: Any) -> list[str]:
    gpu = (await plane.client.get("/v1/management/gpu")).json()
    return sorted({e for g in gpu["gpus"] for e in g["engine_ids"]})


async def test_gpu_reservation_is_released_when_the_engine_fails(
    two_simulated_gpus: None, full_plane: Any
) -> None:
    gpu = (await full_plane.client.get("/v1/management/gpu")).json()
    assert len(gpu["gpus"]) == 2
    too_wide = await full_plane.client.post(
        "/v1/management/engines",
        json={
            "model_id": "sentence-transformers/all-MiniLM-L6-v2",
            "engine_kind": "embedding",
            "use_gpu": True,
            "tensor_parallel_size": 4,
        },
    )
    assert too_wide.status_code in (400, 409)
    assert too_wide.json()["error"]["param"] == "tensor_parallel_size"
    # The GPUs are simulated, so the engine's CUDA start fails: its reservation must go too.
    resp = await full_plane.client.post(
        "/v1/management/engines",
        json={
            "model_id": "sentence-transformers/all-MiniLM-L6-v2",
            "engine_kind": "embedding",
            "use_gpu": True,
            "required_memory_gb": 4,
            "startup_timeout_s": 120,
        },
    )
    assert resp.status_code >= 400
    listed = (await full_plane.client.get("/v1/management/engines")).json()
    assert [e["status"] for e in listed["engines"]] == ["FAILED"]
    assert await reservations(full_plane) == []
