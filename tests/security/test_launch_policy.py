"""Issue 16, "code execution through management" and "argv and ids": lifecycle's launch
policy (services/lifecycle/policy.py), checked directly and through a real lifecycle gRPC
server (port 0, real sim engine processes) and the edge, so it holds for StartEngine
whoever calls it."""

from __future__ import annotations

import json
import random
import socket
import stat
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from sage.common.config.settings import SageSettings
from sage.common.exceptions import ConfigurationError, InvalidRequestError
from sage.common.grpc import create_channel
from sage.rpc.lifecycle.v1 import lifecycle_pb2, lifecycle_pb2_grpc
from sage.services.lifecycle.policy import LaunchPolicy, engine_bind_host, parse_port_range
from sage.services.lifecycle.server import build_server as build_lifecycle

from .conftest import admin

# -- model ids ---------------------------------------------------------------------------


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    """A model root holding one model folder, and a folder outside every root."""
    root = tmp_path / "models"
    (root / "tiny").mkdir(parents=True)
    (root / "tiny" / "config.json").write_text("{}")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    return root, outside


def policy_for(root: Path, **kwargs: Any) -> LaunchPolicy:
    return LaunchPolicy(model_roots=(root,), **kwargs)


@pytest.mark.parametrize("model", ["--trust-remote-code", "-h", "--help", "-", "--model=x"])
def test_model_ids_an_engine_would_read_as_options_are_refused(
    model: str, roots: tuple[Path, Path]
) -> None:
    with pytest.raises(InvalidRequestError, match="starts with '-'") as err:
        policy_for(roots[0]).check_model(model)
    assert err.value.param == "model_id"


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        ("../../../../etc/passwd", "'..'"),
        ("org/../../etc", "'..'"),
        ("evil\u202egpj.sh", "U+202E"),
        ("a\u2066b", "U+2066"),
        ("a\u2069b", "U+2069"),
        ("a\u200eb", "U+200E"),
        ("zero\u200bwidth", "U+200B"),
        ("line\u2028break", "U+2028"),
        ("bell\x07", "U+0007"),
    ],
)
def test_traversal_control_and_bidi_model_ids_are_refused(
    model: str, reason: str, roots: tuple[Path, Path]
) -> None:
    with pytest.raises(InvalidRequestError) as err:
        policy_for(roots[0]).check_model(model)
    assert reason in err.value.message and err.value.param == "model_id"


@pytest.mark.parametrize(
    "model",
    [
        "sim",
        "gpt2",
        "Qwen/Qwen2.5-7B-Instruct",
        "sentence-transformers/all-MiniLM-L6-v2",
        "BAAI/bge-m3",
        "org.name/model_v1.5",
    ],
)
def test_hub_ids_are_accepted(model: str, roots: tuple[Path, Path]) -> None:
    policy_for(roots[0]).check_model(model)


def test_local_folders_must_resolve_under_a_model_root(roots: tuple[Path, Path]) -> None:
    """Inside a root: accepted. Outside, through a symlink out of a root, relative, or
    missing: refused with a message naming the problem."""
    root, outside = roots
    policy = policy_for(root)
    policy.check_model(str(root / "tiny"))
    (root / "escape").symlink_to(outside)
    (root / "also-tiny").symlink_to(root / "tiny")
    policy.check_model(str(root / "also-tiny"))  # a link that stays inside is fine
    for model, reason in (
        (str(outside), "not inside an allowed model root"),
        (str(root / "escape"), "not inside an allowed model root"),
        ("/etc", "not inside an allowed model root"),
        ("models/tiny/extra", "neither a Hugging Face id"),
        ("./tiny", "neither a Hugging Face id"),
        (str(root / "missing"), "does not exist"),
    ):
        with pytest.raises(InvalidRequestError) as err:
            policy.check_model(model)
        assert reason in err.value.message, (model, err.value.message)
        assert err.value.param == "model_id"


def test_default_roots_are_sage_home_models_and_the_hf_cache(tmp_path: Path) -> None:
    """$SAGE_HOME/models and the Hugging Face cache always count; SAGE_MODEL_ROOTS adds."""
    settings = SageSettings(home=tmp_path / "home", model_roots=f"{tmp_path / 'extra'}")
    policy = LaunchPolicy.from_settings(settings, {"HF_HOME": str(tmp_path / "hf")})
    assert set(policy.model_roots) >= {
        tmp_path / "home" / "models",
        tmp_path / "hf",
        tmp_path / "extra",
    }


