"""ManagementClient: base URL precedence, OpenAI error JSON -> SageError, no gateway."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from sage.common.config.ports import SagePorts
from sage.common.exceptions import (
    AuthenticationError,
    ConflictError,
    EngineNotFoundError,
    EngineStartError,
    InsufficientResourcesError,
    InternalError,
    InvalidRequestError,
    NotFoundError,
    ServiceUnavailableError,
)
from sage.common.utils.processes import free_port
from sage.llm.cli_engine import EXIT_FAILED, EXIT_USAGE, exit_code_for
from sage.llm.management import ManagementClient, error_from_response, resolve_base_url


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SAGE_HOME", str(tmp_path))
    monkeypatch.delenv("SAGE_UNIFIED_BASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env
    return tmp_path


def _daemon(home: Path, pid: int, url: str) -> None:
    (home / "llm").mkdir(exist_ok=True)
    (home / "llm" / "daemon.json").write_text(json.dumps({"pid": pid, "gateway_url": url}))


def test_default_is_the_local_gateway(home: Path) -> None:
    assert resolve_base_url() == f"http://localhost:{SagePorts.GATEWAY_DEFAULT}/v1"


def test_live_daemon_file_beats_the_default(home: Path) -> None:
    _daemon(home, os.getpid(), "http://127.0.0.1:9999/v1")
    assert resolve_base_url() == "http://127.0.0.1:9999/v1"


def test_dead_daemon_file_is_ignored(home: Path) -> None:
    _daemon(home, 2**22 + 12345, "http://127.0.0.1:9999/v1")
    assert resolve_base_url().endswith(f":{SagePorts.GATEWAY_DEFAULT}/v1")


def test_env_beats_daemon_file_and_argument_beats_env(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _daemon(home, os.getpid(), "http://127.0.0.1:9999/v1")
    monkeypatch.setenv("SAGE_UNIFIED_BASE_URL", "http://env:1/v1/")
    assert resolve_base_url() == "http://env:1/v1"
    assert resolve_base_url("http://arg:2") == "http://arg:2/v1"


def test_admin_key_from_env(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGE_ADMIN_API_KEY", "s3cret")
    with ManagementClient("http://x:1/v1") as client:
        assert client._http.headers["authorization"] == "Bearer s3cret"
    with ManagementClient("http://x:1/v1", api_key="") as client:
        assert "authorization" not in client._http.headers


def _response(status: int, body: object) -> httpx.Response:
    return httpx.Response(status, json=body, request=httpx.Request("GET", "http://x/v1"))


def _openai(message: str, type_: str, param: str | None, code: str | None) -> object:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, None, InvalidRequestError),
        (401, "invalid_api_key", AuthenticationError),
        (404, "engine_not_found", EngineNotFoundError),
        (404, "not_found", NotFoundError),
        (409, "conflict", ConflictError),
        (409, "insufficient_gpu_resources", InsufficientResourcesError),
        (500, "engine_start_failed", EngineStartError),
        (503, "service_unavailable", ServiceUnavailableError),
        (500, None, InternalError),
    ],
)
def test_errors_keep_class_param_and_code(status: int, code: str | None, cls: type) -> None:
    error = error_from_response(_response(status, _openai("why", "t", "port", code)))
    assert type(error) is cls
    assert (error.message, error.param, error.code) == ("why", "port", code or error.code)


def test_non_json_error_body() -> None:
    resp = httpx.Response(502, text="bad gateway", request=httpx.Request("GET", "http://x"))
    error = error_from_response(resp)
    assert error.message == "bad gateway" and error.param is None


def test_no_gateway_is_a_clear_usage_error() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    with ManagementClient(url) as client, pytest.raises(ServiceUnavailableError) as info:
        client.list_engines()
    assert info.value.message == f"no SAGE gateway at {url}; start it with `sage llm serve`"
    assert exit_code_for(info.value) == EXIT_USAGE


def test_exit_codes() -> None:
    assert exit_code_for(InvalidRequestError("unknown backend")) == EXIT_USAGE
    assert exit_code_for(EngineNotFoundError("not found")) == EXIT_FAILED
    assert exit_code_for(InsufficientResourcesError("no GPU")) == EXIT_FAILED
    assert exit_code_for(EngineStartError("died")) == EXIT_FAILED


def test_engine_ids_are_one_path_segment() -> None:
    with ManagementClient("http://x:1/v1") as client, pytest.raises(InvalidRequestError):
        client.get_engine("../status")
