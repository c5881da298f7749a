"""`sage llm serve`: run the five services and the engines as children of one process.

Children start in dependency order, each waited for by its health check; engines are
started through the lifecycle service like any other; Ctrl-C/SIGTERM stops services in
reverse order and then kills whatever is left of the process tree, so nothing is orphaned.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc
import httpx
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sage.common.bind_policy import check_bind
from sage.common.config.ports import SagePorts
from sage.common.config.settings import SageSettings
from sage.common.exceptions import (
    ConfigurationError,
    DeadlineExceededError,
    EngineStartError,
    SageError,
)
from sage.common.grpc import create_sync_channel, from_rpc_error, process_tls
from sage.common.security import admin_key_path, ensure_secret_file, internal_token_path
from sage.rpc.common.v1 import common_pb2
from sage.rpc.lifecycle.v1 import lifecycle_pb2, lifecycle_pb2_grpc

# (name, settings attribute of its port, gRPC?) in start order.
SERVICES: tuple[tuple[str, str, bool], ...] = (
    ("gpu_manager", "gpu_manager_port", True),
    ("embedding", "embedding_service_port", True),
    ("scheduler", "scheduler_port", True),
    ("lifecycle", "lifecycle_port", True),
    ("edge", "gateway_port", False),
)


@dataclass(frozen=True)
class EngineRequest:
    """One engine `serve` asks lifecycle for."""

    model: str
    kind: str
    port: int
    backend: str = ""
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.0
    max_model_len: int = 0
    extra_args: tuple[str, ...] = ()


@dataclass
class ServePlan:
    """Everything `serve` will start."""

    settings: SageSettings
    engines: list[EngineRequest] = field(default_factory=list)
    startup_timeout_s: float = 60.0
    engine_timeout_s: float = 600.0
    # The `sage llm serve` flags that describe this plan, recorded in daemon.json so
    # `sage llm restart` can start the same stack again.
    serve_argv: list[str] = field(default_factory=list)
    # Extra environment for every child (e.g. SAGE_SCHEDULER_POLICY).
    child_env: dict[str, str] = field(default_factory=dict)


def daemon_file(settings: SageSettings) -> Path:
    """Where `serve` records what it runs (read by `sage llm status/logs`)."""
    return settings.llm_state_dir / "daemon.json"


def _write_atomic(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False))
    os.replace(tmp, path)


@dataclass(frozen=True)
class StackSecrets:
    """Where the stack's admin key and internal token live (the values never leave them)."""

    admin_key_file: Path
    internal_token_file: Path
    admin_key_from_env: bool = False
    """SAGE_ADMIN_API_KEY is set: it wins over the file, which may not exist."""


def ensure_stack_secrets(settings: SageSettings) -> StackSecrets:
    """Create the admin key and the internal token (0600 files under $SAGE_HOME/llm) unless
    SAGE_ADMIN_API_KEY / SAGE_INTERNAL_TOKEN give them, before any child starts: management
    and gRPC are closed from the first request, and the CLI and clients find the key there."""
    admin_file = admin_key_path(settings)
    token_file = internal_token_path(settings)
    # The state dir holds engine logs (prompts, engine arguments), the registry and the
    # secrets: other local users get no way in.
    state_dir = settings.llm_state_dir
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        state_dir.chmod(0o700)
    except OSError as exc:
        raise ConfigurationError(f"cannot make {state_dir} private: {exc.strerror}") from None
    for path, given, prefix in (
        (admin_file, settings.admin_api_key, "sk-admin-"),
        (token_file, settings.internal_token, ""),
    ):
        if given:
            continue
        try:
            ensure_secret_file(path, prefix=prefix)
        except OSError as exc:
            raise ConfigurationError(f"cannot create secret file {path}: {exc.strerror}") from None
    return StackSecrets(admin_file, token_file, admin_key_from_env=bool(settings.admin_api_key))


def check_serve_bind(settings: SageSettings) -> str | None:
    """serve's bind policy (before anything starts): a non-loopback host needs an admin key
    the operator holds and TLS, unless --insecure; returns the warning to show, if any."""
    return check_bind(settings, settings.host, "sage llm serve", surface="edge")


def local_model_path(model: str) -> str:
    """A model typed as a path (`/…`, `./…`, `../…`, `~…`) made absolute, since lifecycle
    takes local folders only as absolute paths; anything else (a Hub id, `sim`) unchanged."""
    if model in (".", "..") or model.startswith(("/", "./", "../", "~")):
        return os.path.abspath(os.path.expanduser(model))
    return model


