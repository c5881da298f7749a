"""Auth at the edge: tenant keys on every /v1 inference route, the admin key on every
/v1/management route (a tenant key is not enough), and /metrics behind a key when
SAGE_METRICS_REQUIRE_AUTH is set."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from sage.services.edge.app import create_app
from sage.services.edge.openapi import openapi_document

from .conftest import ADMIN_KEY, OTHER_TENANT_KEY, TENANT_KEY, admin, assert_no_secret

CHAT = {"model": "sim-llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
INFERENCE = [
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/completions", {"model": "sim-llm", "prompt": "hi", "max_tokens": 4}),
    ("POST", "/v1/embeddings", {"model": "sim-emb", "input": ["hello"]}),
    ("GET", "/v1/models", None),
]
WRONG = {
    "missing": {},
    "unknown key": {"Authorization": "Bearer sk-not-a-real-key-000000"},
    "not bearer": {"Authorization": f"Basic {TENANT_KEY}"},
    "empty bearer": {"Authorization": "Bearer"},
    "admin key is not a tenant key": {"Authorization": f"Bearer {ADMIN_KEY}"},
}


async def _register_sims(plane: Any, sim_engine: Any) -> None:
    for model, kind, args in (
        ("sim-llm", "llm", ()),
        ("sim-emb", "embedding", ("--embedding-dim", "8")),
    ):
        url = sim_engine(*args, model=model)
        reply = await plane.client.post(
            "/v1/management/engines/register",
            json={"model_id": model, "base_url": url, "engine_kind": kind},
            headers=admin(),
        )
        assert reply.status_code == 201, reply.text


def _assert_openai_401(reply: httpx.Response) -> None:
    assert reply.status_code == 401, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
    assert error["message"]
    assert_no_secret(reply.text, "a 401 body")


async def test_inference_routes_need_a_tenant_key(
    no_leaked_children: None, secure_plane: Any, sim_engine: Any
) -> None:
    """Missing, unknown, non-bearer and admin keys → 401 in OpenAI's shape; both tenants'
    keys → 200 on every inference route."""
    await _register_sims(secure_plane, sim_engine)
    client = secure_plane.client
    for method, path, body in INFERENCE:
        for label, headers in WRONG.items():
            reply = await client.request(method, path, json=body, headers=headers)
            assert reply.status_code == 401, (path, label, reply.text)
            _assert_openai_401(reply)
        for key in (TENANT_KEY, OTHER_TENANT_KEY):
            reply = await client.request(
                method, path, json=body, headers={"Authorization": f"Bearer {key}"}
            )
            assert reply.status_code == 200, (path, reply.text)


async def test_streaming_chat_needs_a_key_before_any_event(
    no_leaked_children: None, secure_plane: Any, sim_engine: Any
) -> None:
    """A streamed chat without a key is a plain 401, not an SSE stream."""
    await _register_sims(secure_plane, sim_engine)
    reply = await secure_plane.client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    _assert_openai_401(reply)
    assert not reply.headers["content-type"].startswith("text/event-stream")


def _management_requests() -> list[tuple[str, str]]:
    """Every management operation in the OpenAPI document, with a concrete engine id."""
    found = []
    for path, methods in openapi_document()["paths"].items():
        if path.startswith("/v1/management"):
            for method in methods:
                found.append((method.upper(), path.replace("{engine_id}", "no-such-engine")))
    return found


def test_every_management_route_is_documented(settings: Any) -> None:
    """The auth test below walks the document; make sure it lists every route served."""
    served = {(m, p) for m, p in create_app(settings).routes() if "/management" in p}
    documented = {
        (method.upper(), path)
        for path, methods in openapi_document()["paths"].items()
        for method in methods
        if path.startswith("/v1/management")
    }
    assert served == documented


async def test_management_routes_need_the_admin_key(
    no_leaked_children: None, secure_plane: Any
) -> None:
    """No key, a wrong key, or a tenant's key → 401/403 on every management route (and
    nothing happens); the admin key gets past auth."""
    client = secure_plane.client
    requests = _management_requests()
    assert len(requests) >= 10
    for method, path in requests:
        body = {"model_id": "sim-x", "backend": "sim"} if method == "POST" else None
        for headers in (
            {},
            {"Authorization": "Bearer wrong-admin-key"},
            {"Authorization": f"Bearer {TENANT_KEY}"},
            {"Authorization": ADMIN_KEY},  # no Bearer scheme
        ):
            reply = await client.request(method, path, json=body, headers=headers)
            assert reply.status_code in (401, 403), (method, path, headers, reply.text)
            assert reply.json()["error"]["message"]
            assert_no_secret(reply.text, f"{method} {path}")
    listed = await client.get("/v1/management/engines", headers=admin())
    assert listed.status_code == 200 and listed.json()["count"] == 0  # nothing was started
    for method, path in requests:
        if method != "GET":
            continue
        reply = await client.request(method, path, headers=admin())
        assert reply.status_code not in (401, 403), (path, reply.text)


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer nope"}, 401),
        ({"Authorization": f"Bearer {TENANT_KEY}"}, 200),
        ({"Authorization": f"Bearer {ADMIN_KEY}"}, 200),
    ],
)
async def test_metrics_behind_a_key_when_required(
    secure_plane: Any, headers: dict[str, str], status: int
) -> None:
    """SAGE_METRICS_REQUIRE_AUTH: /metrics takes a tenant key or the admin key."""
    reply = await secure_plane.client.get("/metrics", headers=headers)
    assert reply.status_code == status, reply.text
    if status == 200:
        assert "sage_" in reply.text or "# HELP" in reply.text


async def test_metrics_open_without_the_setting(settings: Any) -> None:
    """Without SAGE_METRICS_REQUIRE_AUTH, /metrics stays open for scrapers (and /health,
    /openapi.json need no key at all)."""
    app = create_app(settings.model_copy(update={"metrics_require_auth": False}))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        assert (await client.get("/metrics")).status_code == 200
        assert (await client.get("/openapi.json")).status_code == 200


async def test_health_and_openapi_need_no_key(secure_plane: Any) -> None:
    """Probes and the API document are public; they reveal no secret."""
    for path in ("/health", "/openapi.json"):
        reply = await secure_plane.client.get(path)
        assert reply.status_code == 200, (path, reply.text)
        assert_no_secret(reply.text, path)
