"""The sglang backend's launch plan, checked against SGLang's own argument parser.

SGLang needs CUDA kernels to serve, so no server starts here. Its parser does import: with
SGLang installed in a side venv (SAGE_TEST_SGLANG_PYTHON, default .venv-sglang/bin/python in
the repo, which scripts/install_sglang_parser.sh builds: sglang --no-deps plus what
server_args imports, CPU torch) the plan's argv is parsed by `ServerArgs.add_cli_args`.
Without it, the flags are checked against the list that parser gave for SGLang 0.5.23
(sglang_0_5_23_flags.txt).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sage.common.exceptions import EngineStartError, InvalidRequestError
from sage.llm.presets.schema import BACKEND_NAMES, PresetEngine
from sage.services.lifecycle.backends import BACKENDS, resolve_backend
from sage.services.lifecycle.backends import sglang as sglang_module
from sage.services.lifecycle.backends._common import launch_env
from sage.services.lifecycle.backends.sglang import SglangBackend, server_args
from sage.services.lifecycle.policy import ALLOWED_ARGS, LaunchPolicy
from sage.services.lifecycle.spec import EngineSpec

FLAGS_FILE = Path(__file__).with_name("sglang_0_5_23_flags.txt")
# scripts/test.sh builds it (scripts/install_sglang_parser.sh) and exports the variable.
SGLANG_PYTHON = os.environ.get(
    "SAGE_TEST_SGLANG_PYTHON", str(Path(__file__).parents[3] / ".venv-sglang" / "bin" / "python")
)
BIG = EngineSpec(
    model="Qwen/Qwen2.5-72B-Instruct",
    host="0.0.0.0",
    tensor_parallel_size=4,
    pipeline_parallel_size=2,
    gpu_memory_utilization=0.8,
    max_model_len=8192,
    max_concurrent_requests=64,
    aliases=("qwen",),
    extra_args=("--chunked-prefill-size", "4096"),
)
# What the parse script prints: the ServerArgs fields our flags set.
FIELDS = (
    "model_path",
    "host",
    "port",
    "tp_size",
    "pp_size",
    "mem_fraction_static",
    "served_model_name",
    "enable_metrics",
    "context_length",
    "max_running_requests",
    "chunked_prefill_size",
    "api_key",
    "device",
    "is_embedding",
)
PARSE = """
import argparse, json, sys
from sglang.srt.server_args import ServerArgs
parser = argparse.ArgumentParser()
ServerArgs.add_cli_args(parser)
args = parser.parse_args(json.loads(sys.argv[1]))
print(json.dumps({name: getattr(args, name) for name in json.loads(sys.argv[2])}))
"""


@pytest.fixture(autouse=True)
def _fresh_probe() -> None:
    sglang_module._probe_cache.clear()


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """SGLang reported installed in this interpreter (no real probe)."""
    monkeypatch.delenv(sglang_module.PYTHON_ENV_VAR, raising=False)
    monkeypatch.setattr(sglang_module, "installed_version", lambda python: "0.5.23")


def test_plan_is_sglang_launch_server_with_parallelism_memory_and_metrics(
    installed: None,
) -> None:
    plan = BACKENDS["sglang"].plan(BIG, 30001, [0, 1, 2, 3, 4, 5, 6, 7])
    assert plan.argv[:3] == [sys.executable, "-c", sglang_module.SHIM]
    assert plan.argv[3:] == [
        "--model-path",
        "Qwen/Qwen2.5-72B-Instruct",
        "--host",
        "0.0.0.0",
        "--port",
        "30001",
        "--tp-size",
        "4",
        "--pp-size",
        "2",
        "--served-model-name",
        "Qwen/Qwen2.5-72B-Instruct",
        "--enable-metrics",
        "--mem-fraction-static",
        "0.8",
        "--context-length",
        "8192",
        "--max-running-requests",
        "64",
        "--chunked-prefill-size",
        "4096",
    ]
    assert plan.env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"
    assert plan.health_path == "/health"
    assert BACKENDS["sglang"].uses_gpu and BACKENDS["sglang"].api_key_env


def test_lifecycle_reserves_the_memory_fraction_sglang_takes() -> None:
    backend = SglangBackend()
    assert backend.gpu_fraction(BIG) == 0.8
    default = EngineSpec(model="m", use_gpu=True)
    assert backend.gpu_fraction(default) == sglang_module.DEFAULT_MEM_FRACTION_STATIC
    assert f"{sglang_module.DEFAULT_MEM_FRACTION_STATIC:g}" in server_args(default, 1, [0])


def test_embedding_and_cpu_engines_get_their_flags() -> None:
    args = server_args(EngineSpec(model="BAAI/bge-m3", kind="embedding"), 30002, [])
    assert "--is-embedding" in args
    assert args[args.index("--device") + 1] == "cpu"
    assert "--mem-fraction-static" not in args  # a CPU engine holds no GPU share


def test_prefill_decode_roles_are_refused(installed: None) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        BACKENDS["sglang"].plan(EngineSpec(model="m", role="prefill"), 30003, [0])
    assert caught.value.param == "role"


def test_missing_sglang_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    not_python = tmp_path / "python"
    monkeypatch.setenv(sglang_module.PYTHON_ENV_VAR, str(not_python))
    availability = BACKENDS["sglang"].availability()
    assert not availability.ok and sglang_module.PYTHON_ENV_VAR in availability.reason
    # An interpreter without sglang (this one, in CI) is named with the install hint.
    monkeypatch.setenv(sglang_module.PYTHON_ENV_VAR, sys.executable)
    if sglang_module.installed_version(sys.executable):
        pytest.skip("sglang is installed in this interpreter")
    with pytest.raises(EngineStartError) as caught:
        BACKENDS["sglang"].plan(EngineSpec(model="m"), 30004, [])
    assert "pip install sglang" in caught.value.message


def test_auto_never_picks_sglang_but_a_preset_may_name_it() -> None:
    assert resolve_backend(EngineSpec(model="m", backend="sglang"), gpu_count=1).name == "sglang"
    assert resolve_backend(EngineSpec(model="m"), gpu_count=0).name != "sglang"
    assert PresetEngine(name="chat", model="m", backend="sglang").backend == "sglang"
    with pytest.raises(ValueError, match="unknown backend 'sglan'"):
        PresetEngine(name="chat", model="m", backend="sglan")
    assert set(BACKEND_NAMES) == {"auto", *BACKENDS}


def test_api_key_reaches_sglang_through_the_shim_never_through_argv(
    installed: None, tmp_path: Path
) -> None:
    # A stand-in sglang.launch_server that reports the argv and environment it runs with.
    package = tmp_path / "sglang"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "launch_server.py").write_text(
        "import json, os, sys\n"
        "print(json.dumps({'argv': sys.argv[1:], "
        f"'env': os.environ.get({sglang_module.API_KEY_ENV!r})}}))\n"
    )
    backend = BACKENDS["sglang"]
    plan = backend.plan(EngineSpec(model="m"), 30005, [])
    env = launch_env(plan, backend, "sk-engine-secret", environ={"PYTHONPATH": str(tmp_path)})
    assert "sk-engine-secret" not in plan.argv
    out = subprocess.run(plan.argv, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["argv"][:2] == ["--api-key", "sk-engine-secret"]
    assert seen["argv"][2:] == plan.argv[3:]
    assert seen["env"] is None  # popped before SGLang (and its workers) start


def _flags(argv: list[str]) -> list[str]:
    return [arg for arg in argv if arg.startswith("--")]


def test_every_flag_is_one_sglang_0_5_23_takes() -> None:
    known = set(FLAGS_FILE.read_text().split())
    assert "--model-path" in known and len(known) > 500  # the whole parser's list
    for spec in (BIG, EngineSpec(model="e", kind="embedding", enable_lora=True)):
        argv = ["--api-key", "k", *server_args(spec, 30006, [0])]
        unknown = [flag for flag in _flags(argv) if flag not in known]
        assert unknown == [], unknown


@pytest.mark.skipif(
    not Path(SGLANG_PYTHON).is_file(),
    reason=f"no SGLang side venv at {SGLANG_PYTHON} (set SAGE_TEST_SGLANG_PYTHON); "
    "the vendored 0.5.23 flag list is checked instead",
)
def test_sglangs_own_parser_reads_the_plan_as_meant() -> None:
    argv = ["--api-key", "sk-k", *server_args(BIG, 30007, [0, 1, 2, 3, 4, 5, 6, 7])]
    out = subprocess.run(
        [SGLANG_PYTHON, "-c", PARSE, json.dumps(argv), json.dumps(FIELDS)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    if "No module named" in out.stderr:
        pytest.skip(f"SGLang's server_args does not import at {SGLANG_PYTHON}: {out.stderr[-300:]}")
    assert out.returncode == 0, out.stderr[-2000:]
    parsed = json.loads(out.stdout.strip().splitlines()[-1])
    assert parsed == {
        "model_path": "Qwen/Qwen2.5-72B-Instruct",
        "host": "0.0.0.0",
        "port": 30007,
        "tp_size": 4,
        "pp_size": 2,
        "mem_fraction_static": 0.8,
        "served_model_name": "Qwen/Qwen2.5-72B-Instruct",
        "enable_metrics": True,
        "context_length": 8192,
        "max_running_requests": 64,
        "chunked_prefill_size": 4096,
        "api_key": "sk-k",
        "device": None,
        "is_embedding": False,
    }


def test_flags_the_launch_policy_allows_for_sglang_exist_in_sglang() -> None:
    known = set(FLAGS_FILE.read_text().split())
    allowed = ALLOWED_ARGS["sglang"]
    assert allowed and [flag for flag in allowed if flag not in known] == []
    policy = LaunchPolicy()
    policy.check_extra_args("sglang", ["--chunked-prefill-size", "4096", "--disable-radix-cache"])
    with pytest.raises(InvalidRequestError):
        policy.check_extra_args("sglang", ["--api-key", "mine"])  # lifecycle passes the key