def local_model_roots(engines: Sequence[EngineRequest]) -> list[str]:
    """The local model folders (absolute paths) among the engines serve starts."""
    roots: list[str] = []
    for request in engines:
        if not os.path.isabs(request.model) or request.model in roots:
            continue
        if "," in request.model:
            raise ConfigurationError(
                f"model path {request.model!r} contains a comma, which SAGE_MODEL_ROOTS "
                "cannot hold; rename or link the folder"
            )
        roots.append(request.model)
    return roots


def model_roots_value(settings: SageSettings, engines: Sequence[EngineRequest]) -> str:
    """SAGE_MODEL_ROOTS for the children: the configured roots plus the local folders the
    operator named on the command line (lifecycle's launch policy refuses a folder outside
    the roots, and what the operator typed is what they allow)."""
    roots = [r.strip() for r in settings.lifecycle.model_roots.split(",") if r.strip()]
    roots += [r for r in local_model_roots(engines) if r not in roots]
    return ",".join(roots)


def posture_lines(settings: SageSettings, secrets: StackSecrets) -> list[str]:
    """Who may call what, said at start (the key itself is never printed)."""
    if secrets.admin_key_from_env:
        admin = "admin key: from SAGE_ADMIN_API_KEY (required on /v1/management)"
    else:
        admin = (
            f"admin key: {secrets.admin_key_file} (mode 0600, required on /v1/management; "
            "`sage llm` commands and UnifiedInferenceClient on this machine read it)"
        )
    if settings.auth.api_keys or settings.auth.api_keys_file:
        tenants = "tenant API keys: required on /v1/* inference; they never open management"
    else:
        tenants = (
            f"tenant API keys: none; inference is open to whoever reaches {settings.host} "
            "(set SAGE_API_KEYS to require keys)"
        )
    return [admin, tenants]


