"""No shell in engine launch, and no path traversal through engine ids, preset names or
log requests."""

from __future__ import annotations

import ast
import asyncio
import sys
import uuid
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil
import pytest

from sage.common.grpc import create_channel
from sage.llm.presets.loader import PresetError, load_preset
from sage.rpc.lifecycle.v1 import lifecycle_pb2, lifecycle_pb2_grpc

from .conftest import ADMIN_KEY, admin

ROOT = Path(__file__).parents[2]
SHELL_CALLS = {
    ("os", "system"),
    ("os", "popen"),
    ("subprocess", "getoutput"),
    ("subprocess", "getstatusoutput"),
    ("asyncio", "create_subprocess_shell"),
}


def _shell_uses(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if not isinstance(node, ast.Call):
            continue
        for keyword in node.keywords:
            if keyword.arg == "shell" and not (
                isinstance(keyword.value, ast.Constant) and keyword.value.value is False
            ):
                found.append(f"{path}:{node.lineno}: shell={ast.unparse(keyword.value)}")
        func = node.func
        if isinstance(func, ast.Attribute):
            owner = func.value.id if isinstance(func.value, ast.Name) else ""
            if (owner, func.attr) in SHELL_CALLS or func.attr == "create_subprocess_shell":
                found.append(f"{path}:{node.lineno}: {owner}.{func.attr}")
    return found


def test_no_shell_anywhere_in_the_code() -> None:
    """No subprocess call in src/ or services/ goes through a shell."""
    files = [*ROOT.joinpath("src").rglob("*.py"), *ROOT.joinpath("services").rglob("*.py")]
    assert len(files) > 50
    problems = [hit for path in files for hit in _shell_uses(path)]
    assert problems == []


def test_the_scanner_finds_shell_calls(tmp_path: Path) -> None:
    """The scan above would catch the forms it looks for."""
    sample = tmp_path / "bad.py"
    sample.write_text(
        "import os, subprocess, asyncio\n"
        "subprocess.run('ls', shell=True)\n"
        "os.system('ls')\n"
        "asyncio.create_subprocess_shell('ls')\n"
    )
    assert len(_shell_uses(sample)) == 3


def _marker(tmp_path: Path) -> Path:
    return tmp_path / f"pwned-{uuid.uuid4().hex[:8]}"


async def test_model_names_with_shell_metacharacters_are_rejected(
    no_leaked_children: None, secure_plane: Any, tmp_path: Path
) -> None:
    """A model name that would run a command in a shell is a 400 naming model_id, and the
    command never runs."""
    marker = _marker(tmp_path)
    names = [
        f"m; touch {marker}",
        f"m && touch {marker}",
        f"$(touch {marker})",
        f"`touch {marker}`",
        f"m | touch {marker}",
        f"m\ntouch {marker}",
    ]
    for name in names:
        reply = await secure_plane.client.post(
            "/v1/management/engines",
            json={"model_id": name, "backend": "sim", "startup_timeout_s": 20},
            headers=admin(),
        )
        assert reply.status_code == 400, (name, reply.text)
        assert reply.json()["error"]["param"] in ("model_id", "model")
    listed = (await secure_plane.client.get("/v1/management/engines", headers=admin())).json()
    assert listed["count"] == 0
    assert not marker.exists()


async def test_metacharacters_in_extra_args_stay_one_argv_element(
    no_leaked_children: None, secure_plane: Any, tmp_path: Path
) -> None:
    """Engine arguments reach the process as argv elements, never through a shell."""
    marker = _marker(tmp_path)
    alias = f"alias;touch {marker}"
    reply = await secure_plane.client.post(
        "/v1/management/engines",
        json={
            "model_id": "sim-argv",
            "backend": "sim",
            "extra_args": ["--served-model-name", alias],
            "startup_timeout_s": 60,
        },
        headers=admin(),
    )
    assert reply.status_code == 201, reply.text
    engine = reply.json()
    argv = psutil.Process(engine["pid"]).cmdline()
    assert alias in argv
    assert not marker.exists()


TRAVERSALS = [
    "..",
    "../../etc/passwd",
    "..%2F..%2Fetc%2Fpasswd",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    ".hidden",
    "a/../../b",
    "..\\..\\windows",
]


async def _raw(client: httpx.AsyncClient, method: str, raw_path: str) -> httpx.Response:
    """Send `raw_path` exactly as written (httpx would otherwise resolve `..`)."""
    request = client.build_request(method, "/", headers=admin())
    request.url = request.url.copy_with(raw_path=raw_path.encode())
    return await client.send(request)


async def test_engine_ids_cannot_walk_out_of_the_state_dir(
    secure_plane: Any, tmp_path: Path
) -> None:
    """Traversal engine ids in get/logs/delete → 400 or 404, never a file's contents."""
    outside = tmp_path / "outside.log"
    outside.write_text("SENTINEL-OUTSIDE-CONTENT\n")
    client = secure_plane.client
    for engine_id in [*TRAVERSALS, "../../../outside"]:
        for method, suffix in (("GET", ""), ("GET", "/logs"), ("DELETE", "")):
            reply = await _raw(client, method, f"/v1/management/engines/{engine_id}{suffix}")
            assert reply.status_code in (400, 404), (engine_id, method, suffix, reply.text)
            assert "SENTINEL" not in reply.text and "root:" not in reply.text


async def test_lifecycle_rejects_traversal_ids_over_grpc(secure_plane: Any, tmp_path: Path) -> None:
    """Lifecycle itself (not just the edge) refuses traversal ids: StartEngine is
    INVALID_ARGUMENT and writes nothing outside; TailLogs/GetEngine are NOT_FOUND."""
    state = secure_plane.settings.llm_state_dir
    escape = "../../../escaped"
    channel = create_channel(secure_plane.settings.address("lifecycle"))
    stub = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as start:
            await stub.StartEngine(
                lifecycle_pb2.StartEngineRequest(model="sim-x", backend="sim", engine_id=escape),
                timeout=20,
            )
        assert start.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "engine_id" in (start.value.details() or "")
        for call in (
            stub.TailLogs(lifecycle_pb2.TailLogsRequest(engine_id=escape, lines=5), timeout=5),
            stub.GetEngine(lifecycle_pb2.GetEngineRequest(engine_id=escape), timeout=5),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() in (
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.INVALID_ARGUMENT,
            )
    finally:
        await channel.close(None)
    escaped = await asyncio.to_thread(lambda: list(tmp_path.glob("**/escaped*")))
    assert escaped == [], escaped
    assert not (state / "logs" / escape).with_suffix(".log").resolve().exists()


async def test_cli_logs_with_a_traversal_id_reads_nothing(secure_plane: Any) -> None:
    """`sage llm logs ../../etc/passwd` asks the gateway, which refuses; no file is read."""
    base = str(secure_plane.client.base_url).rstrip("/")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sage.llm.cli",
        "llm",
        "logs",
        "../../etc/passwd",
        "--url",
        f"{base}/v1",
        "--api-key",
        ADMIN_KEY,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode(errors="replace")
    assert proc.returncode != 0, text
    assert "root:" not in text
    assert "engine" in text.lower() or "invalid" in text.lower(), text


@pytest.mark.parametrize(
    "name", ["../../etc/passwd", "/etc/passwd", "..", "a/b", "%2e%2e", "default/../x"]
)
def test_preset_names_with_paths_are_unknown_presets(name: str) -> None:
    """Preset names are looked up in the built-in list, never joined to a path."""
    with pytest.raises(PresetError, match="no built-in preset"):
        load_preset(name=name)
