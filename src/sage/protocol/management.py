"""SAGE's management API (`/v1/management/*`): request bodies and replies.

The edge decodes bodies into these Structs (`sage.protocol.openai.decode`: strict, errors
name the field) and builds its replies from them, and the OpenAPI document's management
schemas are generated from them (`json_schemas`), so document, validation and replies
cannot drift apart. Request bodies are closed: an unknown field is a 400, since a misspelt
`tensor_parallel_size` silently ignored would start the wrong engine.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from sage.protocol.openai import INT32_MAX, NOT_BLANK

__all__ = [
    "MAX_LORA_RANK",
    "Adapter",
    "AdapterList",
    "Backend",
    "BackendList",
    "ControlPlane",
    "ControlPlaneMetrics",
    "Engine",
    "EngineList",
    "EngineLogs",
    "Gpu",
    "GpuStatus",
    "Health",
    "ManagementStatus",
    "ModelStats",
    "Node",
    "NodeGpu",
    "NodeList",
    "PlacementPreview",
    "PresetList",
    "PruneRequest",
    "PruneResult",
    "RegisterEngineRequest",
    "StartEngineRequest",
    "TimeSeries",
    "json_schemas",
]

# vLLM's largest --max-lora-rank.
MAX_LORA_RANK = 512

NonBlank = Annotated[str, msgspec.Meta(min_length=1, pattern=NOT_BLANK)]
Kind = Literal["llm", "embedding"]


def _int(low: int, high: int = INT32_MAX, description: str = "") -> msgspec.Meta:
    return msgspec.Meta(ge=low, le=high, description=description or None)


def _one_of(*values: str) -> msgspec.Meta:
    """A reply string with known values (typed `str` so builders pass names through)."""
    return msgspec.Meta(extra_json_schema={"enum": list(values)})


class _Body(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A request body: keyword fields, unknown fields refused."""


class _Reply(msgspec.Struct, kw_only=True):
    """A reply: every field always present (clients and the dashboard read them by key)."""


# Request bodies


class StartEngineRequest(_Body):
    """SAGE's engine start request; `model` and `kind` are accepted as aliases of
    `model_id` and `engine_kind`."""

    # Alias pairs: the first name wins, but each given name is checked (UNSET: not given).
    model_id: msgspec.UnsetType | NonBlank = msgspec.UNSET
    model: msgspec.UnsetType | NonBlank = msgspec.UNSET
    engine_kind: Annotated[
        msgspec.UnsetType | Kind, msgspec.Meta(extra_json_schema={"default": "llm"})
    ] = msgspec.UNSET
    kind: msgspec.UnsetType | Kind = msgspec.UNSET
    backend: Annotated[str | None, msgspec.Meta(examples=["auto", "vllm", "sim"])] = None
    tensor_parallel_size: Annotated[int, _int(1)] | None = None
    pipeline_parallel_size: Annotated[int, _int(1)] | None = None
    port: Annotated[int, _int(0, description="0 picks a free port.")] | None = None
    required_memory_gb: Annotated[float, msgspec.Meta(ge=0)] | None = None
    gpu_memory_utilization: Annotated[float, msgspec.Meta(ge=0)] | None = None
    engine_label: msgspec.UnsetType | str | None = msgspec.UNSET
    label: msgspec.UnsetType | str | None = msgspec.UNSET
    max_concurrent_requests: Annotated[int, _int(0)] | None = None
    max_model_len: Annotated[int, _int(0)] | None = None
    use_gpu: bool | None = None
    extra_args: list[str] | None = None
    aliases: list[str] | None = None
    role: Annotated[
        Literal["both", "prefill", "decode"] | None,
        msgspec.Meta(
            description="PD routing: prefill / decode engines serve the two legs of a "
            "disaggregated request; both (or null) serves whole requests.",
        ),
    ] = None
    metadata: dict[str, str | int | float | bool] | None = None
    engine_id: str | None = None
    startup_timeout_s: Annotated[int, _int(1)] | None = None
    wait: Annotated[
        bool, msgspec.Meta(description="false: answer 202 at once with the engine STARTING.")
    ] = True
    node: Annotated[
        str | None,
        msgspec.Meta(
            description="Node (GPU host) to start on; empty lets the scheduler place it: most "
            "free GPU memory with all tensor-parallel GPUs on one host, or the least-loaded "
            "node for CPU engines."
        ),
    ] = None
    dry_run: Annotated[
        bool,
        msgspec.Meta(description="true: answer 200 with the node it would go to, start nothing."),
    ] = False
    enable_lora: Annotated[
        bool, msgspec.Meta(description="Let LoRA adapters be loaded at run time (vllm, sim).")
    ] = False
    max_lora_rank: (
        Annotated[int, _int(0, MAX_LORA_RANK, "Highest LoRA rank; 0: the engine's.")] | None
    ) = None
    join_existing_model: Annotated[
        bool,
        msgspec.Meta(
            description="Registering: register it even though engines lifecycle started "
            "serve this model (it then shares their traffic); otherwise that is a 409. "
            "Starting ignores it."
        ),
    ] = False

    def __post_init__(self) -> None:
        if self.model_id is msgspec.UNSET and self.model is msgspec.UNSET:
            raise ValueError("`model_id` is required")

    @property
    def model_name(self) -> str:
        name = self.model_id if self.model_id is not msgspec.UNSET else self.model
        assert name is not msgspec.UNSET  # __post_init__
        return name

    @property
    def engine_kind_name(self) -> Kind:
        if self.engine_kind is not msgspec.UNSET:
            return self.engine_kind
        return "llm" if self.kind is msgspec.UNSET else self.kind

    @property
    def label_text(self) -> str:
        label = self.engine_label if self.engine_label is not msgspec.UNSET else self.label
        return label if isinstance(label, str) else ""


