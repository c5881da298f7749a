"""Every Python example of the seed, run verbatim as a script against a real `sage llm serve`.

The snippets are copied from `seed/000_eb67b16380467aeb.txt`. Its text lost the indentation
of block bodies (`if`/`for`/`else`); that is restored, nothing else is changed. Where a
snippet needs something this host may lack, the test says how it is arranged:

- The seed's model `Qwen/Qwen2.5-7B-Instruct` needs a GPU, so the stack serves that name
  with a simulator engine (started through the management API before the snippet runs);
  `create_for_model("Qwen/Qwen2.5-7B-Instruct")` then finds it RUNNING, as on a real host.
- The stack's gateway listens on `SagePorts.GATEWAY_DEFAULT` (8889) when that port is free,
  so the seed's literal `http://localhost:8889/v1` works as written; when 8889 is taken,
  that one literal is replaced by the stack's URL. `create()` finds the stack through
  `SAGE_UNIFIED_BASE_URL`, the documented precedence.
- The `hf` embedding example needs `BAAI/bge-small-zh-v1.5` in the Hugging Face cache;
  without it (and no network) it runs with the bundled MiniLM folder instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from sage.common.components.sage_embedding import list_embedding_models
from sage.common.config.ports import SagePorts
from sage.common.security import read_secret_file
from sage.llm.management import ManagementClient

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

SEED_MODEL = "Qwen/Qwen2.5-7B-Instruct"
SEED_GATEWAY = f"http://localhost:{SagePorts.GATEWAY_DEFAULT}/v1"

# 示例(控制平面)
CONTROL_PLANE = """\
from sage.llm import UnifiedInferenceClient
# 默认:使用本地 Gateway 端口(SagePorts.GATEWAY_DEFAULT)
client = UnifiedInferenceClient.create()
# 显式指定 Control Plane / Gateway
client = UnifiedInferenceClient.create(control_plane_url="http://localhost:8889/v1")
# 按模型名绑定(仍经由 Control Plane)
model_bound = UnifiedInferenceClient.create_for_model("Qwen/Qwen2.5-7B-Instruct")
resp = client.chat([{ "role": "user", "content": "写一份日报" }])
"""
# Not part of the seed: shows what the snippet produced.
CONTROL_PLANE_CHECK = """
print("resp:", type(resp).__name__, bool(resp))
print("bound:", model_bound.model, model_bound.chat("hi", max_tokens=2) != "")
"""

# Embedding 服务 (sage_embedding)
HF_EMBEDDING = """\
from sage.common.components.sage_embedding import (
EmbeddingFactory,
EmbeddingClientAdapter,
)
# EmbeddingFactory 返回单文本接口 → 通过 Adapter 获得批量 embed(list[str])
raw_embedder = EmbeddingFactory.create("hf", model="BAAI/bge-small-zh-v1.5")
client = EmbeddingClientAdapter(raw_embedder)
vectors = client.embed(["Hello", "World"])
# 直接消费 BaseEmbedding 时需逐条调用:raw_embedder.embed("only-one-text")
"""
HF_EMBEDDING_CHECK = """
print("vectors:", len(vectors), len(vectors[0]) > 0)
"""

# 端口配置 (SagePorts)
PORTS = """\
from sage.common.config.ports import SagePorts
# 统一端口常量(不要硬编码)
PORT_MAP = {
"Gateway": (SagePorts.GATEWAY_DEFAULT, "OpenAI 兼容 API"),
"LLM": (SagePorts.LLM_DEFAULT, "主推理服务"),
"Embedding": (SagePorts.EMBEDDING_DEFAULT, "Embedding Server"),
"Benchmark": (SagePorts.BENCHMARK_LLM, "WSL2 fallback / benchmark"),
}
recommended = SagePorts.get_recommended_llm_port()
print(f"LLM 在此机器使用端口: {recommended}")
if SagePorts.is_wsl():
    # 8001 在 WSL2 可能出现监听但拒绝连接 → 回退 8901
    recommended = SagePorts.LLM_WSL_FALLBACK
