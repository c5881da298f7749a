"""Issue 16 item 1, admin auth on by default: without SAGE_ADMIN_API_KEY, `sage llm serve`
writes an admin key (0600) and the internal token before any child starts and hands their
files to every child; management refuses callers without it (tenant keys included, the
"API keys set, management open" finding); the CLI and the Python clients on this machine use
it with no configuration, on management routes only and never towards another host."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from sage.common.config.settings import SageSettings
from sage.common.exceptions import AuthenticationError, ConfigurationError, PermissionDeniedError
from sage.common.security import ensure_secret_file
from sage.common.utils.processes import free_port
from sage.llm import UnifiedInferenceClient
from sage.llm.async_client import AsyncUnifiedInferenceClient
from sage.llm.cli import main
from sage.llm.management import ManagementClient, admin_key_for
from sage.llm.supervisor import EngineRequest, local_model_path, model_roots_value

TENANT_KEY = "sk-tenant-admin-default-3d2c1b"


# --- without a stack ----------------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A SAGE_HOME of this test's own, no admin key or gateway URL from the outside."""
    sage_home = tmp_path / "sage"
    monkeypatch.setenv("SAGE_HOME", str(sage_home))
    for name in ("SAGE_ADMIN_API_KEY", "SAGE_ADMIN_API_KEY_FILE", "SAGE_UNIFIED_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env
    return sage_home


def test_the_key_file_is_sent_to_this_machine_only(home: Path) -> None:
    settings = SageSettings(home=home)
    key = ensure_secret_file(home / "llm" / "admin.key", prefix="sk-admin-")
    with socket.create_server(("127.0.0.1", 0)) as ours:
        port = ours.getsockname()[1]
        assert admin_key_for(f"http://127.0.0.1:{port}/v1", settings) == key
        assert admin_key_for(f"http://localhost:{port}/v1", settings) == key
    # Nobody listening (the stack is down): a squatter could take the port, so no key.
    assert admin_key_for(f"http://127.0.0.1:{port}/v1", settings) is None
    # Another host never receives this machine's key (the environment's key is the
    # operator's explicit choice and goes wherever they point it).
    assert admin_key_for("http://192.0.2.10:8889/v1", settings) is None
    assert admin_key_for("https://gateway.example.invalid/v1", settings) is None
    seen: list[httpx.Request] = []

    def remote(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"engines": []})

    with ManagementClient("http://192.0.2.10:8889/v1", transport=httpx.MockTransport(remote)) as c:
        assert c.list_engines() == []
    assert "authorization" not in seen[0].headers


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to listen as another user")
def test_the_key_is_not_sent_to_another_users_listener(home: Path) -> None:
    """Another local user who binds the gateway port while the stack is down gets no key."""
    settings = SageSettings(home=home)
    ensure_secret_file(home / "llm" / "admin.key", prefix="sk-admin-")
    squatter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, socket, sys, time; os.setuid(65534); "
            "s = socket.create_server(('127.0.0.1', 0)); "
            "print(s.getsockname()[1], flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert squatter.stdout is not None
        port = int(squatter.stdout.readline())
        assert admin_key_for(f"http://127.0.0.1:{port}/v1", settings) is None
    finally:
        squatter.kill()
        squatter.wait()


