"""Edge completeness against a real stack: OpenAI fields reach the engine unchanged,
/metrics, /openapi.json (responses checked against it), CORS, body limits, HTTP errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sage.common.config.settings import SageSettings
from sage.common.http.testing import RecordingEngine
from sage.services.edge.openapi import openapi_document


@pytest.fixture
def settings_update() -> dict[str, Any]:
    """Extra settings for the edge; tests parametrize it by name."""
    return {}


@pytest.fixture
def settings(settings: SageSettings, settings_update: dict[str, Any]) -> SageSettings:
    """The shared test settings plus this test's `settings_update`."""
    return settings.model_copy(update=settings_update)


@pytest.fixture
async def recorder() -> AsyncIterator[RecordingEngine]:
    """A recording engine in the test's loop."""
    async with RecordingEngine(reply_text="recorded") as engine:
        yield engine


@pytest.fixture
async def edge(control_plane: Any, recorder: RecordingEngine) -> httpx.AsyncClient:
    """The edge client, with the recorder registered as model `rec` (alias `rec-alias`)."""
    await control_plane.register("rec-a", "rec", recorder.base_url, aliases=["rec-alias"])
    client: httpx.AsyncClient = control_plane.client
    return client


MESSAGES = [{"role": "user", "content": "天气如何?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
EVERY_FIELD: dict[str, Any] = {
    "model": "rec",
    "messages": MESSAGES,
    "tools": TOOLS,
    "tool_choice": "auto",
    "response_format": {
        "type": "json_schema",
        "json_schema": {"name": "w", "schema": {"type": "object"}},
    },
    "stop": ["\n\n", "END"],
    "n": 2,
    "temperature": 0.25,
    "top_p": 0.9,
    "max_tokens": 32,
    "max_completion_tokens": 30,
    "seed": 1234,
    "logprobs": True,
    "top_logprobs": 3,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.5,
    "user": "u-1",
    "x_engine_specific": {"nested": [1, 2.5, None]},
}


async def test_every_chat_field_reaches_the_engine_byte_for_byte(
    edge: httpx.AsyncClient, recorder: RecordingEngine
) -> None:
    raw = orjson.dumps(EVERY_FIELD)
    resp = await edge.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert resp.status_code == 200, resp.text
    assert recorder.last.path == "/v1/chat/completions"
    assert recorder.last.body == raw
    # ... and the engine's reply comes back unchanged
    reply = resp.json()
    assert reply["id"].startswith("chatcmpl-rec-")
    assert reply["choices"][0]["message"]["content"] == "recorded"


async def test_streamed_chat_passes_stream_options_and_relays_usage(
    edge: httpx.AsyncClient, recorder: RecordingEngine
) -> None:
    body = {**EVERY_FIELD, "stream": True, "stream_options": {"include_usage": True}}
    raw = orjson.dumps(body)
    async with edge.stream(
        "POST", "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    ) as resp:
        assert resp.status_code == 200
        lines = [line async for line in resp.aiter_lines() if line]
    assert recorder.last.body == raw
    assert lines[-1] == "data: [DONE]"
    chunks = [orjson.loads(line[6:]) for line in lines[:-1]]
    assert chunks[-1]["usage"]["total_tokens"] == 4
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == "recorded"


async def test_alias_rewrites_only_the_model(
    edge: httpx.AsyncClient, recorder: RecordingEngine
) -> None:
    resp = await edge.post("/v1/chat/completions", json={**EVERY_FIELD, "model": "rec-alias"})
    assert resp.status_code == 200, resp.text
    assert recorder.last.json() == EVERY_FIELD


async def test_completion_fields_reach_the_engine(
    edge: httpx.AsyncClient, recorder: RecordingEngine
) -> None:
    body = {
        "model": "rec",
        "prompt": ["a", "b"],
        "max_tokens": 4,
        "stop": "x",
        "n": 1,
        "temperature": 0,
        "seed": 7,
        "logprobs": 2,
        "echo": True,
        "suffix": "!",
    }
    raw = orjson.dumps(body)
    resp = await edge.post(
        "/v1/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert resp.status_code == 200, resp.text
    assert recorder.last.path == "/v1/completions" and recorder.last.body == raw
    assert resp.json()["choices"][0]["text"] == "recorded"


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_count_requests_by_route_model_and_status(
    edge: httpx.AsyncClient,
) -> None:
    chat = {"model": "rec", "messages": MESSAGES}
    for _ in range(3):
        assert (await edge.post("/v1/chat/completions", json=chat)).status_code == 200
    assert (await edge.post("/v1/chat/completions", json={**chat, "n": 0})).status_code == 400
    assert (await edge.get("/v1/nope")).status_code == 404
    async with edge.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as r:
        _ = [line async for line in r.aiter_lines()]
    resp = await edge.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    samples = _samples(resp.text)

    def labels(**kw: str) -> frozenset[tuple[str, str]]:
        return frozenset(kw.items())

    ok = labels(method="POST", route="/v1/chat/completions", model="rec", status="200")
    assert samples[("sage:requests_total", ok)] == 4
    assert samples[("sage:e2e_request_latency_seconds_count", ok)] == 4
    assert samples[("sage:e2e_request_latency_seconds_sum", ok)] > 0
    bad = labels(method="POST", route="/v1/chat/completions", model="rec", status="400")
    assert samples[("sage:requests_total", bad)] == 1
    unmatched = labels(method="GET", route="unmatched", model="", status="404")
    assert samples[("sage:requests_total", unmatched)] == 1
    assert samples[("sage:time_to_first_token_seconds_count", labels(model="rec"))] == 1
    # the scrape itself is in flight while the page is rendered
    assert samples[("sage:num_requests_running", labels())] == 1


async def test_openapi_document_is_served_and_responses_conform(
    edge: httpx.AsyncClient,
) -> None:
    resp = await edge.get("/openapi.json")
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    doc = resp.json()
    assert doc == orjson.loads(orjson.dumps(openapi_document()))
    jsonschema = pytest.importorskip("jsonschema")

    def check(name: str, instance: Any) -> None:
        schema = {"components": doc["components"], "$ref": f"#/components/schemas/{name}"}
        jsonschema.Draft202012Validator(schema).validate(instance)

    chat = await edge.post("/v1/chat/completions", json={"model": "rec", "messages": MESSAGES})
    check("ChatCompletion", chat.json())
    completion = await edge.post("/v1/completions", json={"model": "rec", "prompt": "x"})
    check("Completion", completion.json())
    check("ModelList", (await edge.get("/v1/models")).json())
    check("Health", (await edge.get("/health")).json())
    for bad in (
        edge.post("/v1/chat/completions", json={"model": "rec"}),
        edge.post("/v1/chat/completions", json={"model": "ghost", "messages": MESSAGES}),
        edge.get("/v1/nope"),
        edge.delete("/v1/models"),
    ):
        check("Error", (await bad).json())
    status = await edge.get("/v1/management/status")
    assert status.status_code == 200, status.text
    check("ManagementStatus", status.json())
    # every documented response code for a route is a string status, and 200s name a schema
    for item in doc["paths"].values():
        for op in item.values():
            assert all(code.isdigit() for code in op["responses"])


@pytest.mark.parametrize(
    "settings_update", [{"cors_origins": "https://app.example, https://b.example/"}]
)
async def test_cors_with_an_origin_list(edge: httpx.AsyncClient) -> None:
    preflight = await edge.options(
        "/v1/chat/completions",
        headers={
            "origin": "https://app.example",
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type, x-stainless-os",
        },
    )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert preflight.headers["access-control-allow-headers"] == (
        "authorization, content-type, x-stainless-os"
    )
    assert preflight.headers["vary"] == "Origin"
    denied = await edge.options(
        "/v1/chat/completions",
        headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
    )
    assert denied.status_code == 400
    assert denied.json()["error"]["code"] == "cors_origin_not_allowed"
    assert "access-control-allow-origin" not in denied.headers
    chat = {"model": "rec", "messages": MESSAGES}
    actual = await edge.post(
        "/v1/chat/completions", json=chat, headers={"origin": "https://b.example"}
    )
    assert actual.status_code == 200
    assert actual.headers["access-control-allow-origin"] == "https://b.example"
    assert "x-request-id" in actual.headers["access-control-expose-headers"]
    other = await edge.post(
        "/v1/chat/completions", json=chat, headers={"origin": "https://evil.example"}
    )
    assert "access-control-allow-origin" not in other.headers
    # errors carry the CORS headers too, so browsers can read them
    error = await edge.post(
        "/v1/chat/completions", json={"model": "rec"}, headers={"origin": "https://b.example"}
    )
    assert error.status_code == 400
    assert error.headers["access-control-allow-origin"] == "https://b.example"


@pytest.mark.parametrize("settings_update", [{"cors_origins": "*"}])
async def test_cors_any_origin(edge: httpx.AsyncClient) -> None:
    preflight = await edge.options(
        "/v1/embeddings",
        headers={"origin": "https://x.example", "access-control-request-method": "POST"},
    )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-headers" not in preflight.headers
    resp = await edge.get("/health", headers={"origin": "https://x.example"})
    assert resp.headers["access-control-allow-origin"] == "*"


async def test_cors_is_off_by_default(edge: httpx.AsyncClient) -> None:
    preflight = await edge.options(
        "/v1/chat/completions",
        headers={"origin": "https://app.example", "access-control-request-method": "POST"},
    )
    assert preflight.status_code == 405
    assert "access-control-allow-origin" not in preflight.headers
    resp = await edge.get("/health", headers={"origin": "https://app.example"})
    assert "access-control-allow-origin" not in resp.headers


@pytest.mark.parametrize("settings_update", [{"max_body_bytes": 2048}])
async def test_body_over_the_limit_is_413(
    edge: httpx.AsyncClient, recorder: RecordingEngine
) -> None:
    big = {"model": "rec", "messages": [{"role": "user", "content": "x" * 4096}]}
    resp = await edge.post("/v1/chat/completions", json=big)
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "payload_too_large"

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b" " * 512  # no content-length: the limit is enforced while reading

    streamed = await edge.post(
        "/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"}
    )
    assert streamed.status_code == 413
    assert not recorder.requests
    small = await edge.post("/v1/chat/completions", json={"model": "rec", "messages": MESSAGES})
    assert small.status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("GET", "/v1/does-not-exist", None, 404, "unknown_url"),
        ("PUT", "/v1/chat/completions", None, 405, "method_not_allowed"),
        ("POST", "/v1/chat/completions", b'{"model": "rec", "messages": [', 400, None),
        ("POST", "/v1/completions", b"", 400, None),
    ],
)
async def test_http_errors_are_openai_json(
    edge: httpx.AsyncClient,
    method: str,
    path: str,
    body: bytes | None,
    status: int,
    code: str | None,
) -> None:
    headers = {"content-type": "application/json"}  # a POST without it is a 415 (CSRF)
    resp = await edge.request(method, path, content=body, headers=headers)
    assert resp.status_code == status
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens", "n"])
async def test_negative_counts_are_400_naming_the_field(
    edge: httpx.AsyncClient, recorder: RecordingEngine, field: str
) -> None:
    resp = await edge.post(
        "/v1/chat/completions", json={"model": "rec", "messages": MESSAGES, field: -5}
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == field
    assert not recorder.requests
