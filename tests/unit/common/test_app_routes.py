"""The edge framework's path templates: `{name}` is one path segment, methods are per
template (so a POST to a GET-only resource is a 405 naming what it allows, not a 415 from
the JSON guard), and requests are labelled by their template, not the concrete path."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from sage.common.http import App, JSONResponse, Request, Response
from sage.common.http.testing import quiet_server, serve_in_task
from sage.common.utils.processes import free_port

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def client() -> AsyncIterator[tuple[httpx.AsyncClient, list[str]]]:
    seen: list[str] = []
    app = App(observer=lambda method, route, model, status, s: seen.append(f"{method} {route}"))

    async def show(request: Request) -> Response:
        return JSONResponse({"path": request.path})

    app.add("GET", "/things/{id}", show)
    app.add("DELETE", "/things/{id}", show)
    app.add("GET", "/things/{id}/logs", show)
    app.add("POST", "/things/{id}/parts", show)
    app.add("DELETE", "/things/{id}/parts/{name}", show)
    app.add("POST", "/things/special", show)
    port = free_port()
    server = quiet_server(app, port)
    task = await serve_in_task(server)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            yield http, seen
    finally:
        server.should_exit = True
        await task


async def test_templates_match_one_segment(client: tuple[httpx.AsyncClient, list[str]]) -> None:
    http, seen = client
    assert (await http.get("/things/a")).json() == {"path": "/things/a"}
    assert (await http.get("/things/a/logs")).status_code == 200
    assert (await http.delete("/things/a/parts/p1")).status_code == 200
    assert (await http.get("/things/a/b/logs")).status_code == 404
    assert (await http.get("/things/a/nothing")).status_code == 404
    # an exact route wins over a template
    assert (await http.post("/things/special", json={})).status_code == 200
    assert "GET /things/{id}/logs" in seen and "DELETE /things/{id}/parts/{name}" in seen


async def test_methods_are_per_template(client: tuple[httpx.AsyncClient, list[str]]) -> None:
    http, _ = client
    reply = await http.post("/things/a/logs")  # no JSON content type: still a 405
    assert reply.status_code == 405
    assert reply.headers["allow"] == "GET"
    reply = await http.request("PUT", "/things/a/parts")
    assert reply.status_code == 405 and reply.headers["allow"] == "POST"
    reply = await http.get("/things/a/parts")
    assert reply.status_code == 405