class RegisterEngineRequest(StartEngineRequest, kw_only=True):
    """An already-running OpenAI-compatible server to route to: the start request's
    fields plus its base_url."""

    base_url: Annotated[str, msgspec.Meta(pattern="^https?://")]


class PruneRequest(msgspec.Struct):
    """No fields (`{}`): a JSON body, like every state-changing request."""


class Adapter(_Body):
    """A LoRA adapter: the name requests send as `model`, and the folder
    (adapter_config.json + weights, on the engine's host) it loads from."""

    name: NonBlank
    path: NonBlank


# Replies


class Engine(_Reply):
    """An engine as lifecycle knows it."""

    engine_id: str
    model_id: str
    engine_kind: Annotated[str, _one_of("llm", "embedding", "unspecified")]
    role: Annotated[str, _one_of("both", "prefill", "decode")]
    backend: str
    status: Annotated[
        str, _one_of("STARTING", "RUNNING", "STOPPING", "STOPPED", "FAILED", "UNKNOWN")
    ]
    host: str
    port: int
    base_url: str
    pid: int | None
    gpu_ids: list[int]
    engine_label: str
    restart_count: int
    started_at: float | None
    error: str | None
    metadata: dict[str, str]
    node_id: Annotated[str | None, msgspec.Meta(description="Node it runs on.")]
    lora_enabled: Annotated[bool, msgspec.Meta(description="LoRA adapters can be loaded.")]
    adapters: list[Adapter]


class EngineList(_Reply):
    engines: list[Engine]
    count: int


class AdapterList(_Reply):
    engine_id: str
    adapters: list[Adapter]


class EngineLogs(_Reply):
    engine_id: str
    lines: list[str]


class PruneResult(_Reply):
    pruned: list[str]
    count: int


class NodeGpu(_Reply):
    index: int
    name: str
    memory_total_bytes: int
    memory_free_bytes: int


class Node(_Reply):
    """A node (GPU host) of the scheduler's table."""

    node_id: str
    state: Annotated[str, _one_of("ready", "unhealthy", "down", "unknown")]
    reason: Annotated[str | None, msgspec.Meta(description="Why unhealthy or down.")]
    lifecycle_addr: str
    advertise_host: str | None
    static: Annotated[bool, msgspec.Meta(description="Listed in SAGE_NODES (polled).")]
    last_seen_s_ago: float | None
    gpu_count: int
    gpus: list[NodeGpu]
    engines: Annotated[int, msgspec.Meta(description="Engines in the routing table.")]
    engine_ids: list[str]


class NodeList(_Reply):
    nodes: list[Node]
    count: int


class PlacementPreview(_Reply):
    """dry_run=true: the node the engine would go to (null: the edge's own lifecycle)."""

    dry_run: bool
    node: Node | None


class Backend(_Reply):
    name: str
    kinds: list[str]
    uses_gpu: bool
    available: bool
    reason: str


class BackendList(_Reply):
    backends: list[Backend]


class Gpu(_Reply):
    index: int
    uuid: str
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    memory_free_bytes: int
    memory_reserved_bytes: int
    memory_available_bytes: int
    utilization_percent: float
    temperature_celsius: float
    engine_ids: list[str]