def _child_env(
    settings: SageSettings,
    extra: dict[str, str] | None = None,
    *,
    secrets: StackSecrets | None = None,
    model_roots: str | None = None,
) -> dict[str, str]:
    """Pin every address, secret file and policy so all children agree, whatever their own
    env says."""
    env = dict(os.environ)
    env.update(extra or {})
    if secrets is not None:
        env["SAGE_ADMIN_API_KEY_FILE"] = str(secrets.admin_key_file)
        env["SAGE_INTERNAL_TOKEN_FILE"] = str(secrets.internal_token_file)
    if model_roots is not None:
        env["SAGE_MODEL_ROOTS"] = model_roots
    env.update(
        {
            "SAGE_HOME": str(settings.home),
            "SAGE_HOST": settings.host,
            "SAGE_INSECURE": "1" if settings.insecure else "0",
            "SAGE_GATEWAY_PORT": str(settings.edge.port),
            "SAGE_SCHEDULER_PORT": str(settings.scheduler.port),
            "SAGE_LIFECYCLE_PORT": str(settings.lifecycle.port),
            "SAGE_GPU_MANAGER_PORT": str(settings.gpu_manager.port),
            "SAGE_EMBEDDING_SERVICE_PORT": str(settings.embedding_service.port),
            "SAGE_LOG_LEVEL": settings.log_level,
            "SAGE_LOG_FORMAT": settings.log_format,
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


class Supervisor:
    """Owns the child processes of one `sage llm serve`."""

    def __init__(self, plan: ServePlan, out: TextIO = sys.stdout) -> None:
        self.plan = plan
        self.settings = plan.settings
        self.out = out
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.engines: list[dict[str, Any]] = []
        # Start-up progress that daemon.json shows from the first moment (`sage llm status`):
        # per service "pending" → "starting" → "up"; the engine being started.
        self.service_states: dict[str, str] = {name: "pending" for name, _, _ in SERVICES}
        self.starting_engine: EngineRequest | None = None
        self.phase = "starting"
        self._started_at = time.time()
        self.log_dir = self.settings.llm_state_dir / "logs"
        self.secrets: StackSecrets | None = None
        self._stop = threading.Event()

    def say(self, message: str) -> None:
        """Progress for the person at the terminal."""
        print(message, file=self.out, flush=True)

    @staticmethod
    def become_subreaper() -> None:
        """Orphans of our children (say, engines of a crashed lifecycle) re-parent to us,
        so shutdown still finds and stops them (Linux PR_SET_CHILD_SUBREAPER)."""
        if not sys.platform.startswith("linux"):
            return
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)

    def check_ports(self) -> None:
        """Fail before starting anything if a port is taken, naming the port and its setting."""
        host = self.settings.host
        wanted = [(name, getattr(self.settings, attr)) for name, attr, _ in SERVICES]
        wanted += [(f"{e.kind} engine {e.model}", e.port) for e in self.plan.engines if e.port]
        seen: dict[int, str] = {}
        for name, port in wanted:
            if port in seen:
                raise ConfigurationError(f"{name} and {seen[port]} both want port {port}")
            seen[port] = name
            if not SagePorts.is_available(port, host, timeout=0.3):
                raise ConfigurationError(
                    f"port {port} for {name} is already in use on {host}; stop what holds it "
                    "(`sage llm status`) or choose another port"
                )

    def _spawn(self, name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", f"sage.services.{name}"],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                # Own process group: a terminal Ctrl-C reaches only us, and we stop children
                # in order instead of all at once.
                start_new_session=True,
            )
        self.children[name] = proc
        return proc

    def _tail(self, name: str, lines: int = 15) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def _wait_ready(self, name: str, port: int, is_grpc: bool) -> None:
        proc = self.children[name]
        deadline = time.monotonic() + self.plan.startup_timeout_s
        addr = f"{self.settings.host}:{port}"
        while time.monotonic() < deadline and not self._stop.is_set():
            if proc.poll() is not None:
                raise ConfigurationError(
                    f"{name} exited with code {proc.returncode} while starting:\n{self._tail(name)}"
                )
            if self._probe(addr, is_grpc):
                return
            time.sleep(0.1)
        if self._stop.is_set():
            raise KeyboardInterrupt
        raise ConfigurationError(
            f"{name} did not become healthy on {addr} within "
            f"{self.plan.startup_timeout_s:g}s:\n{self._tail(name)}"
        )

    @staticmethod
    def _probe(addr: str, is_grpc: bool) -> bool:
        if not is_grpc:
            tls = process_tls()  # HTTPS edge when SAGE_TLS_* name a certificate
            with contextlib.suppress(httpx.HTTPError):
                return (
                    httpx.get(
                        f"{tls.http_scheme}://{addr}/health",
                        timeout=1.0,
                        trust_env=False,
                        verify=tls.httpx_verify(),
                    ).status_code
                    == 200
                )
            return False
        with create_sync_channel(addr) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=1.0
                )
            except grpc.RpcError:
                return False
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def _start_engine(self, request: EngineRequest) -> dict[str, Any]:
        addr = self.settings.address("lifecycle")
        with create_sync_channel(addr) as channel:
            stub = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
            try:
                future = stub.StartEngine.future(
                    lifecycle_pb2.StartEngineRequest(
                        model=request.model,
                        kind=common_pb2.ENGINE_KIND_EMBEDDING
                        if request.kind == "embedding"
                        else common_pb2.ENGINE_KIND_LLM,
                        backend=request.backend,
                        port=request.port,
                        tensor_parallel_size=request.tensor_parallel_size,
                        gpu_memory_utilization=request.gpu_memory_utilization,
                        max_model_len=request.max_model_len,
                        extra_args=list(request.extra_args),
                        startup_timeout_s=int(self.plan.engine_timeout_s),
                    ),
                    timeout=self.plan.engine_timeout_s + 30,
                )
                # Engines can take minutes to load; Ctrl-C must not wait for that.
                while not future.done():
                    if self._stop.wait(0.2):
                        future.cancel()  # type: ignore[no-untyped-call]
                        raise KeyboardInterrupt
                reply = future.result()
            except grpc.RpcError as err:
                raise from_rpc_error(err) from None
        engine = reply.engine
        return {
            "engine_id": engine.engine_id,
            "model": engine.model,
            "kind": request.kind,
            "base_url": engine.base_url,
            "port": engine.port,
            "pid": engine.pid,
            "backend": engine.backend,
        }

    def forget_earlier_engines(self) -> None:
        """A new stack lists only its own engines: lifecycle moves the stopped and failed
        ones of earlier runs to its history log (logs/engine-history.jsonl)."""
        with create_sync_channel(self.settings.address("lifecycle")) as channel:
            stub = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
            try:
                reply = stub.PruneEngines(
                    lifecycle_pb2.PruneEnginesRequest(), timeout=self.settings.rpc_timeout_s
                )
            except grpc.RpcError as err:  # a longer list is no reason not to serve
                self.say(f"note: earlier engines stay listed ({from_rpc_error(err).message})")
                return
        if reply.engine_ids:
            history = self.log_dir / "engine-history.jsonl"
            self.say(
                f"{len(reply.engine_ids)} stopped/failed engine(s) of earlier runs moved to "
                f"{history}"
            )

    def _engine_rows(self) -> list[dict[str, Any]]:
        """Ready engines, then the one being started and those still to come."""
        rows = [{**engine, "state": "ready"} for engine in self.engines]
        pending = self.plan.engines[len(self.engines) :] if self.phase == "starting" else []
        for request in pending:
            rows.append(
                {
                    "engine_id": "",
                    "model": request.model,
                    "kind": request.kind,
                    "base_url": "",
                    "port": request.port,
                    "pid": None,
                    "backend": request.backend,
                    "state": "starting" if request is self.starting_engine else "pending",
                }
            )
        return rows

    def write_daemon_file(self) -> Path:
        """Record ports, pids and engines for the CLI and other tools: first as the stack
        starts (phase "starting", each service and engine with its state), and again as
        each part comes up, so `sage llm status` shows a stack from its first moment."""
        s = self.settings
        doc = {
            "pid": os.getpid(),
            "started_at": self._started_at,
            "phase": self.phase,
            "home": str(s.home),
            "gateway_url": f"{process_tls().http_scheme}://{s.host}:{s.edge.port}/v1",
            "llm_port": next((e["port"] for e in self.engines if e["kind"] == "llm"), None),
            "embedding_port": next(
                (e["port"] for e in self.engines if e["kind"] == "embedding"), None
            ),
            "services": {
                name: {
                    "pid": self.children[name].pid if name in self.children else None,
                    "port": getattr(s, attr),
                    "addr": f"{s.host}:{getattr(s, attr)}",
                    "grpc": is_grpc,
                    "log": str(self.log_dir / f"{name}.log"),
                    "state": self.service_states[name],
                }
                for name, attr, is_grpc in SERVICES
            },
            "engines": self._engine_rows(),
            "serve_argv": list(self.plan.serve_argv),
            # Where the admin key is (never the key): null when SAGE_ADMIN_API_KEY holds it.
            "admin_key_file": str(self.secrets.admin_key_file)
            if self.secrets and not self.secrets.admin_key_from_env
            else None,
            "insecure": s.insecure,
            "startup_timeout_s": self.plan.startup_timeout_s,
            "engine_timeout_s": self.plan.engine_timeout_s,
            "log_dir": str(self.log_dir),
        }
        path = daemon_file(s)
        _write_atomic(path, doc)
        return path

    def start(self) -> None:
        """Start services, then engines; raises (after cleaning up) if anything fails."""
        # Refused binds and broken secret files stop us before any port is taken.
        warning = check_serve_bind(self.settings)
        if warning:
            self.say(f"WARNING: {warning}")
        model_roots = model_roots_value(self.settings, self.plan.engines)
        self.secrets = ensure_stack_secrets(self.settings)
        for line in posture_lines(self.settings, self.secrets):
            self.say(line)
        self.check_ports()
        self.become_subreaper()
        env = _child_env(
            self.settings, self.plan.child_env, secrets=self.secrets, model_roots=model_roots
        )
        for request in self.plan.engines:  # lifecycle's port policy admits serve's own ports
            if request.port:
                kind = "EMBEDDING" if request.kind == "embedding" else "LLM"
                env[f"SAGE_{kind}_PORT"] = str(request.port)
        self.write_daemon_file()
        for name, attr, is_grpc in SERVICES:
            port = getattr(self.settings, attr)
            self.say(f"starting {name:<12} on {self.settings.host}:{port}")
            self._spawn(name, env)
            self.service_states[name] = "starting"
            self.write_daemon_file()
            self._wait_ready(name, port, is_grpc)
            self.service_states[name] = "up"
            self.write_daemon_file()
        self.forget_earlier_engines()
        for request in self.plan.engines:
            self.say(
                f"starting {request.kind} engine {request.model} "
                f"(port {request.port or 'auto'}) ..."
            )
            self.starting_engine = request
            self.write_daemon_file()
            self.engines.append(self._start_engine(request))
            self.starting_engine = None
            self.write_daemon_file()
            self.say(f"  ready: {self.engines[-1]['engine_id']} at {self.engines[-1]['base_url']}")
        self.phase = "ready"
        path = self.write_daemon_file()
        s = self.settings
        scheme = process_tls().http_scheme
        self.say(
            f"SAGE gateway listening on {scheme}://{s.host}:{s.edge.port}/v1  "
            f"(state: {path}; Ctrl-C to stop)"
        )

    def request_stop(self, *_: Any) -> None:
        """Signal handler: ask the main loop to shut down."""
        self._stop.set()

    def wait(self) -> int:
        """Block until asked to stop or a service dies; returns the exit code."""
        while not self._stop.wait(0.5):
            for name, proc in self.children.items():
                if proc.poll() is not None:
                    self.say(
                        f"{name} exited unexpectedly (code {proc.returncode}); stopping:\n"
                        f"{self._tail(name)}"
                    )
                    return 1
        return 0

    def shutdown(self, grace_s: float = 20.0) -> None:
        """Stop services in reverse order, then make sure no descendant survives."""
        descendants = psutil.Process().children(recursive=True)
        for name, _, _ in reversed(SERVICES):
            proc = self.children.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # Engines and anything else started below us (lifecycle normally stops them).
        descendants += psutil.Process().children(recursive=True)
        alive = [p for p in {p.pid: p for p in descendants}.values() if p.is_running()]
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, still = psutil.wait_procs(alive, timeout=5)
        for p in still:
            with contextlib.suppress(psutil.Error):
                p.kill()
        # Reap re-parented orphans so none lingers as a zombie.
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        # Only our own record: a serve that failed early (say, on a port the running stack
        # holds) must not delete the running stack's.
        path = daemon_file(self.settings)
        with contextlib.suppress(OSError, ValueError):
            if int(json.loads(path.read_text()).get("pid") or 0) == os.getpid():
                path.unlink()


