"""A whole control plane (gpu_manager, embedding, scheduler, lifecycle, edge) on loopback,
hosted on its own event loop in a background thread, so synchronous clients (schemathesis
uses `requests`) can drive it from the test thread without blocking its loop.

The wiring is `full_plane`'s (tests/integration/conftest.py); only the loop differs.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from sage.common.config.settings import SageSettings
from sage.common.grpc import SageServer
from sage.common.http.testing import quiet_server
from sage.common.utils.processes import free_port
from sage.services.edge.app import create_app
from sage.services.embedding.server import build_server as build_embedding
from sage.services.gpu_manager.server import build_server as build_gpu
from sage.services.lifecycle.server import build_server as build_lifecycle
from sage.services.scheduler.server import build_server as build_scheduler
from tests.conftest import integration_fixtures

_integration = integration_fixtures()
full_plane = _integration.full_plane
control_plane = _integration.control_plane

API_KEY = "fuzz-tenant-key-0123456789"
ADMIN_KEY = "fuzz-admin-key-0123456789"
SIM_MODEL = "sim-fuzz"

# Total generated cases over every operation; CI default, nightly raises it.
FUZZ_EXAMPLES = int(os.environ.get("SAGE_FUZZ_EXAMPLES", "200"))
# Examples per property test (hypothesis); the nightly profile multiplies them.
PROPERTY_EXAMPLES = 1000 if os.environ.get("SAGE_FUZZ_PROFILE") == "nightly" else 100


@dataclass
class ThreadedPlane:
    """Base URL of the edge and the settings every service was built from."""

    base_url: str
    settings: SageSettings
    sim_url: str


class _LoopThread:
    """An asyncio loop running in a daemon thread; `run` submits a coroutine and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 60.0) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def plane_settings(home: Path, **extra: Any) -> SageSettings:
    """Settings for a plane on loopback ports with both keys configured."""
    ports = {name: free_port() for name in ("gpu", "emb", "sched", "life")}
    return SageSettings(
        home=home,
        rpc_timeout_s=10.0,
        request_timeout_s=30.0,
        disable_nvml=not Path("/dev/nvidia0").exists(),
        # test engines are sims on loopback, registered as external engines
        external_engine_allow="127.0.0.1",
        gpu_manager_addr=f"127.0.0.1:{ports['gpu']}",
        embedding_service_addr=f"127.0.0.1:{ports['emb']}",
        scheduler_addr=f"127.0.0.1:{ports['sched']}",
        lifecycle_addr=f"127.0.0.1:{ports['life']}",
        lifecycle_restart_backoff_s=0.2,
        api_keys=f"{API_KEY}:fuzz",
        admin_api_key=ADMIN_KEY,
        **extra,
    )


@pytest.fixture(scope="module")
def threaded_plane(
    tmp_path_factory: pytest.TempPathFactory,
    module_sim_engine: Callable[..., str],
) -> Iterator[ThreadedPlane]:
    """Every service plus the edge, with one simulator engine registered as `sim-fuzz`."""
    home = tmp_path_factory.mktemp("fuzz") / "sage"
    settings = plane_settings(home)
    loop = _LoopThread()
    servers: list[SageServer] = []
    edge_port = free_port()
    edge = quiet_server(create_app(settings), edge_port)

    async def start() -> asyncio.Task[None]:
        for build, service in (
            (build_gpu, "gpu_manager"),
            (build_embedding, "embedding_service"),
            (build_scheduler, "scheduler"),
            (build_lifecycle, "lifecycle"),
        ):
            server, _ = build(settings, settings.address(service))
            await server.start()
            servers.append(server)
        task = asyncio.create_task(edge.serve())
        for _ in range(500):
            if edge.started:
                break
            await asyncio.sleep(0.02)
        return task

    async def stop(task: asyncio.Task[None]) -> None:
        edge.should_exit = True
        await task
        for server in reversed(servers):
            await server.stop(1)

    task = loop.run(start())
    base_url = f"http://127.0.0.1:{edge_port}"
    sim_url = module_sim_engine(model=SIM_MODEL)
    try:
        registered = httpx.post(
            f"{base_url}/v1/management/engines/register",
            json={"model_id": SIM_MODEL, "base_url": sim_url, "engine_id": "sim-fuzz-1"},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            timeout=30,
            trust_env=False,
        )
        assert registered.status_code == 201, registered.text
        yield ThreadedPlane(base_url, settings, sim_url)
    finally:
        loop.run(stop(task))
        loop.close()