"""

# Usage Examples / 统一推理客户端
UNIFIED_CLIENT = """\
from sage.llm import UnifiedInferenceClient
from sage.common.config.ports import SagePorts
# 推荐:自动检测(Control Plane First)
client = UnifiedInferenceClient.create()
# 显式连接本地 Gateway(如 UnifiedAPIServer)
gateway = UnifiedInferenceClient.create(control_plane_url=f"http://localhost:{SagePorts.GATEWAY_DEFAULT}/v1")
# 内嵌模式适合批处理脚本
embedded = "(deprecated)"
status = client.get_status()
print(f"LLM available: {status['llm_available']}")
print(f"Embedding available: {status['embedding_available']}")
"""

# 本地 Embedding
LOCAL_EMBEDDING = """\
from sage.common.components.sage_embedding import (
EmbeddingFactory,
EmbeddingClientAdapter,
list_embedding_models,
)
for method, info in list_embedding_models().items():
    print(f"{method}: {info['description']}")
embedder = EmbeddingFactory.create("hash", dim=384)
client = EmbeddingClientAdapter(embedder) # 获得批量接口
vectors = client.embed(["Hello", "World"])
single_vector = embedder.embed("single-text") # 仍可按需单条调用
# 离线模式:配合 UnifiedInferenceClient 只负责 embedding,LLM 仍可走 Control Plane
"""
LOCAL_EMBEDDING_CHECK = """
print("vectors:", len(vectors), len(vectors[0]), len(single_vector))
"""

# 端口 & WSL2 指南
WSL_GUIDE = """\
from sage.common.config.ports import SagePorts
if SagePorts.is_wsl():
    llm_port = SagePorts.LLM_WSL_FALLBACK # 8901
else:
    llm_port = SagePorts.LLM_DEFAULT # 8001