def serve(
    plan: ServePlan,
    out: TextIO = sys.stdout,
    install_signals: Callable[[Supervisor], None] | None = None,
) -> int:
    """Run the stack until Ctrl-C/SIGTERM; returns the process exit code."""
    supervisor = Supervisor(plan, out)
    if install_signals is None:
        signal.signal(signal.SIGINT, supervisor.request_stop)
        signal.signal(signal.SIGTERM, supervisor.request_stop)
    else:
        install_signals(supervisor)
    code = 0
    try:
        supervisor.start()
        code = supervisor.wait()
    except KeyboardInterrupt:
        code = 130
    except SageError as exc:
        supervisor.say(f"error: {exc.message}")
        code = 2 if isinstance(exc, ConfigurationError) else 1
        if isinstance(exc, EngineStartError):
            code = 1
    finally:
        supervisor.say("stopping ...")
        supervisor.shutdown()
        supervisor.say("stopped")
    return code


def engine_requests(
    model: str,
    replicas: int,
    port: int,
    backend: str,
    embedding_model: str | None,
    embedding_port: int,
    tensor_parallel: int,
    gpu_memory_utilization: float,
    max_model_len: int = 0,
    extra_args: Sequence[str] = (),
) -> list[EngineRequest]:
    """The engines a `serve` command line asks for."""
    if replicas < 1:
        raise ConfigurationError("--replicas must be at least 1")
    engines = [
        EngineRequest(
            model,
            "llm",
            port if i == 0 else 0,
            backend,
            tensor_parallel,
            gpu_memory_utilization,
            max_model_len,
            tuple(extra_args),
        )
        for i in range(replicas)
    ]
    if embedding_model:
        emb_backend = "sim" if embedding_model.startswith("sim") else ""
        engines.append(EngineRequest(embedding_model, "embedding", embedding_port, emb_backend))
    return engines


