"""Bearer API keys at the edge and per-tenant rate limits in the scheduler, end to end."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import orjson
import pytest
import yaml

from sage.common.config.settings import SageSettings
from sage.common.http.testing import RecordingEngine
from sage.rpc.scheduler.v1 import scheduler_pb2

KEYS_FILE = [
    {"key": "sk-team-a-1", "tenant": "team-a", "rate_limit_rpm": 2},
    {"key": "sk-team-a-2", "tenant": "team-a", "rate_limit_rpm": 2},
    {"key": "sk-team-b", "tenant": "team-b", "rate_limit_rpm": 2},
    {"key": "sk-tokens", "tenant": "team-t", "rate_limit_tpm": 1000},
]


@pytest.fixture
def settings_update() -> dict[str, Any]:
    """Extra settings for the edge; tests parametrize it by name."""
    return {}


@pytest.fixture
def settings(
    settings: SageSettings, tmp_path: Path, settings_update: dict[str, Any]
) -> SageSettings:
    """Keys from both sources: SAGE_API_KEYS and a YAML keys file with limits."""
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump(KEYS_FILE))
    return settings.model_copy(
        update={
            "api_keys": "sk-env-plain, sk-env-tenant:team-env",
            "api_keys_file": keys_file,
            "admin_api_key": "admin-secret",
            **settings_update,
        }
    )


@pytest.fixture
async def recorder() -> AsyncIterator[RecordingEngine]:
    """A recording engine (model `rec`) that reports 4 tokens of usage per reply."""
    async with RecordingEngine() as engine:
        yield engine


@pytest.fixture
async def edge(control_plane: Any, recorder: RecordingEngine) -> httpx.AsyncClient:
    """The edge client with the recorder registered."""
    await control_plane.register("rec-a", "rec", recorder.base_url)
    client: httpx.AsyncClient = control_plane.client
    return client


CHAT = {"model": "rec", "messages": [{"role": "user", "content": "hi"}]}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.mark.parametrize(
    ("headers", "needle"),
    [
        ({}, "didn't provide an API key"),
        ({"authorization": "sk-env-plain"}, "didn't provide an API key"),
        (bearer("sk-wrong-key"), "Incorrect API key provided"),
        (bearer("admin-secret"), "Incorrect API key provided"),
    ],
)
async def test_inference_routes_need_a_valid_key(
    edge: httpx.AsyncClient, recorder: RecordingEngine, headers: dict[str, str], needle: str
) -> None:
    for method, path, body in (
        ("POST", "/v1/chat/completions", CHAT),
        ("POST", "/v1/completions", {"model": "rec", "prompt": "x"}),
        ("POST", "/v1/embeddings", {"model": "e", "input": "x"}),
        ("GET", "/v1/models", None),
    ):
        resp = await edge.request(method, path, json=body, headers=headers)
        assert resp.status_code == 401, (path, resp.text)
        assert resp.json()["error"] == {
            "message": resp.json()["error"]["message"],
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
        assert needle in resp.json()["error"]["message"]
    # checked before the body is even read: nothing reached the engine
    assert not recorder.requests


@pytest.mark.parametrize("key", ["sk-env-plain", "sk-env-tenant", "sk-team-b", "sk-tokens"])
async def test_keys_from_env_and_file_are_accepted(edge: httpx.AsyncClient, key: str) -> None:
    resp = await edge.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
    assert resp.status_code == 200, resp.text
    models = await edge.get("/v1/models", headers=bearer(key))
    assert [m["id"] for m in models.json()["data"]] == ["rec"]


async def test_health_and_docs_stay_open(edge: httpx.AsyncClient) -> None:
    assert (await edge.get("/health")).status_code == 200
    assert (await edge.get("/openapi.json")).status_code == 200
    # with API keys configured, /metrics (tenants, models) takes a key unless turned off
    assert (await edge.get("/metrics")).status_code == 401
    assert (await edge.get("/metrics", headers=bearer("sk-team-b"))).status_code == 200


@pytest.mark.parametrize("settings_update", [{"metrics_require_auth": False}])
async def test_metrics_can_be_opened_explicitly(edge: httpx.AsyncClient) -> None:
    assert (await edge.get("/metrics")).status_code == 200


async def test_management_keeps_the_admin_key(edge: httpx.AsyncClient) -> None:
    denied = await edge.get("/v1/management/status", headers=bearer("sk-env-plain"))
    assert denied.status_code == 401
    allowed = await edge.get("/v1/management/status", headers=bearer("admin-secret"))
    assert allowed.status_code == 200, allowed.text


@pytest.mark.parametrize("settings_update", [{"metrics_require_auth": True}])
async def test_metrics_can_require_a_key(edge: httpx.AsyncClient) -> None:
    anonymous = await edge.get("/metrics")
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "invalid_api_key"
    assert (await edge.get("/metrics", headers=bearer("sk-team-b"))).status_code == 200
    assert (await edge.get("/metrics", headers=bearer("admin-secret"))).status_code == 200


async def test_requests_per_minute_is_per_tenant_with_retry_after(
    edge: httpx.AsyncClient, recorder: RecordingEngine
) -> None:
    # two keys of team-a share its bucket of 2 requests per minute
    for key in ("sk-team-a-1", "sk-team-a-2"):
        ok = await edge.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
        assert ok.status_code == 200, ok.text
    limited = await edge.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-team-a-1"))
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "30"
    error = limited.json()["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert error["type"] == "rate_limit_error"
    assert "team-a" in error["message"] and "requests per minute" in error["message"]
    assert len(recorder.requests) == 2
    # streams and completions are refused the same way, before any chunk
    streamed = await edge.post(
        "/v1/chat/completions", json={**CHAT, "stream": True}, headers=bearer("sk-team-a-2")
    )
    assert streamed.status_code == 429 and streamed.headers["retry-after"]
    completion = await edge.post(
        "/v1/completions", json={"model": "rec", "prompt": "x"}, headers=bearer("sk-team-a-2")
    )
    assert completion.status_code == 429
    # another tenant is unaffected
    other = await edge.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-team-b"))
    assert other.status_code == 200


async def test_tokens_per_minute_charges_estimates_and_settles_with_usage(
    edge: httpx.AsyncClient,
) -> None:
    key = bearer("sk-tokens")  # 1000 tokens per minute
    big = {**CHAT, "max_tokens": 900}
    # ~920 tokens estimated each time; the engine reports 4 used, so the charge is
    # refunded and the next one fits again
    for _ in range(3):
        resp = await edge.post("/v1/chat/completions", json=big, headers=key)
        assert resp.status_code == 200, resp.text
    # streamed replies are charged the estimate (no usage to settle with): the second
    # one no longer fits in the minute
    stream = {**big, "stream": True}
    first = await edge.post("/v1/chat/completions", json=stream, headers=key)
    assert first.status_code == 200
    second = await edge.post("/v1/chat/completions", json=stream, headers=key)
    assert second.status_code == 429
    assert "tokens per minute" in second.json()["error"]["message"]
    # ~80 tokens left, ~920 wanted, refilling at 1000/60 per second: about 50 s
    assert 40 <= int(second.headers["retry-after"]) <= 60
    # a small request still fits in what is left
    small = await edge.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1}, headers=key)
    assert small.status_code == 200, small.text


async def test_a_direct_grpc_caller_is_charged_the_scheduler_estimate_too(
    control_plane: Any, edge: httpx.AsyncClient
) -> None:
    # No edge: the caller names a tiny estimate and other tenants' limits. The scheduler
    # ignores them, charging the key's tenant its own estimate (~920 of 1000 tokens), so
    # the same stream through the edge no longer fits in the minute.
    stream = {**CHAT, "max_tokens": 900, "stream": True}
    options = scheduler_pb2.RequestOptions(
        api_key="sk-tokens", estimated_tokens=1, tenant="team-b", rate_limit_tpm=10**9
    )
    direct = control_plane.scheduler.ChatStream(
        scheduler_pb2.ChatStreamRequest(model="rec", body=orjson.dumps(stream), options=options)
    )
    assert [m.data async for m in direct]
    refused = await edge.post("/v1/chat/completions", json=stream, headers=bearer("sk-tokens"))
    assert refused.status_code == 429
    assert "team-t" in refused.json()["error"]["message"]
    assert "tokens per minute" in refused.json()["error"]["message"]
    # and the direct caller is refused the same way, whatever estimate it names
    again = control_plane.scheduler.ChatStream(
        scheduler_pb2.ChatStreamRequest(model="rec", body=orjson.dumps(stream), options=options)
    )
    with pytest.raises(grpc.aio.AioRpcError) as limited:
        async for _ in again:
            pass
    assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tokens per minute" in (limited.value.details() or "")


async def test_unlimited_keys_are_never_limited(edge: httpx.AsyncClient) -> None:
    for _ in range(10):
        resp = await edge.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-env-plain"))
        assert resp.status_code == 200