# -- extra_args ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--trust-remote-code"], "runs Python code"),
        (["--trust_remote_code"], "runs Python code"),
        (["--TRUST-REMOTE-CODE"], "runs Python code"),
        (["--host", "0.0.0.0"], "bind address"),
        (["--host=0.0.0.0"], "bind address"),
        (["--port", "22"], "port"),
        (["--api-key", "x"], "API key"),
        (["--chat-template", "https://evil.example/t.jinja"], "template"),
        (["--download-dir", "/tmp/x"], "outside the model roots"),
        (["--tensor-parallel-size", "8"], "tensor_parallel_size field"),
        (["--ho", "0.0.0.0"], "not an allowed flag for backend vllm"),
        (["--no-such-flag"], "not an allowed flag"),
        (["-q", "awq"], "long form"),
        (["--", "--trust-remote-code"], "long form"),
        (["float16"], "not the value of a flag"),
        (["--max-num-seqs", "--trust-remote-code"], "needs a value"),
        (["--enforce-eager", "--trust-remote-code"], "runs Python code"),
        (["--enforce-eager", "yes"], "not the value of a flag"),
        (["--served-model-name", "ok", "--trust-remote-code"], "runs Python code"),
        (["--served-model-name=--trust-remote-code"], "starts with '-'"),
        (["--dtype", "float\u202e16"], "U+202E"),
        (["--tokenizer", "/etc"], "not inside an allowed model root"),
        (["--tokenizer", "../../etc/passwd"], "'..'"),
    ],
)
def test_extra_args_outside_the_allow_list_are_refused(
    args: list[str], reason: str, roots: tuple[Path, Path]
) -> None:
    with pytest.raises(InvalidRequestError) as err:
        policy_for(roots[0]).check_extra_args("vllm", args)
    assert reason in err.value.message, err.value.message
    assert err.value.param == "extra_args"


@pytest.mark.parametrize(
    ("backend", "args"),
    [
        ("vllm", ["--dtype", "float16", "--enforce-eager", "--max-num-seqs", "8"]),
        ("vllm", ["--max_num_seqs=8", "--seed", "-1", "--kv-cache-dtype", "fp8"]),
        ("vllm", ["--served-model-name", "a", "b", "--enable-prefix-caching"]),
        ("vllm", ["--tokenizer", "Qwen/Qwen2.5-7B-Instruct"]),
        ("sim", ["--tpot-ms", "20", "--served-model-name", "alias;touch x"]),
        ("embedding", ["--alias", "emb", "--max-batch-size", "64"]),
        ("infinity", ["--no-trust-remote-code", "--batch-size", "32"]),
    ],
)
def test_allow_listed_extra_args_pass(
    backend: str, args: list[str], roots: tuple[Path, Path]
) -> None:
    policy_for(roots[0]).check_extra_args(backend, args)


def test_the_operator_can_allow_more_flags(roots: tuple[Path, Path]) -> None:
    """SAGE_LAUNCH_ALLOWED_ARGS adds flags to every backend; `*` allows anything."""
    settings = SageSettings(launch_allowed_args="--trust-remote-code, --config")
    added = LaunchPolicy.from_settings(settings, {})
    added.check_extra_args("transformers", ["--trust-remote-code"])
    added.check_extra_args("vllm", ["--config", "cfg.yaml"])
    with pytest.raises(InvalidRequestError, match="--host"):
        added.check_extra_args("vllm", ["--host", "0.0.0.0"])
    anything = LaunchPolicy.from_settings(SageSettings(launch_allowed_args="*"), {})
    anything.check_extra_args("vllm", ["--host", "0.0.0.0", "-q", "awq"])


# -- ports and bind address ------------------------------------------------------------


def test_ports_must_be_unprivileged_and_in_the_engine_range() -> None:
    policy = LaunchPolicy.from_settings(
        SageSettings(engine_ports="9100-9199", llm_port=8001, embedding_port=8090), {}
    )
    for port in (9100, 9150, 9199, 8001, 8090):  # the range and serve's own engine ports
        policy.check_port(port)
    for port, reason in ((22, "below 1024"), (1023, "below 1024"), (8900, "9100-9199")):
        with pytest.raises(InvalidRequestError) as err:
            policy.check_port(port)
        assert reason in err.value.message and err.value.param == "port"
    assert set(policy.candidate_ports(random.Random(7))) == set(range(9100, 9200))


@pytest.mark.parametrize("text", ["22-100", "9000-8000", "abc", "8900-70000", ""])
def test_bad_engine_port_ranges_are_configuration_errors(text: str) -> None:
    with pytest.raises(ConfigurationError, match="SAGE_ENGINE_PORTS"):
        parse_port_range(text)


def test_engines_bind_loopback_unless_the_node_advertises_an_address() -> None:
    assert engine_bind_host("0.0.0.0", "") == "127.0.0.1"
    assert engine_bind_host("::", "") == "127.0.0.1"
    assert engine_bind_host("127.0.0.1", "") == "127.0.0.1"
    assert engine_bind_host("localhost", "") == "127.0.0.1"
    assert engine_bind_host("0.0.0.0", "127.0.0.2") == "127.0.0.2"  # a local address
    assert engine_bind_host("10.77.0.2", "") == "10.77.0.2"  # one interface, chosen