print("启动命令:", f"sage llm serve --port {llm_port} --embedding-port {SagePorts.EMBEDDING_DEFAULT}")
"""  # noqa: E501 - the seed's line, verbatim


class Stack:
    """A running `sage llm serve` (sim chat + sim embeddings) and the env that reaches it."""

    def __init__(self, proc: subprocess.Popen[str], base_url: str, env: dict[str, str]) -> None:
        self.proc = proc
        self.base_url = base_url
        self.env = env
        self.output: list[str] = []

    @property
    def on_default_port(self) -> bool:
        return self.base_url == f"http://127.0.0.1:{SagePorts.GATEWAY_DEFAULT}/v1"


def _gateway_port(free_port: Callable[[], int]) -> int:
    # The seed hard-codes 8889 in one example; use it when nobody else holds it.
    default = SagePorts.GATEWAY_DEFAULT
    return default if SagePorts.is_available(default) else free_port()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from sage.common.utils.processes import free_port

    home = tmp_path_factory.mktemp("seed") / "sage"
    gateway = _gateway_port(free_port)
    env = {
        **os.environ,
        "SAGE_HOME": str(home),
        "SAGE_SCHEDULER_PORT": str(free_port()),
        "SAGE_LIFECYCLE_PORT": str(free_port()),
        "SAGE_GPU_MANAGER_PORT": str(free_port()),
        "SAGE_EMBEDDING_SERVICE_PORT": str(free_port()),
        "SAGE_DISABLE_NVML": "1",
        "HF_HUB_OFFLINE": "1",
    }
    for name in ("SAGE_CHAT_MODEL", "SAGE_EMBEDDING_MODEL", "SAGE_CHAT_API_KEY"):
        env.pop(name, None)
    env.pop("SAGE_ADMIN_API_KEY", None)
    env.pop("SAGE_API_KEYS", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sage.llm.cli",
            "llm",
            "serve",
            "--model",
            "sim",
            "--embedding-model",
            "sim-embedding",
            "--gateway-port",
            str(gateway),
            "--port",
            str(free_port()),
            "--embedding-port",
            str(free_port()),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base_url = f"http://127.0.0.1:{gateway}/v1"
    running = Stack(proc, base_url, {**env, "SAGE_UNIFIED_BASE_URL": base_url})
    try:
        deadline = time.monotonic() + 90
        assert proc.stdout is not None
        while "gateway listening" not in "".join(running.output[-1:]):
            line = proc.stdout.readline()
            if not line or time.monotonic() > deadline:
                raise AssertionError("serve did not come up:\n" + "".join(running.output))
            running.output.append(line)
        # The seed's GPU model, served by a simulator under the same name.
        # Management needs the admin key serve wrote into its SAGE_HOME (the snippets, run
        # with that SAGE_HOME, find it themselves).
        admin_key = read_secret_file(home / "llm" / "admin.key")
        with ManagementClient(base_url, api_key=admin_key) as mgmt:
            engine = mgmt.start_engine(SEED_MODEL, backend="sim")
            assert engine.status == "RUNNING"
        yield running
    finally:
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGINT)  # Ctrl-C: serve stops everything it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        _, alive = psutil.wait_procs(children, timeout=10)
        for leftover in alive:
            leftover.kill()
        assert alive == [], [p.pid for p in alive]


def run_snippet(code: str, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run `code` as a script in an empty folder (no stray .env) and return its result."""
    script = tmp_path / "snippet.py"
    script.write_text(code, encoding="utf-8")
    return subprocess.run(
        [sys.executable, str(script)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )


def ok(done: subprocess.CompletedProcess[str]) -> list[str]:
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.splitlines()


def test_control_plane_example(stack: Stack, tmp_path: Path) -> None:
    code = CONTROL_PLANE
    if not stack.on_default_port:  # 8889 was taken on this host: point the literal at us
        code = code.replace('"http://localhost:8889/v1"', f'"{stack.base_url}"')
    lines = ok(run_snippet(code + CONTROL_PLANE_CHECK, stack.env, tmp_path))
    assert lines == ["resp: str True", f"bound: {SEED_MODEL} True"]


def test_unified_client_status_example(stack: Stack, tmp_path: Path) -> None:
    lines = ok(run_snippet(UNIFIED_CLIENT, stack.env, tmp_path))
    assert lines == ["LLM available: True", "Embedding available: True"]


def test_default_gateway_without_env(stack: Stack, tmp_path: Path) -> None:
    """With nothing set, `create()` is the local gateway on SagePorts.GATEWAY_DEFAULT."""
    if not stack.on_default_port:
        pytest.skip(f"port {SagePorts.GATEWAY_DEFAULT} is held by another process")
    env = {k: v for k, v in stack.env.items() if k != "SAGE_UNIFIED_BASE_URL"}
    lines = ok(run_snippet(UNIFIED_CLIENT, env, tmp_path))
    assert lines == ["LLM available: True", "Embedding available: True"]


def test_ports_example(tmp_path: Path) -> None:
    lines = ok(run_snippet(PORTS, dict(os.environ), tmp_path))
    assert lines == [f"LLM 在此机器使用端口: {SagePorts.get_recommended_llm_port()}"]


def test_wsl_guide_example(tmp_path: Path) -> None:
    lines = ok(run_snippet(WSL_GUIDE, dict(os.environ), tmp_path))
    port = SagePorts.LLM_WSL_FALLBACK if SagePorts.is_wsl() else SagePorts.LLM_DEFAULT
    assert lines == [
        f"启动命令: sage llm serve --port {port} --embedding-port {SagePorts.EMBEDDING_DEFAULT}"
    ]


def test_local_embedding_example(tmp_path: Path) -> None:
    lines = ok(run_snippet(LOCAL_EMBEDDING + LOCAL_EMBEDDING_CHECK, dict(os.environ), tmp_path))
    methods = list_embedding_models()
    assert lines[: len(methods)] == [f"{m}: {info['description']}" for m, info in methods.items()]
    assert "hash" in methods and lines[len(methods) :] == ["vectors: 2 384 384"]


def test_hf_embedding_example(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = run_snippet(HF_EMBEDDING + HF_EMBEDDING_CHECK, env, tmp_path)
    if done.returncode != 0 and "not in the Hugging Face cache" in done.stderr:
        # No network here and the seed's model is not cached: the same code on a local copy.
        from sage.engines.embedding.model import resolve_model_path

        local = resolve_model_path("minilm")
        code = HF_EMBEDDING.replace('"BAAI/bge-small-zh-v1.5"', repr(local))
        done = run_snippet(code + HF_EMBEDDING_CHECK, env, tmp_path)
    assert ok(done) == ["vectors: 2 True"]