def test_a_key_file_others_can_read_is_a_clear_error(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ensure_secret_file(home / "llm" / "admin.key", prefix="sk-admin-")
    (home / "llm" / "admin.key").chmod(0o644)
    # The CLI stops before any request, naming the file and the fix.
    assert main(["llm", "engine", "list", "--url", "http://127.0.0.1:9/v1"]) == 2
    said = capsys.readouterr().err
    assert "readable by other users" in said and "chmod 600" in said, said
    client = UnifiedInferenceClient("http://127.0.0.1:9/v1", max_retries=0)
    with client, pytest.raises(ConfigurationError, match="readable by other users"):
        client.get_status()


def test_model_folders_typed_for_serve_become_allowed_roots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    typed = local_model_path("./my-model")
    assert typed == str(folder)  # lifecycle takes local folders as absolute paths only
    assert local_model_path("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    settings = SageSettings(home=tmp_path / "sage", model_roots="/srv/models")
    engines = [EngineRequest(typed, "llm", 0), EngineRequest("sim-embedding", "embedding", 0)]
    # Appended to what the operator configured, never replacing it.
    assert model_roots_value(settings, engines) == f"/srv/models,{folder}"


# --- against `sage llm serve` -------------------------------------------------------------


@dataclass
class Stack:
    """A `sage llm serve` started with tenant API keys and no admin key."""

    proc: subprocess.Popen[str]
    base_url: str
    home: Path
    env: dict[str, str]
    output: str
    model: str

    @property
    def admin_key(self) -> str:
        return (self.home / "llm" / "admin.key").read_text().strip()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("admin-default")
    home = root / "sage"
    model_dir = root / "models" / "local-chat"  # a local folder named on the command line
    model_dir.mkdir(parents=True)
    gateway = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGE_", "OPENAI_"))}
    env.update(
        {
            "SAGE_HOME": str(home),
            "SAGE_SCHEDULER_PORT": str(free_port()),
            "SAGE_LIFECYCLE_PORT": str(free_port()),
            "SAGE_GPU_MANAGER_PORT": str(free_port()),
            "SAGE_EMBEDDING_SERVICE_PORT": str(free_port()),
            "SAGE_DISABLE_NVML": "1",
            "SAGE_API_KEYS": f"{TENANT_KEY}:tenant-a",
            "PYTHONUNBUFFERED": "1",
        }
    )
    argv = [
        sys.executable, "-m", "sage.llm.cli", "llm", "serve", "--model", str(model_dir),
        "--backend", "sim", "--no-embedding", "--gateway-port", str(gateway),
        "--port", str(free_port()),
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=root
    )
    output: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        while not any("gateway listening" in line for line in output[-1:]):
            line = proc.stdout.readline()
            if not line or time.monotonic() > deadline:
                raise AssertionError("serve did not come up:\n" + "".join(output))
            output.append(line)
        yield Stack(
            proc, f"http://127.0.0.1:{gateway}/v1", home, env, "".join(output), str(model_dir)
        )
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.e2e
def test_serve_writes_the_secrets_0600_and_hands_their_files_to_every_child(
    stack: Stack,
) -> None:
    state = stack.home / "llm"
    # Engine logs, the registry and the secrets: no other local user can list or read them.
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for name in ("admin.key", "internal.token"):
        mode = stat.S_IMODE((state / name).stat().st_mode)
        assert mode == 0o600, f"{name}: {mode:o}"
    key = stack.admin_key
    assert key.startswith("sk-admin-") and len(key) > 40
    # The start-up summary says where the key is and what tenant keys do; never the key.
    assert f"admin key: {state / 'admin.key'}" in stack.output, stack.output
    assert "tenant API keys: required" in stack.output and "never open management" in stack.output
    doc = json.loads((state / "daemon.json").read_text())
    assert doc["admin_key_file"] == str(state / "admin.key")
    for name, service in doc["services"].items():
        env = psutil.Process(service["pid"]).environ()
        assert env["SAGE_ADMIN_API_KEY_FILE"] == str(state / "admin.key"), name
        assert env["SAGE_INTERNAL_TOKEN_FILE"] == str(state / "internal.token"), name
        assert "SAGE_ADMIN_API_KEY" not in env, name
        log = Path(service["log"]).read_text()
        assert key not in log, f"admin key in {name}.log"
    assert key not in stack.output and key not in json.dumps(doc)


@pytest.mark.e2e
def test_management_refuses_no_key_and_tenant_keys(stack: Stack) -> None:
    url = f"{stack.base_url}/management/engines"
    anonymous = httpx.get(url, timeout=10, trust_env=False)
    assert anonymous.status_code in (401, 403), anonymous.text
    as_tenant = httpx.get(
        url, headers={"authorization": f"Bearer {TENANT_KEY}"}, timeout=10, trust_env=False
    )
    assert as_tenant.status_code in (401, 403), as_tenant.text
    start = httpx.post(
        url,
        json={"model_id": "sim-x", "backend": "sim"},
        headers={"authorization": f"Bearer {TENANT_KEY}"},
        timeout=10,
        trust_env=False,
    )
    assert start.status_code in (401, 403), start.text
    as_admin = httpx.get(
        url, headers={"authorization": f"Bearer {stack.admin_key}"}, timeout=10, trust_env=False
    )
    assert as_admin.status_code == 200, as_admin.text


@pytest.mark.e2e
def test_cli_works_with_no_key_configured(stack: Stack) -> None:
    def sage(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sage.llm.cli", "llm", *argv],
            env=stack.env,  # SAGE_HOME only: no admin key, no URL
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )

    listed = sage("engine", "list", "--json")
    assert listed.returncode == 0, listed
    engines = json.loads(listed.stdout)["engines"]
    # The local folder named on the command line was allowed (SAGE_MODEL_ROOTS) and runs.
    assert [(e["model_id"], e["status"]) for e in engines] == [(stack.model, "RUNNING")]
    status = sage("status")
    assert status.returncode == 0, status
    assert f"admin key: {stack.home / 'llm' / 'admin.key'}" in status.stdout, status
    assert stack.admin_key not in status.stdout
    # A wrong key is refused, and the message says where the right one comes from.
    wrong = sage("engine", "list", "--api-key", TENANT_KEY)
    assert wrong.returncode == 2, wrong
    assert "admin.key" in wrong.stderr, wrong.stderr


@pytest.fixture
def stack_home(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Stack:
    """This process as a user's shell on the stack's machine: its SAGE_HOME, no keys set."""
    monkeypatch.setenv("SAGE_HOME", str(stack.home))
    for name in ("SAGE_ADMIN_API_KEY", "SAGE_CHAT_API_KEY", "SAGE_UNIFIED_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    return stack


@pytest.mark.e2e
def test_python_clients_send_the_key_on_management_only(stack_home: Stack) -> None:
    stack = stack_home
    sent: list[tuple[str, str | None]] = []

    def record(request: httpx.Request) -> None:
        sent.append((request.url.path, request.headers.get("authorization")))

    http = httpx.Client(trust_env=False, timeout=30, event_hooks={"request": [record]})
    with UnifiedInferenceClient.create(
        control_plane_url=stack.base_url, http_client=http, max_retries=0
    ) as client:
        status = client.get_status()
        assert status["llm_available"] is True
        # No tenant key given: the chat goes out with no key at all, not the admin key.
        with pytest.raises((AuthenticationError, PermissionDeniedError)):
            client.chat("hi", model=stack.model, max_tokens=2)
    http.close()
    admin = f"Bearer {stack.admin_key}"
    assert ("/v1/management/status", admin) in sent
    inference = [auth for path, auth in sent if not path.startswith("/v1/management")]
    assert inference == [None], sent

    with UnifiedInferenceClient.create_for_model(
        stack.model, control_plane_url=stack.base_url, api_key=TENANT_KEY
    ) as tenant:
        assert tenant.chat("hi", max_tokens=2)
    with ManagementClient(stack.base_url) as management:
        assert [e.model_id for e in management.list_engines()] == [stack.model]


@pytest.mark.e2e
async def test_async_client_reads_the_key_file_too(stack_home: Stack) -> None:
    stack = stack_home
    async with AsyncUnifiedInferenceClient.create(control_plane_url=stack.base_url) as aclient:
        assert (await aclient.get_status())["llm_available"] is True