def read_daemon_file(settings: SageSettings) -> dict[str, Any] | None:
    """The running stack's record, or None if nothing is running."""
    path = daemon_file(settings)
    if not path.exists():
        return None
    doc: dict[str, Any] = json.loads(path.read_text())
    if not is_running(int(doc.get("pid", 0))):
        return None
    return doc


def service_names() -> Sequence[str]:
    """Service names in start order."""
    return [name for name, _, _ in SERVICES]


# --- background mode, stop and restart ------------------------------------------------------


def serve_log_path(settings: SageSettings) -> Path:
    """Where a background `serve` writes its own output."""
    return settings.llm_state_dir / "logs" / "serve.log"


def is_running(pid: int) -> bool:
    """True while `pid` is a live process (a zombie has ended: it only waits to be reaped)."""
    if pid <= 0:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stack_processes(doc: dict[str, Any]) -> list[psutil.Process]:
    """The supervisor daemon.json names, its descendants, and the services and engines it
    recorded (those not re-used by another program since: created before the record)."""
    found: dict[int, psutil.Process] = {}
    recorded_at = float(doc.get("started_at") or time.time())
    pids = [int(doc.get("pid") or 0)]
    pids += [int(svc.get("pid") or 0) for svc in (doc.get("services") or {}).values()]
    pids += [int(engine.get("pid") or 0) for engine in doc.get("engines") or []]
    for pid in pids:
        if pid <= 0 or pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if proc.create_time() > recorded_at + 1:
                continue  # the pid now belongs to something else
            found[pid] = proc
            for child in proc.children(recursive=True):
                found.setdefault(child.pid, child)
    return list(found.values())


