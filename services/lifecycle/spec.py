"""What a caller asks lifecycle to run (validated before anything starts)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sage.common.exceptions import InvalidRequestError

# Model names go to engines as one argv element (never through a shell), but names with
# shell or control characters are refused outright: they are never legitimate model ids.
_BAD_MODEL_CHARS = re.compile(r"[;&|`$<>(){}!*?\"'\\\s\x00-\x1f]")

KINDS = ("llm", "embedding")
_CONCURRENCY_FLAGS = ("--max-num-seqs", "--max-concurrent-requests")
# Backends whose concurrency lifecycle declares when the spec does not: our transformers
# engine holds new requests back until enough wait to prefill together, so its gauges show
# requests waiting below its limit and the scheduler could not measure it (its default
# --max-num-seqs).
DEFAULT_DECLARED_CONCURRENCY = {"transformers": 64}


@dataclass(frozen=True)
class EngineSpec:
    """One engine to start: model, role (kind), backend and resources."""

    model: str
    kind: str = "llm"  # the seed's --engine-kind: llm | embedding
    backend: str = ""  # "" or "auto" = pick (see backends.resolve_backend)
    port: int = 0  # 0 = pick a free one
    host: str = "127.0.0.1"
    engine_id: str = ""
    base_url: str = ""  # set: an external engine, nothing to launch
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    gpu_memory_utilization: float = 0.0
    required_memory_gb: float = 0.0  # 0 = estimate (vLLM CPU builds: KV cache GiB)
    use_gpu: bool | None = None  # None = when the backend and host allow
    max_concurrent_requests: int = 0
    cpu_threads: int = 0  # vLLM CPU builds: OpenMP threads (0 = vLLM binds cores itself)
    max_model_len: int = 0
    label: str = ""
    extra_args: tuple[str, ...] = ()
    startup_timeout_s: float = 300.0
    aliases: tuple[str, ...] = ()
    role: str = "both"  # both | prefill | decode (PD routing)
    labels: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    # External engines only: serve a model that engines lifecycle started already serve
    # (their traffic is then shared with it). Off, such a registration is a conflict.
    join_existing_model: bool = False
    # Serve LoRA adapters loaded at run time (vLLM --enable-lora, runtime updating on).
    enable_lora: bool = False
    max_lora_rank: int = 0  # vLLM --max-lora-rank; 0 = the engine's default (16)

    @property
    def concurrency(self) -> int:
        """Requests the engine was told to run at once: max_concurrent_requests, else the
        engine's own flag among extra_args (vLLM's and the sim's --max-num-seqs, TEI's
        --max-concurrent-requests); 0 when neither says (the scheduler then measures it)."""
        if self.max_concurrent_requests > 0:
            return self.max_concurrent_requests
        args = list(self.extra_args)
        for i, arg in enumerate(args):
            flag, eq, value = arg.partition("=")
            if flag.replace("_", "-") not in _CONCURRENCY_FLAGS:
                continue
            if not eq:
                value = args[i + 1] if i + 1 < len(args) else ""
            if value.isascii() and value.isdigit() and 0 < int(value) < 1_000_000:
                return int(value)
        return 0

    def declared_concurrency(self, backend: str) -> int:
        """What lifecycle tells the scheduler the engine runs at once (0: let it measure)."""
        return self.concurrency or DEFAULT_DECLARED_CONCURRENCY.get(backend, 0)

    @property
    def gpus_needed(self) -> int:
        """GPUs one replica occupies (TP x PP)."""
        return max(1, self.tensor_parallel_size) * max(1, self.pipeline_parallel_size)


def validate_spec(spec: EngineSpec) -> None:
    """Reject bad input before any process, port or GPU is touched; errors name the field."""
    if not spec.model:
        raise InvalidRequestError("model is required", param="model_id")
    if len(spec.model) > 512 or _BAD_MODEL_CHARS.search(spec.model):
        raise InvalidRequestError(
            f"model {spec.model!r} contains characters that are not allowed in a model id",
            param="model_id",
        )
    if spec.kind not in KINDS:
        raise InvalidRequestError(
            f"engine_kind must be llm or embedding, got {spec.kind!r}", param="engine_kind"
        )
    if spec.tensor_parallel_size < 1 or spec.pipeline_parallel_size < 1:
        raise InvalidRequestError(
            "tensor_parallel_size and pipeline_parallel_size must be >= 1",
            param="tensor_parallel_size",
        )
    if not 0 <= spec.port <= 65535:
        raise InvalidRequestError(f"port {spec.port} is out of range", param="port")
    if spec.cpu_threads < 0:
        raise InvalidRequestError("cpu_threads must be >= 0", param="cpu_threads")
    if spec.required_memory_gb < 0:
        raise InvalidRequestError("required_memory_gb must be >= 0", param="required_memory_gb")
    if not 0 <= spec.gpu_memory_utilization <= 1:
        raise InvalidRequestError(
            "gpu_memory_utilization must be in [0, 1]", param="gpu_memory_utilization"
        )
    if spec.engine_id and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", spec.engine_id):
        raise InvalidRequestError(
            "engine_id may hold letters, digits, '.', '_' and '-' (at most 128)",
            param="engine_id",
        )
    if not 0 <= spec.max_lora_rank <= 512:
        raise InvalidRequestError("max_lora_rank must be in 0..512", param="max_lora_rank")
    if spec.max_lora_rank and not spec.enable_lora:
        raise InvalidRequestError(
            "max_lora_rank needs enable_lora (lora: true)", param="max_lora_rank"
        )
    if spec.role not in ("both", "prefill", "decode"):
        raise InvalidRequestError("role must be both, prefill or decode", param="role")
    for arg in spec.extra_args:
        if "\x00" in arg or "\n" in arg:
            raise InvalidRequestError(
                "extra_args must not contain NUL or newlines", param="extra_args"
            )
