"""SGLang: `python -m sglang.launch_server --model-path M ...`, a second engine family.

SGLang lives in an interpreter of its own (SAGE_SGLANG_PYTHON=/venv/bin/python), like
vLLM: it pins torch and kernels that need not fit the control plane's venv. Unset, the
control plane's own interpreter is tried. Flags are SGLang 0.5's (`sglang/srt/server_args.py`,
checked by tests/unit/lifecycle_backends/test_sglang_plan.py against its own parser).

SGLang takes its API key only as `--api-key` (no environment variable reads it), and argv
is readable by every local user in `ps`; so the engine starts through a small shim that
moves the key from SAGE_SGLANG_API_KEY into sys.argv inside the process, where `ps` does
not see it. `--enable-metrics` is always passed: the scheduler's load view reads
`sglang:num_running_reqs` / `sglang:num_queue_reqs` / `sglang:token_usage` from /metrics.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from sage.common.exceptions import EngineStartError, InvalidRequestError

from ..spec import EngineSpec
from ._common import check_kind, gpu_env, probe_interpreter
from .base import Availability, LaunchPlan

PYTHON_ENV_VAR = "SAGE_SGLANG_PYTHON"  # the interpreter SGLang is installed in
API_KEY_ENV = "SAGE_SGLANG_API_KEY"  # read (and removed) by SHIM, never put in argv
SGLANG_VERSION_CHECKED = "0.5.23"  # the release whose ServerArgs the argv was checked with
# SGLang sizes its static pool (weights + KV cache) as this fraction of each GPU when the
# spec gives none; lifecycle reserves exactly this fraction (SGLang's own default is
# computed from the GPU's memory at start, which lifecycle cannot know beforehand).
DEFAULT_MEM_FRACTION_STATIC = 0.85
_INSTALL_HINT = (
    "pip install sglang (best in a venv of its own, then set "
    "SAGE_SGLANG_PYTHON=/that/venv/bin/python), or use backend vllm, transformers or sim"
)
# Run as `python -c SHIM --model-path M ...`: argv[0] is "-c", the server's flags follow.
SHIM = (
    "import os,runpy,sys\n"
    f"k=os.environ.pop({API_KEY_ENV!r},'')\n"
    "if k:\n"
    "    sys.argv[1:1]=['--api-key',k]\n"
    "runpy.run_module('sglang.launch_server',run_name='__main__',alter_sys=True)\n"
)
_PROBE = """
import importlib.metadata as m, json
try:
    print(json.dumps({"version": m.version("sglang")}))
except m.PackageNotFoundError:
    print("{}")
"""
_PROBE_TTL_S = 30.0
_probe_cache: dict[str, tuple[float, str]] = {}


def installed_version(python: str) -> str:
    """SGLang's version in interpreter `python` ("" when not installed; cached briefly)."""
    now = time.monotonic()
    cached = _probe_cache.get(python)
    if cached is not None and now - cached[0] < _PROBE_TTL_S:
        return cached[1]
    doc = probe_interpreter(python, _PROBE) or {}
    version = str(doc.get("version", ""))
    _probe_cache[python] = (now, version)
    return version


class SglangBackend:
    """SGLang's OpenAI-compatible server (`sglang.launch_server`): chat and embeddings."""

    name = "sglang"
    kinds = frozenset({"llm", "embedding"})
    uses_gpu = True
    launches_process = True
    api_key_env = API_KEY_ENV
    shards = True  # --tp-size / --pp-size

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = environ  # None: lifecycle's own environment, read at each call

    @property
    def _env(self) -> Mapping[str, str]:
        return os.environ if self._environ is None else self._environ

    def _python(self) -> tuple[str, str]:
        """(interpreter, problem): SAGE_SGLANG_PYTHON when set, else this interpreter."""
        python = self._env.get(PYTHON_ENV_VAR, "")
        if python:
            if not (Path(python).is_file() and os.access(python, os.X_OK)):
                return "", f"{PYTHON_ENV_VAR}={python} is not an executable file"
            if not installed_version(python):
                return "", f"{PYTHON_ENV_VAR}={python} has no sglang installed; {_INSTALL_HINT}"
            return python, ""
        if installed_version(sys.executable):
            return sys.executable, ""
        return "", f"sglang is not installed; {_INSTALL_HINT}"

    def availability(self) -> Availability:
        """Installed when the sglang distribution is in SAGE_SGLANG_PYTHON (or this venv)."""
        _, problem = self._python()
        return Availability(not problem, problem)

    def gpu_fraction(self, spec: EngineSpec) -> float:
        """The share of each GPU SGLang takes (--mem-fraction-static): lifecycle reserves it."""
        return spec.gpu_memory_utilization or DEFAULT_MEM_FRACTION_STATIC

    def plan(self, spec: EngineSpec, port: int, gpu_ids: list[int]) -> LaunchPlan:
        """`python -c SHIM --model-path M --host H --port P ...` + extra args."""
        check_kind(self.name, self.kinds, spec)
        if spec.role != "both":
            raise InvalidRequestError(
                "backend sglang does not take part in prefill/decode serving here; "
                "use backend vllm for role prefill or decode",
                param="role",
            )
        python, problem = self._python()
        if problem:
            raise EngineStartError(problem, param="backend")
        return LaunchPlan(
            argv=[python, "-c", SHIM, *server_args(spec, port, gpu_ids)],
            env=gpu_env(gpu_ids),
            health_path="/health",
        )


def server_args(spec: EngineSpec, port: int, gpu_ids: list[int]) -> list[str]:
    """The flags `sglang.launch_server` gets for `spec` (what SGLang's parser reads)."""
    args = [
        "--model-path",
        spec.model,
        "--host",
        spec.host,
        "--port",
        str(port),
        "--tp-size",
        str(spec.tensor_parallel_size),
        "--pp-size",
        str(spec.pipeline_parallel_size),
        # One name, as SGLang takes: the model, the name the registry knows it by
        # (aliases are resolved by the scheduler before a request reaches the engine).
        "--served-model-name",
        spec.model,
        "--enable-metrics",
    ]
    if gpu_ids or spec.use_gpu:
        fraction = spec.gpu_memory_utilization or DEFAULT_MEM_FRACTION_STATIC
        args += ["--mem-fraction-static", f"{fraction:g}"]
    else:
        args += ["--device", "cpu"]
    if spec.max_model_len > 0:
        args += ["--context-length", str(spec.max_model_len)]
    if spec.max_concurrent_requests > 0:
        args += ["--max-running-requests", str(spec.max_concurrent_requests)]
    if spec.kind == "embedding":
        args += ["--is-embedding"]
    if spec.enable_lora:
        args += ["--enable-lora"]
        if spec.max_lora_rank > 0:
            args += ["--max-lora-rank", str(spec.max_lora_rank)]
    args += list(spec.extra_args)
    return args