@dataclass(frozen=True)
class StopOutcome:
    """How `stop_stack` ended."""

    stopped: bool
    killed: int = 0
    """Processes that needed SIGKILL (only with force)."""


def stop_stack(
    settings: SageSettings, doc: dict[str, Any], timeout_s: float, force: bool = False
) -> StopOutcome:
    """SIGTERM the supervisor and wait up to `timeout_s` for a clean shutdown; with `force`,
    SIGKILL whatever is left of its process tree after that."""
    tree = stack_processes(doc)
    supervisor_pid = int(doc["pid"])
    path = daemon_file(settings)
    with contextlib.suppress(ProcessLookupError):
        os.kill(supervisor_pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not is_running(supervisor_pid) and not path.exists():
            return StopOutcome(stopped=True)
        time.sleep(0.2)
    if not force:
        return StopOutcome(stopped=False)
    # Descendants started since (say, engines added by `engine start`) go too.
    tree += [p for p in stack_processes(doc) if p.pid not in {q.pid for q in tree}]
    alive = [p for p in tree if is_running(p.pid)]
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    # Not psutil.wait_procs: an orphan's zombie may never be reaped (a PID 1 that does not
    # reap), and a zombie has ended all the same.
    deadline = time.monotonic() + 10
    while any(is_running(p.pid) for p in alive) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return StopOutcome(stopped=not any(is_running(p.pid) for p in alive), killed=len(alive))


def spawn_background(
    serve_argv: Sequence[str], settings: SageSettings, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start `sage llm serve --foreground SERVE_ARGV` detached from this terminal (own
    session, no inherited stdio), its output appended to serve.log."""
    log_path = serve_log_path(settings)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    child_env = dict(os.environ if env is None else env)
    child_env["SAGE_HOME"] = str(settings.home)
    child_env["PYTHONUNBUFFERED"] = "1"
    argv = [sys.executable, "-m", "sage.llm.cli", "llm", "serve", "--foreground", *serve_argv]
    with open(log_path, "ab") as log_file:
        log_file.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        log_file.flush()
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=child_env,
            start_new_session=True,
        )


def _log_tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def wait_for_stack(
    proc: subprocess.Popen[bytes], settings: SageSettings, timeout_s: float
) -> dict[str, Any]:
    """Wait until the background supervisor `proc` has written daemon.json and its gateway
    answers /health; returns the daemon.json record. On failure the child is stopped and a
    SageError says why (ConfigurationError when serve itself reported one)."""
    deadline = time.monotonic() + timeout_s
    log_path = serve_log_path(settings)
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            message = f"serve exited with code {code} while starting:\n{_log_tail(log_path)}"
            if code == 2:
                raise ConfigurationError(message)
            raise EngineStartError(message)
        doc = read_daemon_file(settings)
        if (
            doc is not None
            and int(doc.get("pid") or 0) == proc.pid
            and doc.get("phase", "ready") == "ready"  # files of older versions: ready
        ):
            edge = (doc.get("services") or {}).get("edge") or {}
            if Supervisor._probe(str(edge.get("addr", "")), is_grpc=False):
                return doc
        time.sleep(0.2)
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    raise DeadlineExceededError(
        f"the stack did not come up within {timeout_s:g}s; stopped it:\n{_log_tail(log_path)}"
    )
