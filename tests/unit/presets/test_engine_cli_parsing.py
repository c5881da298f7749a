"""The seed's `sage llm engine|preset|logs` forms reach the gateway as the right calls.

`main()` runs in this process against a fake of the gateway's management HTTP API
(httpx.MockTransport under the real ManagementClient), so each test checks parsing and
the request it turns into.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from sage.llm import cli_engine, cli_preset
from sage.llm.cli import main
from sage.llm.management import ManagementClient
from sage.llm.presets import ApplyResult, Preset


class FakeGateway:
    """The `/v1/management/*` routes the CLI calls, recording each request."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.urls: list[str | None] = []
        self.keys: list[str | None] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path.removeprefix("/v1/management")
        if request.method == "GET" and path == "/engines":
            return httpx.Response(200, json={"engines": [self._engine("engine-1", "sim")]})
        if request.method == "POST" and path == "/engines":
            body = json.loads(request.content)
            status = "RUNNING" if body["wait"] else "STARTING"
            engine = self._engine("engine-2", body["model_id"], body["engine_kind"], status)
            return httpx.Response(200, json=engine)
        if request.method == "POST" and path == "/engines/prune":
            return httpx.Response(200, json={"pruned": []})
        if request.method == "DELETE" and path.startswith("/engines/"):
            engine_id = path.rsplit("/", 1)[1]
            if engine_id == "missing":
                error = {"message": "no engine 'missing'", "type": "invalid_request_error"}
                return httpx.Response(404, json={"error": {**error, "code": "engine_not_found"}})
            return httpx.Response(200, json=self._engine(engine_id, "sim", status="STOPPED"))
        if request.method == "GET" and path.endswith("/logs"):
            lines = int(request.url.params["lines"])
            return httpx.Response(200, json={"lines": [f"line {i}" for i in range(lines)][-3:]})
        return httpx.Response(404, json={"error": {"message": "no route", "code": "unknown_url"}})

    @staticmethod
    def _engine(
        engine_id: str, model: str, kind: str = "llm", status: str = "RUNNING"
    ) -> dict[str, Any]:
        return {
            "engine_id": engine_id,
            "model_id": model,
            "engine_kind": kind,
            "backend": "sim",
            "status": status,
            "base_url": "http://127.0.0.1:9/v1",
        }

    def last(self) -> httpx.Request:
        """The latest request."""
        return self.requests[-1]

    def body(self) -> dict[str, Any]:
        """The latest request's JSON body."""
        doc: dict[str, Any] = json.loads(self.last().content)
        return doc