# -- through a real lifecycle --------------------------------------------------------------


def _free_block(size: int) -> int:
    """The first port of `size` consecutive ports nothing listens on (below the ephemeral
    range, so no outgoing connection takes one meanwhile)."""
    for _ in range(200):
        base = random.randrange(20_000, 30_000)
        with ExitStack() as stack:
            try:
                for port in range(base, base + size):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return base
    raise AssertionError("no free block of ports")


@asynccontextmanager
async def lifecycle(settings: SageSettings) -> AsyncIterator[Any]:
    """A lifecycle server on port 0 (no scheduler or gpu_manager reachable: engines are
    started, registration is retried quietly); its engines are stopped at the end."""
    wired = settings.model_copy(
        update={
            "scheduler_addr": "127.0.0.1:1",
            "gpu_manager_addr": "127.0.0.1:1",
            "lifecycle_stop_engines_on_exit": True,
        }
    )
    server, port = build_lifecycle(wired, "127.0.0.1:0")
    await server.start()
    channel = create_channel(f"127.0.0.1:{port}")
    try:
        yield lifecycle_pb2_grpc.LifecycleServiceStub(channel)
    finally:
        await channel.close(None)
        await server.stop(1)


def _settings(tmp_path: Path, name: str, **extra: Any) -> SageSettings:
    return SageSettings(home=tmp_path / name, rpc_timeout_s=5.0, disable_nvml=True, **extra)


def _sim(**fields: Any) -> lifecycle_pb2.StartEngineRequest:
    return lifecycle_pb2.StartEngineRequest(
        model="sim", backend="sim", startup_timeout_s=60, **fields
    )


