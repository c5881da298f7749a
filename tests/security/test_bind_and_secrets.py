"""Every service as a real child process with its defaults: all of them (and the engines
lifecycle starts) listen on loopback only, and no configured secret — tenant keys, the
admin key, provider keys — shows up in their logs, in engine logs or in any response."""

from __future__ import annotations

import ipaddress
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from sage.common.utils.processes import free_port, stop_process, wait_http

from .conftest import (
    ADMIN_KEY,
    OTHER_TENANT_KEY,
    PROVIDER_KEY,
    TENANT_KEY,
    admin,
    assert_no_secret,
    tenant,
)

SERVICES = ("gpu_manager", "embedding", "scheduler", "lifecycle", "edge")


@dataclass
class ChildPlane:
    """The five service processes, their stderr files, the edge URL and SAGE_HOME."""

    procs: dict[str, subprocess.Popen[bytes]]
    logs: dict[str, Path]
    base_url: str
    home: Path
    responses: list[str] = field(default_factory=list)


def _listening(pid: int) -> list[str]:
    """IP addresses a process listens on (TCP); IPv4-mapped IPv6 (gRPC) shown as IPv4."""
    found = []
    for conn in psutil.Process(pid).net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN:
            address = ipaddress.ip_address(conn.laddr.ip.split("%")[0])
            mapped = getattr(address, "ipv4_mapped", None)
            found.append(str(mapped or address))
    return found


def _wait_listening(proc: subprocess.Popen[bytes], name: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{name} exited with {proc.returncode}"
        if _listening(proc.pid):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{name} does not listen after {timeout:g}s")


@pytest.fixture(scope="module")
def child_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChildPlane]:
    """`python -m sage.services.<name>` for each service, SAGE_HOST unset, DEBUG logs."""
    root = tmp_path_factory.mktemp("children")
    home = root / "sage"
    gateway = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGE_", "OPENAI_"))}
    env.update(
        {
            "SAGE_HOME": str(home),
            "SAGE_GATEWAY_PORT": str(gateway),
            "SAGE_SCHEDULER_PORT": str(free_port()),
            "SAGE_LIFECYCLE_PORT": str(free_port()),
            "SAGE_GPU_MANAGER_PORT": str(free_port()),
            "SAGE_EMBEDDING_SERVICE_PORT": str(free_port()),
            "SAGE_DISABLE_NVML": "1",
            # engines get a port of their own: the default range is shared with other runs
            "SAGE_ENGINE_PORTS": str(free_port()),
            "SAGE_LOG_LEVEL": "DEBUG",
            "SAGE_API_KEYS": f"{TENANT_KEY}:tenant-a,{OTHER_TENANT_KEY}:tenant-b",
            "SAGE_ADMIN_API_KEY": ADMIN_KEY,
            "SAGE_METRICS_REQUIRE_AUTH": "true",
            "SAGE_CHAT_API_KEY": PROVIDER_KEY,
            "SAGE_EMBEDDING_API_KEY": PROVIDER_KEY,
            "OPENAI_API_KEY": PROVIDER_KEY,
            "PYTHONUNBUFFERED": "1",
        }
    )
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs: dict[str, Path] = {}
    try:
        for name in SERVICES:
            logs[name] = root / f"{name}.stderr"
            with open(logs[name], "wb") as sink:
                procs[name] = subprocess.Popen(
                    [sys.executable, "-m", f"sage.services.{name}"],
                    env=env,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                )
        for name, proc in procs.items():
            _wait_listening(proc, name)
        wait_http(f"http://127.0.0.1:{gateway}/health", procs["edge"], timeout=60)
        yield ChildPlane(procs, logs, f"http://127.0.0.1:{gateway}", home)
    finally:
        family = [p for proc in procs.values() for p in _family(proc.pid)]
        for name in reversed(SERVICES):
            if name in procs:
                stop_process(procs[name])
        _gone, alive = psutil.wait_procs(family, timeout=15)
        for leftover in alive:
            leftover.kill()
        assert not alive, f"left running: {[p.pid for p in alive]}"


