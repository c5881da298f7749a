"""Issue 16 at the edge's HTTP surface: management closed without the admin key, nothing a
web page can make a browser send (foreign Host, another site's Origin, a form or text/plain
POST), request ids that cannot forge log fields, /metrics behind a key when keys exist, and
one log line stating the auth posture. Real uvicorn sockets throughout."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from sage.common.config.settings import SageSettings
from sage.common.http.testing import quiet_server, serve_in_task
from sage.common.security import admin_key_path, ensure_secret_file
from sage.common.utils.processes import free_port
from sage.services.edge.app import create_app
from sage.services.edge.openapi import openapi_document

from .conftest import ADMIN_KEY, TENANT_KEY, admin, assert_no_secret, tenant

NOWHERE = "127.0.0.1:1"  # upstreams: the checks here answer before any is called
CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _edge_settings(settings: SageSettings, **update: Any) -> SageSettings:
    return settings.model_copy(
        update={
            "scheduler_addr": NOWHERE,
            "lifecycle_addr": NOWHERE,
            "gpu_manager_addr": NOWHERE,
            "rpc_timeout_s": 2.0,
            **update,
        }
    )


@contextlib.asynccontextmanager
async def edge_only(settings: SageSettings) -> AsyncIterator[httpx.AsyncClient]:
    """The edge alone on a real socket (no scheduler or lifecycle behind it)."""
    port = free_port()
    server = quiet_server(create_app(settings), port)
    task = await serve_in_task(server)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
    finally:
        server.should_exit = True
        await task


def _management_requests() -> list[tuple[str, str]]:
    """Every management operation of the OpenAPI document, with a concrete engine id."""
    return [
        (method.upper(), path.replace("{engine_id}", "no-such-engine"))
        for path, methods in openapi_document()["paths"].items()
        if path.startswith("/v1/management")
        for method in methods
    ]


def _error(reply: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    error: dict[str, Any] = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


# -- 1. the admin gate ---------------------------------------------------------------------


async def test_management_is_closed_without_an_admin_key(settings: SageSettings) -> None:
    """No SAGE_ADMIN_API_KEY and no key file: every management route answers 403 to
    everyone (tenant keys included) and says how to set a key; before, with no admin key
    configured, management was open to any caller."""
    closed = _edge_settings(settings, admin_api_key=None)
    assert not admin_key_path(closed).exists()
    async with edge_only(closed) as client:
        for method, path in _management_requests():
            body = {"model_id": "sim-x", "backend": "sim"} if method == "POST" else None
            for headers in ({}, tenant(), {"Authorization": "Bearer anything"}):
                reply = await client.request(method, path, json=body, headers=headers)
                error = _error(reply, 403, "admin_key_not_configured")
                assert "SAGE_ADMIN_API_KEY" in error["message"], error
                assert "sage llm serve" in error["message"], error


async def test_the_admin_key_file_opens_management(settings: SageSettings) -> None:
    """Without SAGE_ADMIN_API_KEY the edge takes the 0600 key file `sage llm serve` writes:
    that key (bearer scheme in any case) gets past the gate, nothing else does."""
    edge_settings = _edge_settings(settings, admin_api_key=None)
    key = ensure_secret_file(admin_key_path(edge_settings), "sk-admin-")
    async with edge_only(edge_settings) as client:
        for headers in ({}, tenant(), {"Authorization": "Bearer sk-admin-wrong"}):
            reply = await client.get("/v1/management/engines", headers=headers)
            _error(reply, 401, "invalid_api_key")
            assert key not in reply.text
        for scheme in ("Bearer", "bearer", "BEARER"):
            reply = await client.get(
                "/v1/management/engines", headers={"Authorization": f"{scheme} {key}"}
            )
            # past auth: lifecycle is not running here, so the call itself fails upstream
            assert reply.status_code not in (401, 403, 415, 421), reply.text


async def test_tenant_keys_never_open_management(secure_plane: Any) -> None:
    """With tenant keys and an admin key: a tenant key is a 401 on management (the answer
    does not confirm the key is a valid tenant key), the admin key in lowercase `bearer`
    works; before, the scheme had to be spelled `Bearer` exactly."""
    client = secure_plane.client
    reply = await client.get("/v1/management/engines", headers=tenant())
    _error(reply, 401)
    assert "tenant API keys do not open it" in reply.json()["error"]["message"]
    reply = await client.get(
        "/v1/management/engines", headers={"Authorization": f"bearer {ADMIN_KEY}"}
    )
    assert reply.status_code == 200, reply.text


async def test_start_logs_the_auth_posture_without_keys(
    settings: SageSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """One line at start says how many API keys there are, where the admin key comes from
    and whether /metrics needs a key; no key appears in it."""
    caplog.set_level(logging.INFO, logger="sage.edge")
    async with edge_only(_edge_settings(settings, metrics_require_auth=None)):
        pass
    lines = [r for r in caplog.records if r.name == "sage.edge" and r.getMessage() == "edge auth"]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    fields = lines[0].__dict__
    assert fields["api_keys"] == 2
    assert fields["admin_key"] == "env"
    assert fields["metrics_auth"] == "on"
    assert_no_secret(str(fields), "the auth posture log line")


# -- 2. no browser-borne requests ----------------------------------------------------------


async def test_a_foreign_host_header_is_421(settings: SageSettings) -> None:
    """DNS rebinding: a page's own name resolving to 127.0.0.1 sends `Host: its-name`. Only
    loopback names, IP literals, the bind host and SAGE_ALLOWED_HOSTS pass."""
    async with edge_only(_edge_settings(settings, allowed_hosts="llm.internal")) as client:
        for host in ("attacker.example:8889", "attacker.example", "localhost.attacker.example"):
            for method, path, body, headers in (
                ("GET", "/openapi.json", None, {}),
                ("GET", "/v1/models", None, tenant()),
                ("POST", "/v1/chat/completions", CHAT, tenant()),
                ("GET", "/v1/management/engines", None, admin()),
                ("GET", "/metrics", None, admin()),
            ):
                reply = await client.request(
                    method, path, json=body, headers={**headers, "Host": host}
                )
                error = _error(reply, 421, "host_not_allowed")
                assert "SAGE_ALLOWED_HOSTS" in error["message"]
        for host in (
            "localhost:8889",
            "127.0.0.1",
            "127.0.0.2:80",
            "[::1]:8889",
            "10.1.2.3:8889",
            "LLM.internal:8889",
        ):
            reply = await client.get("/openapi.json", headers={"Host": host})
            assert reply.status_code == 200, (host, reply.text)
    async with edge_only(_edge_settings(settings, allowed_hosts="*")) as client:
        reply = await client.get("/openapi.json", headers={"Host": "anything.example"})
        assert reply.status_code == 200, reply.text


async def test_simple_cross_site_posts_are_refused_and_start_nothing(
    no_leaked_children: None, secure_plane: Any
) -> None:
    """The attack of the issue: a form or text/plain POST (no CORS preflight) to start an
    engine. It is a 403 with another site's Origin, a 415 without one; nothing starts. A
    DELETE without a body needs no content type."""
    client = secure_plane.client
    start = b'{"model_id": "sim-x", "backend": "sim"}'
    evil = {"Origin": "http://evil.example"}
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        headers = {**admin(), "Content-Type": content_type}
        reply = await client.post("/v1/management/engines", content=start, headers=headers)
        _error(reply, 415, "unsupported_media_type")
        reply = await client.post(
            "/v1/management/engines", content=start, headers={**headers, **evil}
        )
        _error(reply, 403, "cross_site_request")
    reply = await client.post("/v1/management/engines/prune", headers=admin())
    _error(reply, 415)  # no body and no content type: still a state-changing POST
    reply = await client.post(
        "/v1/chat/completions", content=b"{}", headers={**tenant(), "Content-Type": "text/plain"}
    )
    _error(reply, 415)
    listed = await client.get("/v1/management/engines", headers=admin())
    assert listed.status_code == 200 and listed.json()["count"] == 0
    reply = await client.delete("/v1/management/engines/no-such-engine", headers=admin())
    _error(reply, 404)  # past the content-type rule (and auth): the engine does not exist
    reply = await client.request(
        "DELETE",
        "/v1/management/engines/no-such-engine",
        content=b"x",
        headers={**admin(), "Content-Type": "text/plain"},
    )
    _error(reply, 415)


@pytest.mark.parametrize(
    "settings_update", [{}, {"cors_origins": "https://app.example"}], ids=["no-cors", "cors"]
)
async def test_cross_site_requests_are_403_unless_cors_allows_them(
    settings: SageSettings, settings_update: dict[str, Any]
) -> None:
    """An Origin that is neither this server nor CORS-allowed, or Sec-Fetch-Site:
    cross-site, is a 403 on every route; the server's own origin and (when configured) the
    CORS origins pass, and preflights keep working for the latter."""
    async with edge_only(_edge_settings(settings, **settings_update)) as client:
        port = client.base_url.port
        assert port is not None
        for headers in (
            {"Origin": "http://evil.example"},
            {"Origin": "null"},
            {"Origin": f"http://127.0.0.1:{port + 1}"},  # another local server
            {"Sec-Fetch-Site": "cross-site"},
        ):
            for method, path, body in (
                ("GET", "/openapi.json", None),
                ("POST", "/v1/chat/completions", CHAT),
                ("POST", "/v1/management/engines", {"model_id": "x", "backend": "sim"}),
            ):
                reply = await client.request(
                    method, path, json=body, headers={**headers, **admin()}
                )
                error = _error(reply, 403, "cross_site_request")
                assert "SAGE_CORS_ORIGINS" in error["message"]
        own = {"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"}
        assert (await client.get("/openapi.json", headers=own)).status_code == 200
        # Behind a proxy on port 80 the Host carries no port: only port 80 is this origin,
        # a page on another port of the same name is not.
        proxied = {"Host": "localhost"}
        reply = await client.get(
            "/openapi.json", headers={**proxied, "Origin": "http://localhost:3000"}
        )
        _error(reply, 403, "cross_site_request")
        reply = await client.get("/openapi.json", headers={**proxied, "Origin": "http://localhost"})
        assert reply.status_code == 200, reply.text
        app_origin = {"Origin": "https://app.example", "Sec-Fetch-Site": "cross-site"}
        reply = await client.get("/openapi.json", headers=app_origin)
        preflight = await client.options(
            "/v1/chat/completions",
            headers={**app_origin, "Access-Control-Request-Method": "POST"},
        )
        if settings_update:
            assert reply.status_code == 200, reply.text
            assert reply.headers["access-control-allow-origin"] == "https://app.example"
            assert preflight.status_code == 204, preflight.text
        else:
            _error(reply, 403, "cross_site_request")
            assert preflight.status_code == 405  # no CORS: no preflight answer either


# -- 4. hygiene ----------------------------------------------------------------------------


async def test_request_ids_cannot_forge_log_fields(settings: SageSettings) -> None:
    """An x-request-id outside [A-Za-z0-9._:-]{1,128} is replaced by a fresh one (it lands
    in logs and gRPC metadata); before, spaces and `=` were kept, forging `level=ERROR`."""
    async with edge_only(_edge_settings(settings)) as client:
        for forged in (
            "evil level=ERROR msg=forged",
            "a\tb",
            'x" y',
            "ok;rm",
            "x" * 129,
        ):
            reply = await client.get("/openapi.json", headers={"x-request-id": forged})
            echoed = reply.headers["x-request-id"]
            assert echoed != forged and re.fullmatch(r"[0-9a-f]{32}", echoed), echoed
        for kept in ("req-1", "a.b:c_d-e", "0" * 128):
            reply = await client.get("/openapi.json", headers={"x-request-id": kept})
            assert reply.headers["x-request-id"] == kept


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer sk-nope"}, 401),
        ({"Authorization": f"bearer {TENANT_KEY}"}, 200),
        ({"Authorization": f"bearer {ADMIN_KEY}"}, 200),
    ],
)
async def test_metrics_need_a_key_whenever_keys_exist(
    settings: SageSettings, headers: dict[str, str], status: int
) -> None:
    """SAGE_METRICS_REQUIRE_AUTH unset (the default) with API keys configured: /metrics
    (tenants, models, engines) takes a tenant or admin key; before, it was public."""
    edge_settings = _edge_settings(settings, metrics_require_auth=None)
    async with edge_only(edge_settings) as client:
        reply = await client.get("/metrics", headers=headers)
        assert reply.status_code == status, reply.text
        if status == 401:
            _error(reply, 401, "invalid_api_key")
            assert "sage_" not in reply.text


async def test_metrics_stay_open_without_keys(settings: SageSettings) -> None:
    """No API keys and the setting unset: a local scraper needs no key."""
    open_settings = _edge_settings(settings, api_keys="", metrics_require_auth=None)
    async with edge_only(open_settings) as client:
        assert (await client.get("/metrics")).status_code == 200