async def test_grpc_start_engine_is_held_to_the_policy(
    no_leaked_children: None, tmp_path: Path
) -> None:
    """A direct gRPC caller gets INVALID_ARGUMENT naming the problem, and nothing starts:
    the policy lives in lifecycle, not in the edge."""
    async with lifecycle(_settings(tmp_path, "a")) as stub:
        for request, named in (
            (_sim(extra_args=["--host", "0.0.0.0"]), "--host"),
            (_sim(extra_args=["--trust-remote-code"]), "--trust-remote-code"),
            (lifecycle_pb2.StartEngineRequest(model="--trust-remote-code", backend="sim"), "'-'"),
            (lifecycle_pb2.StartEngineRequest(model="-h", backend="sim"), "'-'"),
            (lifecycle_pb2.StartEngineRequest(model="../../../../etc/passwd"), "'..'"),
            (lifecycle_pb2.StartEngineRequest(model="evil\u202egpj.sh"), "U+202E"),
            (_sim(port=22), "port 22"),
            (_sim(aliases=["--trust-remote-code"]), "alias"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.StartEngine(request, timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
            assert named in (err.value.details() or ""), err.value.details()
        listed = await stub.ListEngines(lifecycle_pb2.ListEnginesRequest(), timeout=5)
        assert list(listed.engines) == []


def _listening_host(pid: int, port: int) -> str:
    for conn in psutil.Process(pid).net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr[1] == port:
            return str(conn.laddr[0])
    raise AssertionError(f"pid {pid} does not listen on {port}")


async def test_ports_come_from_each_stacks_range_skipping_ports_in_use(
    no_leaked_children: None, tmp_path: Path
) -> None:
    """Two stacks with different SAGE_ENGINE_PORTS never share a port; a port something
    else listens on is skipped; a full range is a 409 naming it. Engines listen on
    127.0.0.1 although the services were told to bind every interface."""
    base = _free_block(6)
    range_a, range_b = f"{base}-{base + 2}", f"{base + 3}-{base + 5}"
    with ExitStack() as busy:
        for port in (base, base + 1):  # taken by someone else
            sock = busy.enter_context(socket.socket())
            sock.bind(("127.0.0.1", port))
            sock.listen()
        a_settings = _settings(tmp_path, "a", engine_ports=range_a, host="0.0.0.0")
        async with (
            lifecycle(a_settings) as stack_a,
            lifecycle(_settings(tmp_path, "b", engine_ports=range_b)) as stack_b,
        ):
            first = (await stack_a.StartEngine(_sim(), timeout=90)).engine
            second = (await stack_b.StartEngine(_sim(), timeout=90)).engine
            assert first.port == base + 2
            assert base + 3 <= second.port <= base + 5
            assert first.base_url == f"http://127.0.0.1:{first.port}"
            assert _listening_host(first.pid, first.port) == "127.0.0.1"
            with pytest.raises(grpc.aio.AioRpcError) as full:
                await stack_a.StartEngine(_sim(), timeout=90)
            assert full.value.code() == grpc.StatusCode.ALREADY_EXISTS
            assert f"no free port in the engine port range {range_a}" in (
                full.value.details() or ""
            )
            outside = _sim(port=base + 4)  # stack b's range is not stack a's
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stack_a.StartEngine(outside, timeout=90)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_start_failures_carry_no_argv_or_traceback(
    no_leaked_children: None, tmp_path: Path
) -> None:
    """An engine that exits while starting: the caller (and GetEngine) learn that it exited
    and where to look; the argv and the engine's own output stay in its log."""
    async with lifecycle(_settings(tmp_path, "a")) as stub:
        request = _sim(engine_id="sim-bad", extra_args=["--max-num-seqs", "many"])
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.StartEngine(request, timeout=90)
        details = err.value.details() or ""
        stored = (
            await stub.GetEngine(lifecycle_pb2.GetEngineRequest(engine_id="sim-bad"), timeout=5)
        ).engine.error
        for text in (details, stored):
            assert "exited with code" in text and "sage llm logs sim-bad" in text, text
            for leak in ("sage.engines.sim", "--max-num-seqs", "usage:", "Traceback", "error:"):
                assert leak not in text, (leak, text)
        logs = await stub.TailLogs(
            lifecycle_pb2.TailLogsRequest(engine_id="sim-bad", lines=50), timeout=5
        )
        text = "\n".join(logs.lines)
        assert "sage.engines.sim" in text and "invalid int value" in text
    # The log (argv, the engine's output, later prompts) is this user's only, even
    # without `sage llm serve` making the state dir private.
    logs_dir = tmp_path / "a" / "llm" / "logs"
    assert stat.S_IMODE(logs_dir.stat().st_mode) == 0o700
    for log in logs_dir.iterdir():
        assert stat.S_IMODE(log.stat().st_mode) == 0o600, log


# -- through the edge (the issue's own attack) -------------------------------------------


@pytest.fixture
def remote_code_folder(settings: SageSettings) -> Iterator[tuple[Path, Path]]:
    """A model folder under $SAGE_HOME/models whose config names custom code (auto_map)
    that would create a marker file when imported; yields (folder, marker)."""
    folder = settings.home / "models" / "evil-model"
    folder.mkdir(parents=True)
    marker = settings.home / "pwned"
    folder.joinpath("config.json").write_text(
        json.dumps(
            {
                "model_type": "evil",
                "architectures": ["EvilForCausalLM"],
                "auto_map": {
                    "AutoConfig": "modeling_evil.EvilConfig",
                    "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
                },
            }
        )
    )
    folder.joinpath("modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    yield folder, marker


async def test_management_cannot_run_a_model_folders_code(
    no_leaked_children: None, secure_plane: Any, remote_code_folder: tuple[Path, Path]
) -> None:
    """With the admin key, `--trust-remote-code` on a folder with auto_map code and
    `--host 0.0.0.0` are 400s naming the flag; no engine starts and no code runs."""
    folder, marker = remote_code_folder
    for body, flag in (
        (
            {
                "model_id": str(folder),
                "backend": "transformers",
                "extra_args": ["--trust-remote-code"],
            },
            "--trust-remote-code",
        ),
        ({"model_id": "sim", "backend": "sim", "extra_args": ["--host", "0.0.0.0"]}, "--host"),
        ({"model_id": "--trust-remote-code", "backend": "sim"}, "'-'"),
        ({"model_id": "sim", "backend": "sim", "port": 22}, "port 22"),
    ):
        reply = await secure_plane.client.post(
            "/v1/management/engines", json={**body, "startup_timeout_s": 30}, headers=admin()
        )
        assert reply.status_code == 400, (body, reply.text)
        assert flag in reply.json()["error"]["message"]
    listed = (await secure_plane.client.get("/v1/management/engines", headers=admin())).json()
    assert listed["count"] == 0
    assert not marker.exists()
    assert not (folder / "__pycache__").exists()


def test_infinity_is_told_not_to_trust_remote_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, roots: tuple[Path, Path]
) -> None:
    """infinity_emb trusts a model repo's Python code unless told otherwise (its default is
    true); its plan says --no-trust-remote-code, and a caller cannot turn it back on."""
    from sage.services.lifecycle.backends import BACKENDS
    from sage.services.lifecycle.spec import EngineSpec

    program = tmp_path / "infinity_emb"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    monkeypatch.setenv("SAGE_INFINITY_BIN", str(program))
    plan = BACKENDS["infinity"].plan(EngineSpec(model="BAAI/bge-m3", kind="embedding"), 9000, [])
    assert "--no-trust-remote-code" in plan.argv
    with pytest.raises(InvalidRequestError, match="runs Python code"):
        policy_for(roots[0]).check_extra_args("infinity", ["--trust-remote-code"])