def _family(pid: int) -> list[psutil.Process]:
    try:
        parent = psutil.Process(pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _start_sim(plane: ChildPlane) -> dict[str, Any]:
    reply = httpx.post(
        f"{plane.base_url}/v1/management/engines",
        json={"model_id": "sim-secure", "backend": "sim", "startup_timeout_s": 60},
        headers=admin(),
        timeout=90,
        trust_env=False,
    )
    assert reply.status_code == 201, reply.text
    engine: dict[str, Any] = reply.json()
    return engine


def test_services_and_engines_bind_loopback_by_default(child_plane: ChildPlane) -> None:
    """With no SAGE_HOST, every service and a lifecycle-started engine listen on 127.0.0.1
    only."""
    for name, proc in child_plane.procs.items():
        addresses = _listening(proc.pid)
        assert addresses and set(addresses) == {"127.0.0.1"}, (name, addresses)
    engine = _start_sim(child_plane)
    assert engine["host"] == "127.0.0.1"
    addresses = _listening(engine["pid"])
    assert addresses and set(addresses) == {"127.0.0.1"}, (addresses, engine)


def test_secrets_never_logged_or_returned(child_plane: ChildPlane) -> None:
    """Requests with right, wrong and misplaced keys; then no secret in any service's
    stderr (DEBUG level), the engines' log files, or any response body."""
    base = child_plane.base_url
    with httpx.Client(base_url=base, timeout=60, trust_env=False) as client:
        status = client.get("/v1/management/engines", headers=admin()).json()
        if not any(e["model_id"] == "sim-secure" for e in status["engines"]):
            _start_sim(child_plane)
        # Registration with the scheduler may trail the 201 under load (lifecycle resyncs).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            models = client.get("/v1/models", headers=tenant()).json()["data"]
            if any(m["id"] == "sim-secure" and m["ready_engines"] for m in models):
                break
            time.sleep(0.2)
        chat = {"model": "sim-secure", "messages": [{"role": "user", "content": "hi"}]}
        sent = [
            client.post("/v1/chat/completions", json=chat, headers=tenant()),
            client.post("/v1/chat/completions", json={**chat, "stream": True}, headers=tenant()),
            client.post("/v1/chat/completions", json=chat),
            client.post(
                "/v1/chat/completions",
                json=chat,
                headers={"Authorization": f"Bearer {TENANT_KEY}x"},  # near miss
            ),
            client.post("/v1/chat/completions", json=chat, headers=admin()),
            client.post("/v1/embeddings", json={"model": "nope", "input": "x"}, headers=tenant()),
            client.get("/v1/models", headers=tenant()),
            client.get("/v1/management/status", headers=admin()),
            client.get("/v1/management/status", headers=tenant()),
            client.get("/v1/management/engines", headers=admin()),
            client.get("/metrics", headers=tenant()),
            client.get("/metrics"),
            client.get("/health"),
        ]
        engines = client.get("/v1/management/engines", headers=admin()).json()["engines"]
        for engine in engines:
            sent.append(
                client.get(
                    f"/v1/management/engines/{engine['engine_id']}/logs",
                    headers=admin(),
                )
            )
    codes = [(r.request.url.path, r.status_code) for r in sent]
    assert sent[0].status_code == 200 and sent[2].status_code == 401, (codes, sent[0].text)
    assert sent[3].status_code == 401 and sent[4].status_code == 401, codes
    for reply in sent:
        assert_no_secret(reply.text, f"{reply.request.method} {reply.request.url.path}")
        assert_no_secret(str(reply.headers), "response headers")
    time.sleep(0.5)  # let the services write their last log lines (unbuffered anyway)
    for name, path in child_plane.logs.items():
        text = path.read_text(errors="replace")
        assert text, f"{name} logged nothing; the check would be empty"
        assert_no_secret(text, f"{name} stderr")
    engine_logs = list((child_plane.home / "llm" / "logs").glob("*.log"))
    assert engine_logs
    for path in engine_logs:
        assert_no_secret(path.read_text(errors="replace"), str(path))


async def test_secrets_not_in_caplog_in_process(
    secure_plane: Any, sim_engine: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The same in-process, with every logger at DEBUG captured."""
    caplog.set_level(logging.DEBUG)
    client = secure_plane.client
    url = sim_engine(model="sim-cap")
    registered = await client.post(
        "/v1/management/engines/register",
        json={"model_id": "sim-cap", "base_url": url},
        headers=admin(),
    )
    assert registered.status_code == 201, registered.text
    chat = {"model": "sim-cap", "messages": [{"role": "user", "content": "hi"}]}
    replies = [
        await client.post("/v1/chat/completions", json=chat, headers=tenant()),
        await client.post("/v1/chat/completions", json=chat),
        await client.post(
            "/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        ),
        await client.get("/v1/management/status", headers=tenant()),
        await client.get("/v1/management/status", headers=admin()),
    ]
    assert [r.status_code for r in replies] == [200, 401, 401, 401, 200]
    for reply in replies:
        assert_no_secret(reply.text, reply.request.url.path)
    assert caplog.records
    assert_no_secret(caplog.text, "caplog")
    for record in caplog.records:
        assert_no_secret(repr(record.__dict__), "log record fields")