@pytest.fixture
def gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeGateway:
    monkeypatch.setenv("SAGE_HOME", str(tmp_path / "sage"))
    monkeypatch.delenv("SAGE_UNIFIED_BASE_URL", raising=False)
    monkeypatch.delenv("SAGE_ADMIN_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    fake = FakeGateway()

    def client_for(url: str | None, api_key: str | None) -> ManagementClient:
        fake.urls.append(url)
        fake.keys.append(api_key)
        return ManagementClient(
            url or "http://gateway.test/v1", api_key=api_key, transport=httpx.MockTransport(fake)
        )

    monkeypatch.setattr(cli_engine, "client_for", client_for)
    monkeypatch.setattr(cli_preset, "client_for", client_for)
    return fake


def sage(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["llm", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_engine_list(gateway: FakeGateway, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = sage(capsys, "engine", "list")
    assert code == 0 and "engine-1" in out and "ENGINE" in out
    assert (gateway.last().method, gateway.last().url.path) == ("GET", "/v1/management/engines")
    assert gateway.urls == [None] and gateway.keys == [None]
    code, out, _ = sage(capsys, "engine", "list", "--json")
    assert code == 0 and json.loads(out)["count"] == 1


def test_engine_start_tensor_parallel(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = sage(
        capsys, "engine", "start", "Qwen/Qwen2.5-7B-Instruct", "--tensor-parallel", "2"
    )
    assert code == 0 and "started engine-2" in out
    assert gateway.body() == {
        "model_id": "Qwen/Qwen2.5-7B-Instruct",
        "engine_kind": "llm",
        "backend": "auto",
        "use_gpu": None,
        "wait": True,
        "tensor_parallel_size": 2,
    }


def test_engine_start_embedding(gateway: FakeGateway, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = sage(capsys, "engine", "start", "BAAI/bge-m3", "--engine-kind", "embedding")
    assert code == 0, out
    assert (gateway.body()["model_id"], gateway.body()["engine_kind"]) == (
        "BAAI/bge-m3",
        "embedding",
    )


def test_engine_start_every_flag(gateway: FakeGateway, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = sage(
        capsys, "engine", "start", "m", "-tp", "4", "-pp", "2", "--backend", "vllm",
        "--engine-port", "8123", "--required-memory-gb", "20.5", "--label", "l",
        "--max-concurrent", "32", "--no-gpu", "--json", "--extra-arg=--enforce-eager",
        "--extra-arg", "--seed=1", "--engine-id", "e-1", "--startup-timeout", "30",
        "--no-wait", "--url", "http://h:1/v1", "--api-key", "k",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["status"] == "STARTING"
    assert gateway.body() == {
        "model_id": "m",
        "engine_kind": "llm",
        "backend": "vllm",
        "use_gpu": False,
        "wait": False,
        "tensor_parallel_size": 4,
        "pipeline_parallel_size": 2,
        "port": 8123,
        "required_memory_gb": 20.5,
        "engine_label": "l",
        "max_concurrent_requests": 32,
        "extra_args": ["--enforce-eager", "--seed=1"],
        "engine_id": "e-1",
        "startup_timeout_s": 30,
    }
    assert gateway.urls[-1] == "http://h:1/v1" and gateway.keys[-1] == "k"
    assert gateway.last().headers["authorization"] == "Bearer k"
    assert sage(capsys, "engine", "start", "m", "--use-gpu")[0] == 0
    assert gateway.body()["use_gpu"] is True


@pytest.mark.parametrize(
    "argv",
    [
        ("engine", "start", "m", "--engine-kind", "rerank"),
        ("engine", "start", "m", "--tensor-parallel", "0"),
        ("engine", "start", "m", "--engine-port", "70000"),
        ("engine", "start", "m", "--use-gpu", "--no-gpu"),
        ("engine", "start"),
        ("engine", "stop"),
        ("engine", "frobnicate"),
        ("preset", "show"),
        ("preset", "apply", "-n", "a", "-f", "b.yaml"),
        ("logs", "-n", "-1"),
        ("logs", "--no-such-flag"),
    ],
)
def test_usage_errors_exit_2(
    argv: tuple[str, ...], gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = sage(capsys, *argv)
    assert code == 2
    assert "error:" in err and "Usage: sage llm" in err
    assert out == "" and gateway.requests == []


def test_engine_stop_and_prune(gateway: FakeGateway, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = sage(capsys, "engine", "stop", "engine-abc123")
    assert code == 0 and "stopped engine-abc123" in out
    request = gateway.last()
    assert (request.method, request.url.path) == ("DELETE", "/v1/management/engines/engine-abc123")
    assert "drain" not in request.url.params
    assert sage(capsys, "engine", "stop", "x", "--drain")[0] == 0
    assert gateway.last().url.params["drain"] == "true"
    code, out, err = sage(capsys, "engine", "stop", "missing")
    assert code == 1 and "not found" in err
    code, out, _ = sage(capsys, "engine", "prune")
    assert code == 0 and out.strip() == "nothing to prune"
    assert gateway.last().url.path == "/v1/management/engines/prune"


def test_preset_forms(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, _ = sage(capsys, "preset", "list")
    assert code == 0 and "qwen-mini-with-embeddings" in out
    code, out, _ = sage(capsys, "preset", "show", "-n", "qwen-mini-with-embeddings")
    assert code == 0 and "BAAI/bge-small-zh-v1.5" in out
    shown = json.loads(
        sage(capsys, "preset", "show", "-n", "qwen-mini-with-embeddings", "--json")[1]
    )
    assert shown["name"] == "qwen-mini-with-embeddings"

    calls: list[dict[str, Any]] = []

    def apply_preset(preset: Preset, client: ManagementClient, **kwargs: Any) -> ApplyResult:
        calls.append({"preset": preset.name, **kwargs})
        return ApplyResult(preset=preset, dry_run=bool(kwargs.get("dry_run")))

    monkeypatch.setattr(cli_preset, "apply_preset", apply_preset)
    # No terminal to confirm on and no --yes: refused before anything happens.
    code, _, err = sage(capsys, "preset", "apply", "-n", "qwen-mini-with-embeddings")
    assert code == 2 and "--yes" in err and calls == []
    code, out, _ = sage(capsys, "preset", "apply", "-n", "qwen-mini-with-embeddings", "--yes")
    assert code == 0 and "applied" in out
    assert calls[-1]["preset"] == "qwen-mini-with-embeddings"
    assert (calls[-1]["dry_run"], calls[-1]["rollback"]) == (False, True)

    preset_file = Path("p.yaml")
    preset_file.write_text("version: 1\nname: p\nengines:\n  - {name: a, model: sim}\n")
    code, out, _ = sage(
        capsys, "preset", "apply", "-f", str(preset_file), "--yes", "--dry-run", "--no-rollback"
    )
    assert code == 0 and "dry run of 'p'" in out
    assert (calls[-1]["preset"], calls[-1]["dry_run"], calls[-1]["rollback"]) == (
        "p",
        True,
        False,
    )


def test_logs_forms(
    gateway: FakeGateway,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    code, _, err = sage(capsys, "logs", "--tail", "100")
    assert code == 1 and "no logs under" in err
    log_dir = tmp_path / "sage" / "llm" / "logs"
    log_dir.mkdir(parents=True)
    (log_dir / "edge.log").write_text("".join(f"edge {i}\n" for i in range(10)))
    (log_dir / "scheduler.log").write_text("sched\n")
    code, out, _ = sage(capsys, "logs", "--tail", "2")
    assert code == 0 and out.count("==>") == 2 and "edge 9" in out and "edge 7" not in out
    code, out, _ = sage(capsys, "logs", "edge", "-n", "1")
    assert code == 0 and out.count("==>") == 1 and out.splitlines()[-1] == "edge 9"
    assert gateway.requests == []  # service logs are read from disk

    code, out, _ = sage(capsys, "logs", "engine-1", "-n", "5")
    assert code == 0 and out.splitlines() == ["line 2", "line 3", "line 4"]
    assert gateway.last().url.path == "/v1/management/engines/engine-1/logs"
    assert gateway.last().url.params["lines"] == "5"

    def interrupt(_: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("sage.llm.cli_engine.time.sleep", interrupt)
    code, _, _ = sage(capsys, "logs", "engine-1", "-n", "5", "-f")
    assert code == 0  # Ctrl-C ends --follow normally
    assert int(gateway.last().url.params["lines"]) >= cli_engine.FOLLOW_WINDOW


@pytest.mark.parametrize(
    ("previous", "current", "new"),
    [
        ([], ["a", "b"], ["a", "b"]),
        (["a", "b"], ["a", "b"], []),
        (["a", "b"], ["a", "b", "c"], ["c"]),
        (["a", "b", "c"], ["b", "c", "d", "e"], ["d", "e"]),  # window slid
        (["a", "b"], ["x", "y"], ["x", "y"]),  # more than a window arrived
        (["x", "x"], ["x", "x", "x"], ["x"]),
    ],
)
def test_follow_prints_only_new_lines(
    previous: list[str], current: list[str], new: list[str]
) -> None:
    assert cli_engine.new_lines(previous, current) == new