class GpuStatus(_Reply):
    nvml_available: bool
    nvml_error: str | None
    driver_version: str | None
    gpus: list[Gpu]


class ModelStats(_Reply):
    model: str
    p50_ms: float
    p95_ms: float
    p99_ms: float
    ttft_p50_ms: float
    tpot_p50_ms: float
    rps: float
    slo_attainment: float
    queued: int


class ControlPlaneMetrics(_Reply):
    requests_total: int
    requests_failed: int
    models: list[ModelStats]


class SchedulerReplica(_Reply):
    """One scheduler replica as this edge sees it."""

    address: str
    state: Literal["up", "down"]


class ControlPlane(_Reply):
    policy: str
    pending_requests: int
    running_requests: int
    instances: int
    instances_ready: int
    metrics: ControlPlaneMetrics
    # The replica that runs the autoscaler and placement ("" when the scheduler answering
    # does not know one: etcd unreachable), and every replica this edge sends requests to;
    # the figures above are the answering replica's own.
    scheduler_leader: str = ""
    scheduler_replicas: list[SchedulerReplica] = msgspec.field(default_factory=list)


class ManagementStatus(_Reply):
    llm_available: bool
    embedding_available: bool
    control_plane: ControlPlane
    gpu: GpuStatus | None
    nodes: list[Node]
    engines: list[Engine]
    count: int


class Health(_Reply):
    status: Literal["ok", "unavailable"]
    engines_ready: msgspec.UnsetType | int = msgspec.UNSET
    scheduler: Annotated[
        msgspec.UnsetType | str, msgspec.Meta(description="Why the scheduler is unreachable.")
    ] = msgspec.UNSET


class ModelPoint(_Reply):
    rps: float
    tokens_per_s: float
    ttft_p50_ms: float
    tpot_p50_ms: float
    p95_ms: float
    slo_attainment: float
    queued: int


class Sample(_Reply):
    t: Annotated[float, msgspec.Meta(description="Unix seconds.")]
    queued: int
    in_flight: int
    requests_total: int
    requests_failed: int
    models: dict[str, ModelPoint]
    engine_in_flight: dict[str, float]


class ErrorEvent(_Reply):
    t: float
    source: str
    message: str


class TimeSeries(_Reply):
    """The scheduler's numbers sampled by the edge every interval_s seconds over the last
    window_s seconds (the dashboard's charts), plus recent errors."""

    interval_s: float
    window_s: float
    policy: str | None
    samples: list[Sample]
    errors: list[ErrorEvent]


class PresetEngine(_Reply):
    name: str
    model_id: str
    engine_kind: str
    engine_label: str
    start: Annotated[
        dict[str, Any], msgspec.Meta(description="The StartEngineRequest that starts it.")
    ]


class Preset(_Reply):
    name: str
    description: str
    engines: list[PresetEngine]


class PresetList(_Reply):
    """Built-in presets; each engine carries the body that starts it with
    POST /v1/management/engines, as `sage llm preset apply` would."""

    presets: list[Preset]


SCHEMA_MODELS: tuple[type[msgspec.Struct], ...] = (
    StartEngineRequest,
    RegisterEngineRequest,
    PruneRequest,
    Adapter,
    Engine,
    EngineList,
    AdapterList,
    EngineLogs,
    PruneResult,
    NodeList,
    PlacementPreview,
    BackendList,
    GpuStatus,
    ManagementStatus,
    Health,
    TimeSeries,
    PresetList,
)
# What a Struct cannot say itself: one of the alias pair is required.
_MODEL_REQUIRED = {"anyOf": [{"required": ["model_id"]}, {"required": ["model"]}]}
_EXTRA: dict[str, dict[str, Any]] = {
    "StartEngineRequest": {
        **_MODEL_REQUIRED,
        "examples": [{"model_id": "sim", "backend": "sim", "engine_kind": "llm"}],
    },
    "RegisterEngineRequest": {
        **_MODEL_REQUIRED,
        "examples": [{"model_id": "my-model", "base_url": "http://127.0.0.1:8000"}],
    },
}


def json_schemas(ref_prefix: str = "#/components/schemas/") -> dict[str, Any]:
    """JSON Schemas of every body and reply, by name, with refs under `ref_prefix`."""
    _, schemas = msgspec.json.schema_components(SCHEMA_MODELS, ref_template=ref_prefix + "{name}")
    for name, schema in schemas.items():
        schema.pop("title", None)
        schema.update(_EXTRA.get(name, {}))
    return schemas
