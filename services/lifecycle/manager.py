"""EngineLifecycleManager: engine processes from launch to exit, with logs and health."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from sage.common.config.ports import SagePorts
from sage.common.exceptions import (
    ConflictError,
    EngineNotFoundError,
    EngineStartError,
    InvalidRequestError,
)

from .commands import EngineSpec, build_command, resolve_backend

log = logging.getLogger("sage.lifecycle")


@dataclass(frozen=True)
class EngineInstance:
    """A running (or finished) engine."""

    engine_id: str
    spec: EngineSpec
    backend: str
    base_url: str
    port: int
    pid: int
    state: str  # starting | ready | stopped | failed
    log_path: str
    started_at: float


Registrar = Callable[[EngineInstance], Awaitable[None]]
Deregistrar = Callable[[str], Awaitable[None]]


def _slug(model: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")[:40] or "engine"


async def _noop_register(instance: EngineInstance) -> None:
    return None


async def _noop_deregister(engine_id: str) -> None:
    return None


class EngineLifecycleManager:
    """Starts engines, waits until they answer /health, registers them; stops them cleanly."""

    def __init__(
        self,
        log_dir: Path,
        *,
        register: Registrar = _noop_register,
        deregister: Deregistrar = _noop_deregister,
        health_interval_s: float = 0.2,
    ) -> None:
        self.log_dir = log_dir
        self._register = register
        self._deregister = deregister
        self._health_interval_s = health_interval_s
        self._instances: dict[str, EngineInstance] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = asyncio.Lock()
        self._http = httpx.AsyncClient(timeout=2.0, trust_env=False)

    def _pick_port(self, spec: EngineSpec) -> int:
        used = {i.port for i in self._instances.values() if i.state in ("starting", "ready")}
        if spec.port:
            if spec.port in used or not SagePorts.is_available(spec.port, spec.host):
                raise ConflictError(f"port {spec.port} is already in use", param="port")
            return spec.port
        for _ in range(20):
            port = SagePorts.find_available_port(host=spec.host)
            if port not in used:
                return port
        raise ConflictError("no free port in the engine range", param="port")

    async def start(self, spec: EngineSpec) -> EngineInstance:
        """Launch (or adopt an external) engine and return it once it is ready."""
        if not spec.model:
            raise InvalidRequestError("model is required", param="model")
        if spec.kind not in ("llm", "embedding"):
            raise InvalidRequestError(
                f"kind must be llm or embedding, got {spec.kind!r}", param="kind"
            )
        backend = resolve_backend(spec)
        async with self._lock:
            engine_id = spec.engine_id or f"{_slug(spec.model)}-{uuid.uuid4().hex[:6]}"
            current = self._instances.get(engine_id)
            if current is not None and current.state in ("starting", "ready"):
                raise ConflictError(f"engine {engine_id!r} already exists", param="engine_id")
            if backend == "external":
                if not spec.base_url.startswith(("http://", "https://")):
                    raise InvalidRequestError("base_url must be an http(s) URL", param="base_url")
                instance = EngineInstance(
                    engine_id,
                    spec,
                    backend,
                    spec.base_url.rstrip("/"),
                    0,
                    0,
                    "starting",
                    "",
                    time.time(),
                )
                self._instances[engine_id] = instance
                proc = None
            else:
                port = self._pick_port(spec)
                argv = build_command(spec, backend, port)
                self.log_dir.mkdir(parents=True, exist_ok=True)
                log_path = self.log_dir / f"{engine_id}.log"
                with open(log_path, "ab") as log_file:  # noqa: ASYNC230 - open() of a local file
                    # Popen (vfork + exec), not the event loop's fork: forking a process
                    # that runs gRPC threads under uvloop can crash the child before exec.
                    proc = subprocess.Popen(  # noqa: ASYNC220 - vfork+exec returns at once
                        argv,
                        stdin=subprocess.DEVNULL,
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        env={**os.environ, "PYTHONUNBUFFERED": "1"},
                    )
                base_url = f"http://{spec.host}:{port}"
                instance = EngineInstance(
                    engine_id,
                    spec,
                    backend,
                    base_url,
                    port,
                    proc.pid,
                    "starting",
                    str(log_path),
                    time.time(),
                )
                self._instances[engine_id] = instance
                self._procs[engine_id] = proc
                log.info(
                    "engine launched",
                    extra={"engine_id": engine_id, "pid": proc.pid, "argv": " ".join(argv)},
                )
        try:
            await self._wait_healthy(instance, proc)
            ready = replace(instance, state="ready")
            self._instances[engine_id] = ready
            await self._register(ready)
        except BaseException as exc:
            await self._kill(engine_id)
            self._instances[engine_id] = replace(instance, state="failed")
            if isinstance(exc, EngineStartError | asyncio.CancelledError):
                raise
            raise EngineStartError(f"engine {engine_id} failed to start: {exc}") from exc
        log.info("engine ready", extra={"engine_id": engine_id, "base_url": ready.base_url})
        return ready

    async def _wait_healthy(
        self, instance: EngineInstance, proc: subprocess.Popen[bytes] | None
    ) -> None:
        deadline = time.monotonic() + instance.spec.startup_timeout_s
        url = instance.base_url + "/health"
        while True:
            if proc is not None and proc.poll() is not None:
                raise EngineStartError(
                    f"engine {instance.engine_id} exited with code {proc.returncode} during "
                    f"startup; last log lines:\n"
                    + "\n".join(self.tail_logs(instance.engine_id, 20))
                )
            with contextlib.suppress(httpx.HTTPError):
                if (await self._http.get(url)).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise EngineStartError(
                    f"engine {instance.engine_id} not healthy after "
                    f"{instance.spec.startup_timeout_s:g}s at {url}"
                )
            await asyncio.sleep(self._health_interval_s)

    async def _kill(self, engine_id: str, grace_s: float = 10.0) -> int | None:
        proc = self._procs.pop(engine_id, None)
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(proc.wait, grace_s)
        except subprocess.TimeoutExpired:
            log.warning("engine ignored SIGTERM, killing", extra={"engine_id": engine_id})
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            return await asyncio.to_thread(proc.wait)

    async def stop(self, engine_id: str, drain_timeout_s: float = 10.0) -> EngineInstance:
        """Deregister (no new traffic), then stop the process."""
        instance = self.get(engine_id)
        with contextlib.suppress(Exception):
            await self._deregister(engine_id)
        await self._kill(engine_id, drain_timeout_s)
        stopped = replace(instance, state="stopped")
        self._instances[engine_id] = stopped
        log.info("engine stopped", extra={"engine_id": engine_id})
        return stopped

    def get(self, engine_id: str) -> EngineInstance:
        """One engine; EngineNotFoundError names the id."""
        try:
            return self._instances[engine_id]
        except KeyError:
            raise EngineNotFoundError(
                f"no engine with id {engine_id!r}", param="engine_id"
            ) from None

    def instances(self) -> list[EngineInstance]:
        """Every engine this manager knows, oldest first."""
        return sorted(self._instances.values(), key=lambda i: i.started_at)

    def tail_logs(self, engine_id: str, lines: int = 100) -> list[str]:
        """The last `lines` lines of an engine's log."""
        instance = self.get(engine_id)
        if not instance.log_path or not Path(instance.log_path).exists():
            return []
        with open(instance.log_path, errors="replace") as fh:
            return [line.rstrip("\n") for line in collections.deque(fh, maxlen=max(1, lines))]

    async def shutdown(self) -> None:
        """Stop every engine this manager started (embedded mode owns its engines)."""
        running = [i.engine_id for i in self.instances() if i.state in ("starting", "ready")]
        await asyncio.gather(*(self.stop(e) for e in running), return_exceptions=True)
        await self._http.aclose()
