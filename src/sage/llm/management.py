"""ManagementClient: the `/v1/management/*` HTTP API of a running SAGE gateway.

Used by `sage llm engine|preset|logs` and by scripts that start and stop engines at run
time. Sync on purpose: the CLI and presets call one route at a time and wait for it.
Errors come back as `sage.common.exceptions` types rebuilt from the OpenAI error JSON, so
callers handle a refused start the same way whether it came over HTTP or gRPC.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field

from sage.common.config.ports import SagePorts
from sage.common.config.settings import SageSettings, load_settings
from sage.common.error_bodies import loads_error_body
from sage.common.exceptions import (
    AuthenticationError,
    ConflictError,
    DeadlineExceededError,
    EngineNotFoundError,
    EngineStartError,
    InsufficientResourcesError,
    InternalError,
    InvalidRequestError,
    ModelNotFoundError,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
    RateLimitError,
    SageError,
    ServiceUnavailableError,
    UpstreamError,
)
from sage.common.grpc.tls import process_tls
from sage.common.security import (
    admin_key_path,
    is_loopback_host,
    is_wildcard_host,
    listener_uid,
    local_interface_addresses,
    read_secret_file,
    resolves_to,
)

__all__ = [
    "ADMIN_KEY_ENV",
    "BackendInfo",
    "EngineInfo",
    "EngineKind",
    "EngineStatus",
    "ManagementClient",
    "admin_key_for",
    "ensure_model_served",
    "error_from_response",
    "is_this_machine",
    "model_is_served",
    "new_lines",
    "resolve_base_url",
]

log = logging.getLogger(__name__)

# Where the admin key comes from when none is passed (read through SageSettings).
ADMIN_KEY_ENV = "SAGE_ADMIN_API_KEY"
# Server-side default start timeout; a waiting POST may take this long plus slack.
DEFAULT_STARTUP_TIMEOUT_S = 600.0
# An adapter load reads its weights in the engine (the gateway allows it 150 s).
ADAPTER_TIMEOUT_S = 160.0
_START_SLACK_S = 30.0

EngineKind = Literal["llm", "embedding"]
EngineStatus = Literal["STARTING", "RUNNING", "STOPPING", "STOPPED", "FAILED"]


class AdapterInfo(BaseModel):
    """A LoRA adapter loaded on an engine: the name requests send as `model`, and where the
    engine loaded it from."""

    model_config = ConfigDict(extra="allow")

    name: str
    path: str


class EngineInfo(BaseModel):
    """One engine as the management API reports it.

    Unknown fields are kept (extra="allow") so a newer gateway never breaks an older CLI.
    """

    model_config = ConfigDict(extra="allow")

    engine_id: str
    model_id: str
    engine_kind: str = "llm"
    backend: str = ""
    status: str = "STARTING"
    host: str = ""
    port: int | None = None
    base_url: str = ""
    pid: int | None = None
    gpu_ids: list[int] = Field(default_factory=list)
    engine_label: str | None = None
    restart_count: int = 0
    started_at: float | None = None
    error: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    lora_enabled: bool = False
    adapters: list[AdapterInfo] = Field(default_factory=list)


class BackendInfo(BaseModel):
    """An engine backend the lifecycle service knows (`GET /v1/management/backends`)."""

    model_config = ConfigDict(extra="allow")

    name: str
    kinds: list[str] = Field(default_factory=list)
    uses_gpu: bool = False
    available: bool = True
    reason: str | None = None


# Specific codes first: they say more than the HTTP status does.
_BY_CODE: dict[str, type[SageError]] = {
    cls.default_code: cls
    for cls in (
        EngineNotFoundError,
        ModelNotFoundError,
        InsufficientResourcesError,
        EngineStartError,
        RateLimitError,
        AuthenticationError,
    )
    if cls.default_code is not None
}

_BY_STATUS: dict[int, type[SageError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: InvalidRequestError,
    422: InvalidRequestError,
    429: OverloadedError,
    500: InternalError,
    502: UpstreamError,
    503: ServiceUnavailableError,
    504: DeadlineExceededError,
}


def error_from_response(resp: httpx.Response) -> SageError:
    """The SageError an error response stands for, keeping its message, param and code."""
    body = loads_error_body(resp.content)
    message = (body.message if body else None) or resp.text[:300] or f"HTTP {resp.status_code}"
    param = body.param if body else None
    code = str(body.code) if body and body.code is not None else None
    retry_after = resp.headers.get("retry-after")
    cls = _BY_CODE.get(code or "") or _BY_STATUS.get(resp.status_code)
    if cls is None:
        cls = InvalidRequestError if 400 <= resp.status_code < 500 else InternalError
    if cls is ModelNotFoundError:
        error: SageError = ModelNotFoundError(param or "model", message=message)
        error.code = code
        return error
    try:
        seconds = float(retry_after) if retry_after else None
    except ValueError:
        seconds = None
    return cls(message, param=param, code=code, retry_after=seconds)


def _live_daemon_gateway(home: Path) -> str | None:
    """`gateway_url` of a running `sage llm serve`, if its daemon.json is live."""
    try:
        doc = json.loads((home / "llm" / "daemon.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("gateway_url"), str):
        return None
    try:
        os.kill(int(doc.get("pid") or 0), 0)
    except (ProcessLookupError, ValueError, OverflowError):
        return None
    except PermissionError:
        pass  # alive, owned by someone else
    return str(doc["gateway_url"])


def resolve_base_url(base_url: str | None = None, settings: SageSettings | None = None) -> str:
    """argument > SAGE_UNIFIED_BASE_URL > live daemon.json gateway_url > local default.

    Always ends in `/v1`: management routes live under it, and users often paste the
    gateway's root URL.
    """
    url = base_url
    if not url:
        settings = settings or load_settings()
        url = settings.unified_base_url or _live_daemon_gateway(settings.home)
    if not url:
        url = f"http://localhost:{SagePorts.GATEWAY_DEFAULT}/v1"
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def is_this_machine(host: str) -> bool:
    """True when `host` (a URL's host) is loopback or resolves only to this machine's own
    interface addresses."""
    if is_loopback_host(host) or is_wildcard_host(host):
        return True
    found = resolves_to(host)
    if not found:
        return False
    mine = local_interface_addresses()
    return all(ip.is_loopback or ip in mine for ip in found)


def admin_key_for(base_url: str, settings: SageSettings) -> str | None:
    """The admin key a client sends on /v1/management/*: SAGE_ADMIN_API_KEY, else the key
    file `sage llm serve` wrote ($SAGE_HOME/llm/admin.key), else None.

    The file is this machine's stack's secret, so it is sent only to a gateway on this
    machine, never to another host. A file that exists but is unreadable or readable by
    others raises ConfigurationError naming it.
    """
    if settings.admin_api_key:
        return settings.admin_api_key
    parts = urlsplit(base_url)
    if not is_this_machine(parts.hostname or ""):
        return None
    key = read_secret_file(admin_key_path(settings))
    if key is None:
        return None
    # While the stack is down, any local user may bind the free gateway port and wait for
    # the key: send it only to a listener run by this user.
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if listener_uid(port) != os.geteuid():
        return None
    return key


def _admin_hint(settings: SageSettings | None) -> str:
    where = admin_key_path(settings) if settings else "$SAGE_HOME/llm/admin.key"
    return (
        f" (management needs the admin key: --api-key, SAGE_ADMIN_API_KEY, or {where} "
        "written by `sage llm serve` on this machine)"
    )


class ManagementClient:
    """Start, list, stop and inspect engines through a SAGE gateway's management API.

    Without `api_key` it sends the admin key `admin_key_for` finds, so the CLI works on
    the machine running `sage llm serve` with no configuration.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        settings = load_settings() if base_url is None or api_key is None else None
        self.base_url = resolve_base_url(base_url, settings)
        self.timeout = timeout
        # An explicit key (even "": none) wins; else SAGE_ADMIN_API_KEY, else the key file.
        key = api_key if api_key is not None or settings is None else None
        if api_key is None and settings is not None:
            key = admin_key_for(self.base_url, settings)
        self._settings = settings
        headers = {"authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=timeout,
            headers=headers,
            trust_env=False,
            transport=transport,
            verify=process_tls().httpx_verify(),  # an https gateway: SAGE_TLS_CA_FILE
        )

    def __enter__(self) -> ManagementClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _request(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        try:
            resp = self._http.request(
                method,
                path,
                json=dict(body) if body is not None else None,
                params=dict(params) if params else None,
                timeout=timeout if timeout is not None else self.timeout,
            )
        except httpx.ConnectError as exc:
            raise ServiceUnavailableError(
                f"no SAGE gateway at {self.base_url}; start it with `sage llm serve`"
            ) from exc
        except httpx.TimeoutException as exc:
            raise DeadlineExceededError(
                f"the gateway at {self.base_url} did not answer {method} {path} in time"
            ) from exc
        except httpx.HTTPError as exc:
            raise ServiceUnavailableError(
                f"talking to the gateway at {self.base_url} failed: {exc}"
            ) from exc
        if resp.status_code >= 400:
            error = error_from_response(resp)
            if resp.status_code in (401, 403):
                error.message += _admin_hint(self._settings)
                error.args = (error.message,)
            raise error
        try:
            return resp.json()
        except ValueError as exc:
            raise UpstreamError(
                f"the gateway at {self.base_url} sent non-JSON for {method} {path}"
            ) from exc

    def start_engine(
        self,
        model_id: str,
        *,
        engine_kind: EngineKind = "llm",
        backend: str = "auto",
        tensor_parallel_size: int | None = None,
        pipeline_parallel_size: int | None = None,
        port: int | None = None,
        required_memory_gb: float | None = None,
        engine_label: str | None = None,
        max_concurrent_requests: int | None = None,
        use_gpu: bool | None = None,
        extra_args: Sequence[str] | None = None,
        metadata: Mapping[str, str] | None = None,
        engine_id: str | None = None,
        startup_timeout_s: int | None = None,
        wait: bool = True,
        role: str | None = None,
        enable_lora: bool = False,
        max_lora_rank: int | None = None,
    ) -> EngineInfo:
        """Start an engine; with `wait` the call returns once it is RUNNING (or raises).
        `role` (both / prefill / decode) places it in PD (disaggregated) routing;
        `enable_lora` lets LoRA adapters be loaded on it (vllm, sim)."""
        body: dict[str, Any] = {
            "model_id": model_id,
            "engine_kind": engine_kind,
            "backend": backend,
            "use_gpu": use_gpu,
            "wait": wait,
        }
        optional: dict[str, Any] = {
            "tensor_parallel_size": tensor_parallel_size,
            "pipeline_parallel_size": pipeline_parallel_size,
            "port": port,
            "required_memory_gb": required_memory_gb,
            "engine_label": engine_label,
            "max_concurrent_requests": max_concurrent_requests,
            "extra_args": list(extra_args) if extra_args is not None else None,
            "metadata": dict(metadata) if metadata is not None else None,
            "engine_id": engine_id,
            "startup_timeout_s": startup_timeout_s,
            "role": role,
            "enable_lora": enable_lora or None,
            "max_lora_rank": max_lora_rank,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        budget = (startup_timeout_s or DEFAULT_STARTUP_TIMEOUT_S) + _START_SLACK_S
        timeout = max(self.timeout, budget) if wait else self.timeout
        return EngineInfo.model_validate(
            self._request("POST", "/management/engines", body=body, timeout=timeout)
        )

    def register_engine(
        self,
        model_id: str,
        base_url: str,
        *,
        engine_kind: EngineKind = "llm",
        engine_id: str | None = None,
        engine_label: str | None = None,
        join_existing_model: bool = False,
    ) -> EngineInfo:
        """Put an already running OpenAI-compatible endpoint behind the gateway. Lifecycle
        first checks that it serves `model_id`; `join_existing_model` lets it share a model
        that engines lifecycle started already serve (refused otherwise)."""
        body: dict[str, Any] = {
            "model_id": model_id,
            "base_url": base_url,
            "engine_kind": engine_kind,
        }
        if join_existing_model:
            body["join_existing_model"] = True
        if engine_id is not None:
            body["engine_id"] = engine_id
        if engine_label is not None:
            body["engine_label"] = engine_label
        return EngineInfo.model_validate(
            self._request("POST", "/management/engines/register", body=body)
        )

    def list_engines(self) -> list[EngineInfo]:
        """Every engine lifecycle knows, in any status."""
        doc = self._request("GET", "/management/engines")
        return [EngineInfo.model_validate(e) for e in doc.get("engines", [])]

    def get_engine(self, engine_id: str) -> EngineInfo:
        """One engine; EngineNotFoundError/NotFoundError if there is none."""
        return EngineInfo.model_validate(
            self._request("GET", f"/management/engines/{_segment(engine_id)}")
        )

    def stop_engine(self, engine_id: str, drain: bool = False) -> EngineInfo:
        """Stop an engine (after its in-flight requests finish, with `drain`)."""
        params = {"drain": "true"} if drain else None
        # Draining waits for requests in flight, so allow as long as a start may take.
        timeout = max(self.timeout, DEFAULT_STARTUP_TIMEOUT_S) if drain else None
        return EngineInfo.model_validate(
            self._request(
                "DELETE",
                f"/management/engines/{_segment(engine_id)}",
                params=params,
                timeout=timeout,
            )
        )

    def load_adapter(self, engine_id: str, name: str, path: str) -> EngineInfo:
        """Load LoRA adapter `name` from `path` (on the engine's host) on an engine started
        with LoRA enabled; requests naming `name` as their model then go to it."""
        return EngineInfo.model_validate(
            self._request(
                "POST",
                f"/management/engines/{_segment(engine_id)}/adapters",
                body={"name": name, "path": path},
                timeout=max(self.timeout, ADAPTER_TIMEOUT_S),
            )
        )

    def unload_adapter(self, engine_id: str, name: str) -> EngineInfo:
        """Unload LoRA adapter `name` from an engine."""
        return EngineInfo.model_validate(
            self._request(
                "DELETE",
                f"/management/engines/{_segment(engine_id)}/adapters/{quote(name, safe='')}",
                timeout=max(self.timeout, ADAPTER_TIMEOUT_S),
            )
        )

    def prune(self) -> list[str]:
        """Forget STOPPED and FAILED engines; returns the ids removed."""
        doc = self._request("POST", "/management/engines/prune", body={})
        return [str(i) for i in doc.get("pruned", [])]

    def engine_logs(self, engine_id: str, lines: int = 100) -> list[str]:
        """The last `lines` lines of an engine's output."""
        doc = self._request(
            "GET", f"/management/engines/{_segment(engine_id)}/logs", params={"lines": lines}
        )
        return [str(line) for line in doc.get("lines", [])]

    def status(self) -> dict[str, Any]:
        """Control-plane status (`llm_available`, `embedding_available`, counts)."""
        return dict(self._request("GET", "/management/status"))

    def backends(self) -> list[BackendInfo]:
        """Engine backends and whether each can run on this host."""
        doc = self._request("GET", "/management/backends")
        return [BackendInfo.model_validate(b) for b in doc.get("backends", [])]

    def gpu(self) -> dict[str, Any]:
        """GPU readings and reservations, as the GPU manager reports them."""
        return dict(self._request("GET", "/management/gpu"))

    def wait_until_running(
        self,
        engine: EngineInfo,
        *,
        timeout: float,
        poll_interval: float = 0.5,
        deadline: float | None = None,
        logger: logging.Logger = log,
    ) -> EngineInfo:
        """Poll a started engine until RUNNING, logging its status changes and new log
        lines to `logger`; EngineStartError if it fails, DeadlineExceededError after
        `timeout` seconds (or at the monotonic `deadline`), while it keeps starting."""
        deadline = time.monotonic() + timeout if deadline is None else deadline
        status = ""
        shown: list[str] = []
        while True:
            if engine.status != status:
                status = engine.status
                logger.info("engine %s (%s): %s", engine.engine_id, engine.model_id, status)
            try:
                tail = self.engine_logs(engine.engine_id, 50)
            except SageError:
                tail = []  # external engines have no logs; progress is only the status
            for line in new_lines(shown, tail):
                logger.info("engine %s | %s", engine.engine_id, line)
            shown = tail
            if status == "RUNNING":
                return engine
            if status in ("FAILED", "STOPPED", "STOPPING"):
                detail = "\n".join(tail[-20:])
                raise EngineStartError(
                    f"engine {engine.engine_id} for {engine.model_id} is {status}: "
                    f"{engine.error or 'no error recorded'}"
                    + (f"\nlast log lines:\n{detail}" if detail else "")
                )
            if time.monotonic() >= deadline:
                raise DeadlineExceededError(
                    f"engine {engine.engine_id} for {engine.model_id} is not RUNNING after "
                    f"{timeout:g}s (still {status}); it keeps starting - see "
                    f"`sage llm engine logs {engine.engine_id}`"
                )
            time.sleep(poll_interval)
            engine = self.get_engine(engine.engine_id)


def new_lines(previous: Sequence[str], current: Sequence[str]) -> list[str]:
    """Lines of `current` not already seen at the end of `previous` (both are log tails).

    The largest suffix of `previous` that `current` starts with is what both polls saw.
    """
    for overlap in range(min(len(previous), len(current)), 0, -1):
        if list(previous[len(previous) - overlap :]) == list(current[:overlap]):
            return list(current[overlap:])
    return list(current)


def model_is_served(models: Sequence[Mapping[str, Any]], model_id: str, kind: str) -> bool:
    """Whether a /v1/models listing has `model_id` of `kind` with a ready engine."""
    return any(
        entry.get("id") == model_id
        and entry.get("kind", "llm") == kind
        and (entry.get("ready_engines") is None or int(entry.get("ready_engines") or 0) > 0)
        for entry in models
    )


def ensure_model_served(
    base_url: str,
    model_id: str,
    *,
    list_models: Callable[[], list[dict[str, Any]]],
    admin_api_key: str | None = None,
    engine_kind: EngineKind = "llm",
    backend: str = "auto",
    tensor_parallel_size: int = 1,
    required_memory_gb: float | None = None,
    auto_start: bool = True,
    prefer_existing: bool = True,
    wait_timeout: float = 600.0,
    poll_interval: float = 0.5,
    logger: logging.Logger = log,
) -> EngineInfo | None:
    """Return once the gateway at `base_url` routes `model_id` to a ready engine.

    Returns the engine waited for or started, or None when the gateway already served
    the model (it may be an alias or an externally registered endpoint lifecycle never
    started). Blocking; the async client runs it in a thread. Progress goes to `logger`.
    """
    deadline = time.monotonic() + wait_timeout
    if (prefer_existing or not auto_start) and model_is_served(
        list_models(), model_id, engine_kind
    ):
        logger.info("model %s is served by %s", model_id, base_url)
        return None
    with ManagementClient(base_url, api_key=admin_api_key) as mgmt:
        candidates = (
            [
                e
                for e in mgmt.list_engines()
                if e.model_id == model_id
                and e.engine_kind == engine_kind
                and e.status in ("RUNNING", "STARTING")
            ]
            if prefer_existing or not auto_start
            else []
        )
        if candidates:
            engine = min(candidates, key=lambda e: e.status != "RUNNING")
            logger.info("waiting for engine %s serving %s", engine.engine_id, model_id)
        elif not auto_start:
            raise ModelNotFoundError(
                model_id,
                message=f"no running engine serves `{model_id}` at {base_url}; start one with "
                f"`sage llm engine start {model_id}` or pass auto_start=True",
            )
        else:
            engine = mgmt.start_engine(
                model_id,
                engine_kind=engine_kind,
                backend=backend,
                tensor_parallel_size=tensor_parallel_size,
                required_memory_gb=required_memory_gb,
                startup_timeout_s=max(1, math.ceil(wait_timeout)),
                wait=False,
            )
            logger.info(
                "starting engine %s for %s (backend %s) through %s",
                engine.engine_id,
                model_id,
                engine.backend or backend,
                base_url,
            )
        engine = mgmt.wait_until_running(
            engine,
            timeout=wait_timeout,
            poll_interval=poll_interval,
            deadline=deadline,
            logger=logger,
        )
    # Lifecycle marks RUNNING as it registers the engine; the route may trail by a moment.
    while not model_is_served(list_models(), model_id, engine_kind):
        if time.monotonic() >= deadline:
            raise DeadlineExceededError(
                f"engine {engine.engine_id} is RUNNING but the gateway does not route "
                f"`{model_id}` after {wait_timeout:g}s"
            )
        time.sleep(poll_interval)
    return engine


def _segment(engine_id: str) -> str:
    """An engine id as one URL path segment (ids never legitimately hold '/')."""
    if not engine_id or "/" in engine_id:
        raise InvalidRequestError(f"invalid engine id {engine_id!r}", param="engine_id")
    return engine_id
