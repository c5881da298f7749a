"""kill -9 and restart each control-plane service in turn, as separate processes wired like
`sage llm serve`, under a steady mixed load through the edge. What the user sees: accepted
requests complete or fail cleanly (an OpenAI error, never a hang or a garbled reply), every
engine is routed again after recovery, no GPU reservation is left without its engine, and
no process outlives the stack."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import orjson
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sage.common.grpc import create_sync_channel, process_token
from sage.common.utils.processes import stop_process, wait_http
from sage.rpc.gpu_manager.v1 import gpu_manager_pb2, gpu_manager_pb2_grpc

pytestmark = pytest.mark.slow

# Start order, as the supervisor uses it.
SERVICES = ("gpu_manager", "embedding", "scheduler", "lifecycle", "edge")
PORT_ENV = {
    "gpu_manager": "SAGE_GPU_MANAGER_PORT",
    "embedding": "SAGE_EMBEDDING_SERVICE_PORT",
    "scheduler": "SAGE_SCHEDULER_PORT",
    "lifecycle": "SAGE_LIFECYCLE_PORT",
    "edge": "SAGE_GATEWAY_PORT",
}
CHAT = {"model": "sim", "messages": [{"role": "user", "content": "status?"}], "max_tokens": 6}
EMBED = {"model": "sim-embed", "input": ["one", "two"]}
# Management needs the admin key (closed by default); the clients below send it.
ADMIN = {"Authorization": "Bearer sk-faults-admin-key"}


@dataclass
class Stack:
    """The five services as child processes, and how to (re)start each."""

    home: Path
    ports: dict[str, int]
    env: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.ports['edge']}"

    def start(self, name: str) -> None:
        log = open(self.home / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        with log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", f"sage.services.{name}"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        self.wait_ready(name)

    def wait_ready(self, name: str, within_s: float = 30.0) -> None:
        proc = self.procs[name]
        if name == "edge":
            wait_http(self.gateway + "/openapi.json", proc, within_s)
            return
        deadline = time.monotonic() + within_s
        with grpc.insecure_channel(f"127.0.0.1:{self.ports[name]}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert proc.poll() is None, f"{name} exited: {self.log_tail(name)}"
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise AssertionError(f"{name} not ready: {self.log_tail(name)}")

    def kill9(self, name: str) -> None:
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def log_tail(self, name: str) -> str:
        return (self.home / f"{name}.log").read_text(errors="replace")[-2000:]

    def stop_all(self) -> None:
        for name in reversed(SERVICES):
            proc = self.procs.get(name)
            if proc is not None:
                stop_process(proc, timeout=20)


@pytest.fixture
def stack(tmp_path: Path, port_factory: Callable[[], int]) -> Iterator[Stack]:
    home = tmp_path / "sage"
    home.mkdir()
    ports = {name: port_factory() for name in SERVICES}
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGE_")}
    env.update({PORT_ENV[name]: str(port) for name, port in ports.items()})
    env.update(
        {
            "SAGE_HOME": str(home),
            "SAGE_HOST": "127.0.0.1",
            "SAGE_DISABLE_NVML": "1",
            "SAGE_LOG_LEVEL": "WARNING",
            "SAGE_INTERNAL_TOKEN": process_token(),  # the token this test's channels send
            "SAGE_ADMIN_API_KEY": ADMIN["Authorization"].removeprefix("Bearer "),
            "SAGE_REQUEST_TIMEOUT_S": "20",
            "SAGE_LIFECYCLE_RESTART_BACKOFF_S": "0.2",
            "PYTHONUNBUFFERED": "1",
        }
    )
    running = Stack(home, ports, env)
    try:
        for name in SERVICES:
            running.start(name)
        yield running
    finally:
        running.stop_all()


@dataclass
class Outcomes:
    """What each request of the background load ended as, per phase."""

    phase: str = "steady"
    seen: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    bad: list[str] = field(default_factory=list)

    def note(self, kind: str, outcome: str) -> None:
        self.seen[(self.phase, kind, outcome)] += 1


def _error_json(resp: httpx.Response) -> bool:
    try:
        error = resp.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and bool(error.get("message"))


async def _one(client: httpx.AsyncClient, kind: str, out: Outcomes) -> None:
    """One request; records ok / clean failure, and anything unclean in `out.bad`."""
    try:
        if kind == "stream":
            async with client.stream(
                "POST", "/v1/chat/completions", json={**CHAT, "stream": True}
            ) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    ok = _error_json(resp)
                    out.note(kind, f"http {resp.status_code}" if ok else "bad")
                    if not ok:
                        out.bad.append(f"{kind}: {resp.status_code} {resp.text[:200]}")
                    return
                events = [line[6:] async for line in resp.aiter_lines() if line[:6] == "data: "]
            if events[-1:] != ["[DONE]"]:
                out.bad.append(f"stream did not end with [DONE]: {events[-3:]}")
                return
            errors = [e for e in events[:-1] if "error" in orjson.loads(e)]
            out.note(kind, "error event" if errors else "ok")
            return
        path = "/v1/chat/completions" if kind == "chat" else "/v1/embeddings"
        resp = await client.post(path, json=CHAT if kind == "chat" else EMBED)
        if resp.status_code == 200:
            doc = resp.json()
            good = (
                bool(doc["choices"][0]["message"]["content"])
                if kind == "chat"
                else len(doc["data"]) == 2
            )
            out.note(kind, "ok" if good else "bad")
            if not good:
                out.bad.append(f"{kind}: malformed 200 {resp.text[:200]}")
        elif _error_json(resp):
            out.note(kind, f"http {resp.status_code}")
        else:
            out.bad.append(f"{kind}: {resp.status_code} without an OpenAI error: {resp.text[:200]}")
    except httpx.TimeoutException as exc:
        out.bad.append(f"{kind}: hung ({exc!r}) in phase {out.phase}")
    except httpx.TransportError as exc:
        # Only while the edge itself is down may the connection fail.
        out.note(kind, "connection error")
        if out.phase != "edge":
            out.bad.append(f"{kind}: {exc!r} in phase {out.phase}")


async def _load(gateway: str, out: Outcomes, stop: asyncio.Event) -> None:
    """Three closed-loop clients (chat, streamed chat, embeddings) until `stop`."""

    async def client_loop(kind: str) -> None:
        async with httpx.AsyncClient(base_url=gateway, timeout=30, trust_env=False) as client:
            while not stop.is_set():
                await _one(client, kind, out)
                await asyncio.sleep(0.05)

    await asyncio.gather(*(client_loop(kind) for kind in ("chat", "stream", "embed")))


async def _recovered(gateway: str, engine_ids: set[str], within_s: float = 30.0) -> None:
    """Every engine routed again, and chat + embeddings answered end to end."""
    deadline = time.monotonic() + within_s
    last: Any = None
    async with httpx.AsyncClient(
        base_url=gateway, timeout=10, trust_env=False, headers=ADMIN
    ) as client:
        while time.monotonic() < deadline:
            try:
                models = (await client.get("/v1/models")).json()
                ready = {m["id"]: m["ready_engines"] for m in models.get("data", [])}
                listed = (await client.get("/v1/management/engines")).json()
                running = {e["engine_id"] for e in listed["engines"] if e["status"] == "RUNNING"}
                chat = await client.post("/v1/chat/completions", json=CHAT)
                embed = await client.post("/v1/embeddings", json=EMBED)
                last = (ready, running, chat.status_code, embed.status_code)
                if (
                    ready.get("sim") == 2
                    and ready.get("sim-embed") == 1
                    and running == engine_ids
                    and chat.status_code == 200
                    and embed.status_code == 200
                ):
                    return
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                last = exc
            await asyncio.sleep(0.2)
    raise AssertionError(f"not recovered within {within_s}s: {last}")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_kill_and_restart_every_service_under_load(
    no_leaked_children: None, stack: Stack
) -> None:
    async with httpx.AsyncClient(
        base_url=stack.gateway, timeout=60, trust_env=False, headers=ADMIN
    ) as client:
        for body in (
            {"model": "sim", "backend": "sim"},
            {"model": "sim", "backend": "sim"},
            {"model": "sim-embed", "kind": "embedding", "backend": "sim"},
        ):
            resp = await client.post("/v1/management/engines", json=body)
            assert resp.status_code in (201, 202), resp.text
        listed = (await client.get("/v1/management/engines")).json()["engines"]
    pids = {e["engine_id"]: e["pid"] for e in listed}
    await _recovered(stack.gateway, set(pids))

    out = Outcomes()
    stop = asyncio.Event()
    load = asyncio.create_task(_load(stack.gateway, out, stop))
    try:
        await asyncio.sleep(0.5)
        for name in ("scheduler", "lifecycle", "gpu_manager", "embedding", "edge"):
            out.phase = name
            await asyncio.to_thread(stack.kill9, name)
            await asyncio.sleep(0.3)  # requests meet the dead service
            await asyncio.to_thread(stack.start, name)
            await _recovered(stack.gateway, set(pids))
            out.phase = f"after {name}"
            await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.wait_for(load, 60)

    print(sorted(out.seen.items()))  # the figures, for `pytest -s`
    assert not out.bad, out.bad
    # The load really ran through every phase, and was served again after each restart.
    for name in ("scheduler", "lifecycle", "gpu_manager", "embedding", "edge"):
        assert any(p == f"after {name}" and o == "ok" for p, _, o in out.seen), out.seen
    assert sum(n for (_, _, o), n in out.seen.items() if o == "ok") > 20

    async with httpx.AsyncClient(
        base_url=stack.gateway, timeout=10, trust_env=False, headers=ADMIN
    ) as client:
        listed = (await client.get("/v1/management/engines")).json()["engines"]
    # Lifecycle re-adopted its engines: the same processes, none restarted or lost.
    assert {e["engine_id"]: e["pid"] for e in listed} == pids
    with create_sync_channel(f"127.0.0.1:{stack.ports['gpu_manager']}") as channel:
        stub = gpu_manager_pb2_grpc.GpuManagerServiceStub(channel)
        reservations = stub.ListReservations(gpu_manager_pb2.ListReservationsRequest(), timeout=5)
    assert {r.engine_id for r in reservations.reservations} <= set(pids)

    await asyncio.to_thread(stack.stop_all)
    assert all(proc.poll() is not None for proc in stack.procs.values())
    # Engines started by the first lifecycle (killed) were stopped by the second one.
    leftover = [pid for pid in pids.values() if not _gone(pid)]
    assert not leftover, f"engine processes outlived the stack: {leftover}"
