"""Every port SAGE uses, in one place, plus the helpers to check and pick ports.

No other module hard-codes a port: services, the CLI and the client all read these
constants (or the env overrides for the internal gRPC ports), so a change of default
happens here once.

Example (from the SAGE docs)::

    from sage.common.config.ports import SagePorts

    recommended = SagePorts.get_recommended_llm_port()
    if SagePorts.is_wsl():
        # 8001 may listen but refuse connections on WSL2 -> fall back to 8901
        recommended = SagePorts.LLM_WSL_FALLBACK
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from typing import ClassVar, Final, TypedDict


class PortStatus(TypedDict):
    """What `SagePorts.check_port_status` found out about one port."""

    port: int
    host: str
    available: bool
    in_use: bool
    pid: int | None
    process: str | None


class PortReport(TypedDict):
    """One known port in the `SagePorts.diagnose` report."""

    name: str
    port: int
    purpose: str
    env_var: str | None
    available: bool
    in_use: bool
    pid: int | None
    process: str | None
    error: str | None


class PortDiagnosis(TypedDict):
    """The whole `SagePorts.diagnose` report (the CLI prints it)."""

    host: str
    is_wsl: bool
    recommended_llm_port: int
    ports: list[PortReport]


_MIN_PORT: Final = 1
_MAX_PORT: Final = 65535


def _check_port_number(port: int, what: str = "port") -> None:
    """Reject values that cannot be TCP ports early, with the offending value."""
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"{what} must be an int, got {type(port).__name__}")
    if not _MIN_PORT <= port <= _MAX_PORT:
        raise ValueError(f"{what} must be in {_MIN_PORT}..{_MAX_PORT}, got {port}")


class SagePorts:
    """Namespace of SAGE port constants and port helpers; never instantiated."""

    # --- public HTTP ports -------------------------------------------------------------
    GATEWAY_DEFAULT: Final = 8889
    """OpenAI-compatible gateway (the edge service); the one address clients use."""

    LLM_DEFAULT: Final = 8001
    """Primary LLM engine (vLLM or compatible) started by `sage llm serve`."""

    LLM_SECONDARY: Final = 8002
    """Second LLM engine, for running two chat models side by side."""

    LLM_WSL_FALLBACK: Final = 8901
    """LLM port on WSL2, where 8001 can listen yet refuse connections."""

    EMBEDDING_DEFAULT: Final = 8090
    """Primary embedding server (TEI / sentence-transformers / OpenAI-compatible)."""

    EMBEDDING_SECONDARY: Final = 8091
    """Second embedding server, for a second embedding model."""

    BENCHMARK_LLM: Final = 8901
    """LLM engine used by benchmarks; shares 8901 with the WSL2 fallback on purpose."""

    BENCHMARK_EMBEDDING: Final = 8902
    """Embedding engine used by benchmarks."""

    BENCHMARK_API: Final = 8903
    """Gateway/API under test in benchmarks, kept apart from the real gateway."""

    STUDIO_FRONTEND: Final = 5173
    """SAGE Studio web frontend (Vite dev server default)."""

    # --- internal gRPC ports (overridable by env, see grpc_port) ------------------------
    SCHEDULER_GRPC: Final = 50051
    """Scheduler service gRPC (env SAGE_SCHEDULER_PORT)."""

    LIFECYCLE_GRPC: Final = 50052
    """Engine lifecycle service gRPC (env SAGE_LIFECYCLE_PORT)."""

    GPU_MANAGER_GRPC: Final = 50053
    """GPU manager service gRPC (env SAGE_GPU_MANAGER_PORT)."""

    EMBEDDING_GRPC: Final = 50054
    """Embedding batcher service gRPC (env SAGE_EMBEDDING_SERVICE_PORT)."""

    # service name -> (env var, constant name)
    _GRPC_SERVICES: ClassVar[dict[str, tuple[str, str]]] = {
        "scheduler": ("SAGE_SCHEDULER_PORT", "SCHEDULER_GRPC"),
        "lifecycle": ("SAGE_LIFECYCLE_PORT", "LIFECYCLE_GRPC"),
        "gpu_manager": ("SAGE_GPU_MANAGER_PORT", "GPU_MANAGER_GRPC"),
        "embedding": ("SAGE_EMBEDDING_SERVICE_PORT", "EMBEDDING_GRPC"),
    }
    _GRPC_ALIASES: ClassVar[dict[str, str]] = {
        "embedding_service": "embedding",
        "gpu": "gpu_manager",
    }

    # constant name -> purpose, in the order diagnose() reports them
    _PURPOSES: ClassVar[dict[str, str]] = {
        "GATEWAY_DEFAULT": "OpenAI-compatible gateway (edge)",
        "LLM_DEFAULT": "primary LLM engine",
        "LLM_SECONDARY": "secondary LLM engine",
        "LLM_WSL_FALLBACK": "LLM engine on WSL2",
        "EMBEDDING_DEFAULT": "primary embedding server",
        "EMBEDDING_SECONDARY": "secondary embedding server",
        "BENCHMARK_LLM": "benchmark LLM engine",
        "BENCHMARK_EMBEDDING": "benchmark embedding engine",
        "BENCHMARK_API": "benchmark gateway/API",
        "STUDIO_FRONTEND": "SAGE Studio frontend",
        "SCHEDULER_GRPC": "scheduler service (gRPC)",
        "LIFECYCLE_GRPC": "lifecycle service (gRPC)",
        "GPU_MANAGER_GRPC": "GPU manager service (gRPC)",
        "EMBEDDING_GRPC": "embedding batcher service (gRPC)",
    }

    def __new__(cls, *args: object, **kwargs: object) -> SagePorts:
        raise TypeError("SagePorts is a namespace of constants and cannot be instantiated")

    def __init__(self, *args: object, **kwargs: object) -> None:  # pragma: no cover
        raise TypeError("SagePorts is a namespace of constants and cannot be instantiated")

    # --- env --------------------------------------------------------------------------
    @staticmethod
    def get_from_env(var: str, default: int) -> int:
        """Port from env var `var`, or `default` when unset/empty; bad values raise ValueError.

        Failing loudly (instead of silently using the default) keeps a typo in a unit file
        from starting a service on an unexpected port.
        """
        raw = os.environ.get(var)
        if raw is None or not raw.strip():
            return default
        text = raw.strip()
        try:
            port = int(text)
        except ValueError:
            raise ValueError(
                f"environment variable {var}={raw!r} is not an integer port number"
            ) from None
        if not _MIN_PORT <= port <= _MAX_PORT:
            raise ValueError(
                f"environment variable {var}={raw!r} is out of range "
                f"(ports are {_MIN_PORT}..{_MAX_PORT})"
            )
        return port

    @classmethod
    def grpc_port(cls, service: str) -> int:
        """Effective gRPC port of an internal service: env override, else the constant.

        `service` is one of scheduler, lifecycle, gpu_manager, embedding ("-" is read as "_").
        """
        key = service.strip().lower().replace("-", "_")
        key = cls._GRPC_ALIASES.get(key, key)
        try:
            env_var, const = cls._GRPC_SERVICES[key]
        except KeyError:
            known = ", ".join(sorted(cls._GRPC_SERVICES))
            raise ValueError(f"unknown gRPC service {service!r}; known: {known}") from None
        default: int = getattr(cls, const)
        return cls.get_from_env(env_var, default)

    @classmethod
    def grpc_env_var(cls, service: str) -> str:
        """Name of the env var that overrides a service's gRPC port."""
        key = service.strip().lower().replace("-", "_")
        key = cls._GRPC_ALIASES.get(key, key)
        try:
            return cls._GRPC_SERVICES[key][0]
        except KeyError:
            known = ", ".join(sorted(cls._GRPC_SERVICES))
            raise ValueError(f"unknown gRPC service {service!r}; known: {known}") from None

    # --- platform ---------------------------------------------------------------------
    @staticmethod
    def is_wsl(proc_version_path: str | os.PathLike[str] = "/proc/version") -> bool:
        """True under WSL, where 8001 can misbehave; False when /proc/version is unreadable."""
        try:
            text = Path(proc_version_path).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
        return "microsoft" in text.lower()

    @classmethod
    def get_recommended_llm_port(cls) -> int:
        """LLM port to use on this machine: 8901 on WSL2, otherwise 8001."""
        return cls.LLM_WSL_FALLBACK if cls.is_wsl() else cls.LLM_DEFAULT

    @classmethod
    def get_llm_ports(cls) -> list[int]:
        """LLM ports in the order to try them, the recommended one first."""
        ordered = [cls.get_recommended_llm_port(), cls.LLM_DEFAULT, cls.LLM_SECONDARY]
        ordered.append(cls.LLM_WSL_FALLBACK)
        return list(dict.fromkeys(ordered))

    @classmethod
    def get_embedding_ports(cls) -> list[int]:
        """Embedding server ports in the order to try them."""
        return [cls.EMBEDDING_DEFAULT, cls.EMBEDDING_SECONDARY]

    @classmethod
    def get_benchmark_ports(cls) -> list[int]:
        """Ports reserved for benchmark runs (LLM, embedding, API)."""
        return [cls.BENCHMARK_LLM, cls.BENCHMARK_EMBEDDING, cls.BENCHMARK_API]

    # --- probing ----------------------------------------------------------------------
    @staticmethod
    def is_available(port: int, host: str = "localhost", timeout: float = 1.0) -> bool:
        """True iff nothing accepts a TCP connection on host:port within `timeout` seconds."""
        _check_port_number(port)
        try:
            conn = socket.create_connection((host, port), timeout=timeout)
        except OSError:
            return True
        conn.close()
        return False

    @staticmethod
    def _can_bind(port: int, host: str) -> bool:
        """True if a listener could bind host:port now (catches bound-but-idle sockets)."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except OSError:
            return False
        bound_any = False
        for family, socktype, proto, _canon, addr in infos:
            try:
                sock = socket.socket(family, socktype, proto)
            except OSError:
                continue  # address family not supported here
            with sock:
                if os.name != "nt":
                    # Servers set SO_REUSEADDR, so a port in TIME_WAIT counts as free.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(addr)
                except OSError as exc:
                    if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                        return False
                    continue  # e.g. EADDRNOTAVAIL for ::1 with IPv6 off
                bound_any = True
        return bound_any

    @classmethod
    def find_available_port(
        cls, start: int = 8900, end: int = 8999, host: str = "localhost", timeout: float = 0.5
    ) -> int:
        """First port in [start, end] nothing listens on and we could bind; else RuntimeError."""
        _check_port_number(start, "start")
        _check_port_number(end, "end")
        if start > end:
            raise ValueError(f"start ({start}) must not be greater than end ({end})")
        for port in range(start, end + 1):
            if cls.is_available(port, host, timeout=timeout) and cls._can_bind(port, host):
                return port
        raise RuntimeError(f"no available port in range {start}-{end} on {host}")

    @staticmethod
    def _listener(port: int) -> tuple[int | None, str | None]:
        """(pid, process name) listening on `port`, as far as psutil can tell."""
        try:
            import psutil
        except ImportError:  # pragma: no cover - psutil is a dependency
            return None, None
        try:
            conns = psutil.net_connections(kind="tcp")
        except (psutil.Error, OSError):
            return None, None
        for conn in conns:
            laddr = conn.laddr
            if not laddr or conn.status != psutil.CONN_LISTEN or laddr.port != port:
                continue
            if conn.pid is None:
                return None, None
            try:
                return conn.pid, psutil.Process(conn.pid).name()
            except (psutil.Error, OSError):
                return conn.pid, None
        return None, None

    @classmethod
    def check_port_status(
        cls, port: int, host: str = "localhost", timeout: float = 1.0
    ) -> PortStatus:
        """Whether a port is free and, if taken, which process listens (None if unknown)."""
        available = cls.is_available(port, host, timeout=timeout)
        pid: int | None = None
        process: str | None = None
        if not available:
            pid, process = cls._listener(port)
        return PortStatus(
            port=port,
            host=host,
            available=available,
            in_use=not available,
            pid=pid,
            process=process,
        )

    @classmethod
    def known_ports(cls) -> list[tuple[str, int, str]]:
        """(constant name, default port, purpose) for every constant above."""
        return [(name, getattr(cls, name), purpose) for name, purpose in cls._PURPOSES.items()]

    @classmethod
    def diagnose(cls, host: str = "localhost", timeout: float = 0.5) -> PortDiagnosis:
        """Status of every known port (effective gRPC ports honour env overrides)."""
        env_by_const = {const: env for env, const in cls._GRPC_SERVICES.values()}
        status_cache: dict[int, PortStatus] = {}
        reports: list[PortReport] = []
        for name, default, purpose in cls.known_ports():
            env_var = env_by_const.get(name)
            port = default
            error: str | None = None
            if env_var is not None:
                try:
                    port = cls.get_from_env(env_var, default)
                except ValueError as exc:
                    error = str(exc)
            if port not in status_cache:
                status_cache[port] = cls.check_port_status(port, host, timeout=timeout)
            st = status_cache[port]
            reports.append(
                PortReport(
                    name=name,
                    port=port,
                    purpose=purpose,
                    env_var=env_var,
                    available=st["available"],
                    in_use=st["in_use"],
                    pid=st["pid"],
                    process=st["process"],
                    error=error,
                )
            )
        return PortDiagnosis(
            host=host,
            is_wsl=cls.is_wsl(),
            recommended_llm_port=cls.get_recommended_llm_port(),
            ports=reports,
        )

    @staticmethod
    def format_diagnosis(report: PortDiagnosis) -> str:
        """Human-readable table of a `diagnose()` report, for the CLI."""
        lines = [
            f"host: {report['host']}  WSL: {'yes' if report['is_wsl'] else 'no'}  "
            f"recommended LLM port: {report['recommended_llm_port']}",
            f"{'NAME':<20} {'PORT':>5}  {'STATE':<6} {'PROCESS':<24} PURPOSE",
        ]
        for p in report["ports"]:
            state = "free" if p["available"] else "in use"
            proc = ""
            if p["in_use"]:
                proc = f"{p['process'] or '?'} (pid {p['pid']})" if p["pid"] else "unknown"
            line = f"{p['name']:<20} {p['port']:>5}  {state:<6} {proc:<24} {p['purpose']}"
            if p["error"]:
                line += f"  [error: {p['error']}]"
            lines.append(line)
        return "\n".join(lines)
