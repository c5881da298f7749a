"""UnifiedInferenceClient and AsyncUnifiedInferenceClient against a real control plane.

Every service runs in this test's event loop (the `full_plane` fixture) and lifecycle
spawns real simulator engines, so the sync client runs in a worker thread
(`asyncio.to_thread`) while the async client runs in the loop itself. Retries and
stream error events are driven by a small HTTP server standing where the gateway would:
the client's own external boundary, in the gateway's wire format.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from sage.common.config.settings import SageSettings
from sage.common.exceptions import (
    AuthenticationError,
    ConflictError,
    DeadlineExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    UpstreamError,
)
from sage.common.utils.processes import free_port
from sage.engines.sim import chat_prompt_text, count_tokens, embedding_vector, expected_text
from sage.llm import (
    AsyncUnifiedInferenceClient,
    InferenceResult,
    UnifiedInferenceClient,
)

pytestmark = pytest.mark.timeout(180)

SEED: list[dict[str, Any]] = [{"role": "user", "content": "写一份日报"}]
SEED_PROMPT = chat_prompt_text(SEED)


@pytest.fixture(autouse=True)
def _no_client_env(monkeypatch: pytest.MonkeyPatch, settings: SageSettings) -> None:
    """The developer's own SAGE_* client settings must not leak into these tests; the
    clients run as on the plane's machine, so they find its admin key in its SAGE_HOME."""
    monkeypatch.setenv("SAGE_HOME", str(settings.home))
    for name in (
        "SAGE_UNIFIED_BASE_URL",
        "SAGE_CHAT_MODEL",
        "SAGE_CHAT_API_KEY",
        "SAGE_EMBEDDING_MODEL",
        "SAGE_ADMIN_API_KEY",
    ):
        monkeypatch.delenv(name, raising=False)


async def start_engine(plane: Any, **body: Any) -> dict[str, Any]:
    """Start an engine through the management API and wait until it is RUNNING."""
    resp = await plane.client.post("/v1/management/engines", json=body)
    assert resp.status_code == 201, resp.text
    engine: dict[str, Any] = resp.json()
    assert engine["status"] == "RUNNING"
    return engine


async def engines(plane: Any) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = (await plane.client.get("/v1/management/engines")).json()[
        "engines"
    ]
    return listed


def gateway_url(plane: Any) -> str:
    return str(plane.client.base_url) + "/v1"


@pytest.fixture
async def sim_plane(full_plane: Any) -> Any:
    """The full plane with a sim chat engine and a sim embedding engine RUNNING."""
    await start_engine(full_plane, model_id="sim", backend="sim")
    await start_engine(full_plane, model_id="sim-embedding", engine_kind="embedding", backend="sim")
    return full_plane


class BodyLog:
    """An httpx event hook that keeps every request's headers and JSON body."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], Any]] = []

    def __call__(self, request: httpx.Request) -> None:
        body = json.loads(request.content) if request.content else None
        self.requests.append((request.url.path, dict(request.headers), body))

    async def hook(self, request: httpx.Request) -> None:
        self(request)


# ---- the sync client, in a worker thread


async def test_sync_client_chat_generate_stream_embed_status(sim_plane: Any) -> None:
    url = gateway_url(sim_plane)
    sent = BodyLog()

    def run() -> None:
        http = httpx.Client(event_hooks={"request": [sent]}, trust_env=False)
        with UnifiedInferenceClient.create(control_plane_url=url, http_client=http) as client:
            assert client.base_url == url
            # No model configured: the client picks the gateway's ready chat model.
            assert client.chat(SEED) == expected_text(SEED_PROMPT, 16)
            assert client.chat(SEED, "sim", max_tokens=5) == expected_text(SEED_PROMPT, 5)
            assert client.chat("写一份日报", max_tokens=3) == expected_text(SEED_PROMPT, 3)

            result = client.chat(SEED, return_result=True, max_tokens=5)
            assert isinstance(result, InferenceResult)
            assert result.content == expected_text(SEED_PROMPT, 5) == str(result)
            assert result.model == "sim" and result.finish_reason == "length"
            assert result.usage.prompt_tokens == count_tokens(SEED_PROMPT)
            assert result.usage.completion_tokens == 5
            assert result.usage.total_tokens == result.usage.prompt_tokens + 5
            assert result.latency_ms > 0 and result.raw["object"] == "chat.completion"
            # request_id is the x-request-id the gateway answered with (the client's own).
            assert result.request_id == sent.requests[-1][1]["x-request-id"]

            # temperature=0 and other falsy values are sent, not dropped; None is dropped.
            client.chat(SEED, temperature=0, presence_penalty=0.0, seed=0, stop=None)
            body = sent.requests[-1][2]
            assert body["temperature"] == 0 and body["presence_penalty"] == 0.0
            assert body["seed"] == 0 and "stop" not in body

            # Streams: deltas concatenate to the non-stream text; result filled at the end.
            deltas = list(client.stream_chat(SEED, max_tokens=6, temperature=0))
            assert len(deltas) == 6 and "".join(deltas) == expected_text(SEED_PROMPT, 6)
            assert sent.requests[-1][2]["stream"] is True
            assert sent.requests[-1][2]["temperature"] == 0
            with client.chat(SEED, stream=True, max_tokens=4) as stream:
                assert stream.text() == expected_text(SEED_PROMPT, 4)
                assert stream.result.usage.completion_tokens == 4
                assert stream.result.finish_reason == "length"
                assert stream.request_id

            # Completions, plain, as a result and streamed.
            assert client.generate("hello world", max_tokens=4) == expected_text("hello world", 4)
            gen = client.generate("hello world", return_result=True, max_tokens=4)
            assert gen.content == expected_text("hello world", 4)
            assert gen.usage.prompt_tokens == 2 and gen.raw["object"] == "text_completion"
            pieces = list(client.stream_generate("hello world", max_tokens=4))
            assert "".join(pieces) == expected_text("hello world", 4) and len(pieces) == 4

            # Embeddings in input order; one str gives one vector.
            texts = ["Hello", "World", "写一份日报"]
            vectors = client.embed(texts)
            assert len(vectors) == 3
            for text, vector in zip(texts, vectors, strict=True):
                assert vector == pytest.approx(embedding_vector(text, 384))
            assert client.embed("Hello") == [vectors[0]]
            assert client.embed([]) == []

            status = client.get_status()
            assert status["llm_available"] is True and status["embedding_available"] is True
            ids = {m["id"]: m["kind"] for m in client.list_models()}
            assert ids["sim"] == "llm" and ids["sim-embedding"] == "embedding"
        http.close()

    await asyncio.to_thread(run)


async def test_sync_client_errors_are_typed(sim_plane: Any) -> None:
    url = gateway_url(sim_plane)

    def run() -> None:
        with UnifiedInferenceClient.create(control_plane_url=url) as client:
            with pytest.raises(ModelNotFoundError) as missing:
                client.chat(SEED, model="no-such-model")
            assert missing.value.param == "model" and missing.value.model == "no-such-model"
            assert "no-such-model" in missing.value.message
            with pytest.raises(ModelNotFoundError):
                client.stream_chat(SEED, model="no-such-model")
            with pytest.raises(ModelNotFoundError):
                client.embed(["x"], model="no-such-embedder")

            with pytest.raises(InvalidRequestError) as bad:
                client.chat(SEED, max_tokens=-1)
            assert bad.value.param == "max_tokens" and "max_tokens" in bad.value.message
            with pytest.raises(InvalidRequestError) as hot:
                client.chat(SEED, temperature="hot")
            assert hot.value.param == "temperature"
            with pytest.raises(InvalidRequestError) as empty:
                client.embed(["ok", ""])
            assert empty.value.param == "input[1]"
            with pytest.raises(InvalidRequestError) as unserialisable:
                client.chat(SEED, metadata=object())
            assert "JSON" in unserialisable.value.message

    await asyncio.to_thread(run)


def test_no_gateway_is_service_unavailable_with_a_hint() -> None:
    client = UnifiedInferenceClient.create(
        control_plane_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=1
    )
    started = time.monotonic()
    with pytest.raises(ServiceUnavailableError) as info:
        client.chat(SEED, model="sim")
    assert time.monotonic() - started >= 0.3  # one retry, after a backoff
    assert "sage llm serve" in info.value.message
    assert "SAGE_UNIFIED_BASE_URL" in info.value.message
    with pytest.raises(ServiceUnavailableError):
        client.get_status()
    client.close()


def test_base_url_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    assert UnifiedInferenceClient.create().base_url == "http://localhost:8889/v1"
    monkeypatch.setenv("SAGE_UNIFIED_BASE_URL", "http://gw.example:9000/v1/")
    monkeypatch.setenv("SAGE_CHAT_MODEL", "env-model")
    monkeypatch.setenv("SAGE_EMBEDDING_MODEL", "env-embedder")
    monkeypatch.setenv("SAGE_CHAT_BASE_URL", "http://localhost:8901/v1")  # ignored on purpose
    from_env = UnifiedInferenceClient.create()
    assert from_env.base_url == "http://gw.example:9000/v1"
    assert from_env.model == from_env.default_llm_model == "env-model"
    assert from_env.embedding_model == "env-embedder"
    explicit = UnifiedInferenceClient.create(
        "http://127.0.0.1:1234", default_llm_model="a", embedding_model="b"
    )
    assert explicit.base_url == "http://127.0.0.1:1234/v1"  # a bare root gets /v1
    assert (explicit.model, explicit.embedding_model) == ("a", "b")
    assert UnifiedInferenceClient.create(model="legacy").model == "legacy"
    asynchronous = AsyncUnifiedInferenceClient.create()
    assert asynchronous.base_url == "http://gw.example:9000/v1"
    assert asynchronous.model == "env-model"


# ---- retries and error mapping at the client's boundary


class FakeGateway:
    """A threaded HTTP server answering from a script of (status, headers, body) replies.

    A reply of None forwards the request to `upstream` (the real gateway) instead.
    """

    def __init__(self, upstream: str | None = None) -> None:
        self.script: list[tuple[int, dict[str, str], bytes] | None] = []
        self.hits: list[tuple[str, float]] = []
        self.upstream = upstream
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                fake.hits.append((self.path, time.monotonic()))
                reply = fake.script.pop(0) if fake.script else None
                if reply is None:
                    assert fake.upstream is not None, "script ran out"
                    forwarded = httpx.request(
                        self.command,
                        fake.upstream + self.path,
                        content=body,
                        headers={"content-type": "application/json"},
                        timeout=30,
                        trust_env=False,
                    )
                    reply = (forwarded.status_code, {}, forwarded.content)
                status, headers, content = reply
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = _answer
            do_POST = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def fake_gateway() -> Iterator[Callable[..., FakeGateway]]:
    made: list[FakeGateway] = []

    def make(upstream: str | None = None) -> FakeGateway:
        made.append(FakeGateway(upstream))
        return made[-1]

    yield make
    for fake in made:
        fake.close()


def error(
    status: int, type_: str, code: str | None, message: str, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return status, {"content-type": "application/json", **headers}, json.dumps(body).encode()


def chat_reply(text: str) -> tuple[int, dict[str, str], bytes]:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "fake",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    return 200, {"content-type": "application/json"}, json.dumps(body).encode()


async def test_a_503_is_retried_then_the_real_gateway_answers(
    sim_plane: Any, fake_gateway: Callable[..., FakeGateway]
) -> None:
    fake = fake_gateway(upstream=str(sim_plane.client.base_url))
    fake.script = [error(503, "service_unavailable", "service_unavailable", "warming up"), None]

    def run() -> str:
        with UnifiedInferenceClient.create(control_plane_url=fake.url) as client:
            return client.chat(SEED, "sim", max_tokens=5)

    assert await asyncio.to_thread(run) == expected_text(SEED_PROMPT, 5)
    assert [path for path, _ in fake.hits] == ["/v1/chat/completions"] * 2

    # The async client retries the same way.
    fake.hits.clear()
    fake.script = [error(502, "upstream_error", "bad_gateway", "engine hiccup"), None]
    async with AsyncUnifiedInferenceClient.create(control_plane_url=fake.url) as client:
        assert await client.chat(SEED, "sim", max_tokens=5) == expected_text(SEED_PROMPT, 5)
    assert len(fake.hits) == 2


def test_429_honours_retry_after_and_4xx_is_never_retried(
    fake_gateway: Callable[..., FakeGateway],
) -> None:
    fake = fake_gateway()
    client = UnifiedInferenceClient.create(control_plane_url=fake.url, default_llm_model="fake")
    fake.script = [error(429, "rate_limit_error", "overloaded", "busy", **{"retry-after": "1"})]
    fake.script.append(chat_reply("after the wait"))
    assert client.chat(SEED) == "after the wait"
    assert fake.hits[1][1] - fake.hits[0][1] >= 0.95

    for status, type_, code, cls in [
        (400, "invalid_request_error", None, InvalidRequestError),
        (401, "authentication_error", "invalid_api_key", AuthenticationError),
        (403, "permission_error", None, PermissionDeniedError),
        (409, "invalid_request_error", "conflict", ConflictError),
    ]:
        fake.hits.clear()
        fake.script = [error(status, type_, code, f"nope {status}"), chat_reply("never")]
        with pytest.raises(cls) as info:
            client.chat(SEED)
        assert info.value.message == f"nope {status}" and len(fake.hits) == 1
        fake.script.clear()

    # Retries run out: the last error is raised, with its retry_after.
    fake.hits.clear()
    limited = error(
        429, "rate_limit_error", "rate_limit_exceeded", "slow down", **{"retry-after": "0"}
    )
    fake.script = [limited] * 3
    with pytest.raises(RateLimitError) as info:
        client.chat(SEED)
    assert isinstance(info.value, OverloadedError) and info.value.retry_after == 0.0
    assert len(fake.hits) == 3  # the first try and max_retries=2 more

    fake.hits.clear()
    fake.script = [error(504, "timeout", "timeout", "too slow")] * 3
    with pytest.raises(DeadlineExceededError):
        client.chat(SEED)
    assert len(fake.hits) == 3
    fake.hits.clear()
    fake.script = [(502, {}, b"<html>bad gateway</html>")]
    none_left = UnifiedInferenceClient.create(
        control_plane_url=fake.url, default_llm_model="fake", max_retries=0
    )
    with pytest.raises(UpstreamError) as upstream:
        none_left.chat(SEED)
    assert "bad gateway" in upstream.value.message and len(fake.hits) == 1
    none_left.close()
    client.close()


def sse(*events: Any) -> tuple[int, dict[str, str], bytes]:
    data = b"".join(
        b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n"
        for e in events
    )
    return 200, {"content-type": "text/event-stream", "x-request-id": "rid-1"}, data


def delta(text: str) -> dict[str, Any]:
    return {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}}],
    }


async def test_a_stream_error_event_raises_the_mapped_exception(
    fake_gateway: Callable[..., FakeGateway],
) -> None:
    fake = fake_gateway()
    broken = error(503, "service_unavailable", "service_unavailable", "engine died")[2]
    fake.script = [sse(delta("one"), json.loads(broken), b"[DONE]")]
    client = UnifiedInferenceClient.create(control_plane_url=fake.url, default_llm_model="fake")
    stream = client.stream_chat(SEED)
    assert stream.request_id == "rid-1"
    assert next(stream) == "one"
    with pytest.raises(ServiceUnavailableError, match="engine died"):
        next(stream)
    # A stream that stops without [DONE] or a finish reason was cut off.
    fake.script = [sse(delta("one"))]
    with pytest.raises(UpstreamError, match="DONE"):
        list(client.stream_chat(SEED))
    client.close()

    async with AsyncUnifiedInferenceClient.create(
        control_plane_url=fake.url, default_llm_model="fake"
    ) as aclient:
        fake.script = [sse(delta("a"), delta("b"), json.loads(broken), b"[DONE]")]
        got: list[str] = []
        with pytest.raises(ServiceUnavailableError):
            async for piece in aclient.stream_chat(SEED):
                got.append(piece)
        assert got == ["a", "b"]


# ---- the async client, in the loop


async def test_async_client(sim_plane: Any) -> None:
    sent = BodyLog()
    http = httpx.AsyncClient(event_hooks={"request": [sent.hook]}, trust_env=False)
    async with AsyncUnifiedInferenceClient.create(
        control_plane_url=gateway_url(sim_plane), http_client=http
    ) as client:
        assert await client.chat(SEED) == expected_text(SEED_PROMPT, 16)
        result = await client.chat(SEED, return_result=True, max_tokens=5, temperature=0)
        assert result.content == expected_text(SEED_PROMPT, 5)
        assert result.usage.completion_tokens == 5 and result.finish_reason == "length"
        assert result.request_id == sent.requests[-1][1]["x-request-id"]
        assert sent.requests[-1][2]["temperature"] == 0

        deltas = [d async for d in client.stream_chat(SEED, max_tokens=6)]
        assert "".join(deltas) == expected_text(SEED_PROMPT, 6) and len(deltas) == 6
        stream = await client.chat(SEED, stream=True, max_tokens=3)
        assert await stream.text() == expected_text(SEED_PROMPT, 3)
        assert stream.result.usage.completion_tokens == 3

        assert await client.generate("hello world", max_tokens=4) == expected_text("hello world", 4)
        pieces = [p async for p in client.stream_generate("hello world", max_tokens=4)]
        assert "".join(pieces) == expected_text("hello world", 4)

        vectors = await client.embed(["Hello", "World"])
        assert vectors[1] == pytest.approx(embedding_vector("World", 384))
        assert await client.embed("Hello") == [vectors[0]]
        status = await client.get_status()
        assert status["llm_available"] and status["embedding_available"]
        assert "sim" in {m["id"] for m in await client.list_models()}

        with pytest.raises(ModelNotFoundError) as missing:
            await client.chat(SEED, model="no-such-model")
        assert missing.value.model == "no-such-model"
        with pytest.raises(ModelNotFoundError):
            async for _ in client.stream_chat(SEED, model="no-such-model"):
                pass
        with pytest.raises(InvalidRequestError) as bad:
            await client.generate("x", max_tokens=0)
        assert bad.value.param == "max_tokens"
    await http.aclose()

    async with AsyncUnifiedInferenceClient.create(
        control_plane_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=0
    ) as down:
        with pytest.raises(ServiceUnavailableError, match="sage llm serve"):
            await down.chat(SEED, model="sim")


# ---- create_for_model


async def test_create_for_model_binds_starts_and_refuses(
    full_plane: Any, caplog: pytest.LogCaptureFixture
) -> None:
    await start_engine(full_plane, model_id="sim", backend="sim")
    url = gateway_url(full_plane)

    def bound_to_running() -> tuple[float, str]:
        started = time.monotonic()
        with UnifiedInferenceClient.create_for_model("sim", control_plane_url=url) as client:
            took = time.monotonic() - started
            assert client.model == "sim"
            return took, client.chat(SEED, max_tokens=2)

    took, text = await asyncio.to_thread(bound_to_running)
    assert took < 2.0 and text == expected_text(SEED_PROMPT, 2)
    assert len(await engines(full_plane)) == 1  # nothing new was started

    def not_running() -> None:
        with pytest.raises(ModelNotFoundError) as info:
            UnifiedInferenceClient.create_for_model(
                "sim-absent", control_plane_url=url, auto_start=False
            )
        assert info.value.model == "sim-absent" and info.value.param == "model"
        assert "sage llm engine start sim-absent" in info.value.message
        with pytest.raises(InvalidRequestError) as bad_backend:
            UnifiedInferenceClient.create_for_model(
                "sim-other", control_plane_url=url, backend="no-such-backend"
            )
        assert bad_backend.value.param == "backend"

    await asyncio.to_thread(not_running)

    def auto_started() -> str:
        with UnifiedInferenceClient.create_for_model(
            "sim-fresh", control_plane_url=url, backend="sim", wait_timeout=60
        ) as client:
            assert client.model == "sim-fresh"
            return client.chat(SEED, max_tokens=3)

    with caplog.at_level(logging.INFO, logger="sage.llm.client"):
        assert await asyncio.to_thread(auto_started) == expected_text(SEED_PROMPT, 3)
    progress = [r.getMessage() for r in caplog.records if r.name == "sage.llm.client"]
    assert any("starting engine" in line and "sim-fresh" in line for line in progress)
    assert any("RUNNING" in line for line in progress)
    fresh = [e for e in await engines(full_plane) if e["model_id"] == "sim-fresh"]
    assert [e["status"] for e in fresh] == ["RUNNING"] and fresh[0]["backend"] == "sim"

    # The async twin: bound at once to a served model, or starting one.
    client = await AsyncUnifiedInferenceClient.create_for_model("sim", control_plane_url=url)
    assert client.model == "sim"
    await client.close()
    async with await AsyncUnifiedInferenceClient.create_for_model(
        "sim-async", control_plane_url=url, backend="sim", wait_timeout=60
    ) as aclient:
        assert await aclient.chat(SEED, max_tokens=2) == expected_text(SEED_PROMPT, 2)
    with pytest.raises(ModelNotFoundError):
        await AsyncUnifiedInferenceClient.create_for_model(
            "sim-never", control_plane_url=url, auto_start=False
        )
    embedder = await AsyncUnifiedInferenceClient.create_for_model(
        "sim-embedder", control_plane_url=url, engine_kind="embedding", backend="sim"
    )
    assert embedder.embedding_model == "sim-embedder" and embedder.model is None
    assert await embedder.embed("x") == [pytest.approx(embedding_vector("x", 384))]
    await embedder.close()


# ---- the sync and async clients share one core: same retries, same errors

# (class name, text or message, param, code, retry_after, attempts the gateway saw)
Outcome = tuple[str, str | None, str | None, str | None, float | None, int]


def _failed(exc: Exception, attempts: int) -> Outcome:
    return (
        type(exc).__name__,
        getattr(exc, "message", str(exc)),
        getattr(exc, "param", None),
        getattr(exc, "code", None),
        getattr(exc, "retry_after", None),
        attempts,
    )


def _sync_outcome(fake: FakeGateway, client: UnifiedInferenceClient) -> Outcome:
    fake.hits.clear()
    try:
        text = client.chat(SEED)
    except Exception as exc:
        return _failed(exc, len(fake.hits))
    return ("ok", text, None, None, None, len(fake.hits))


async def _async_outcome(fake: FakeGateway, client: AsyncUnifiedInferenceClient) -> Outcome:
    fake.hits.clear()
    try:
        text = await client.chat(SEED)
    except Exception as exc:
        return _failed(exc, len(fake.hits))
    return ("ok", text, None, None, None, len(fake.hits))


def _param_error(
    status: int, code: str, message: str, param: str
) -> tuple[int, dict[str, str], bytes]:
    body = {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    }
    return status, {"content-type": "application/json"}, json.dumps(body).encode()


async def test_sync_and_async_clients_retry_and_map_errors_alike(
    fake_gateway: Callable[..., FakeGateway],
) -> None:
    fake = fake_gateway()
    sync_client = UnifiedInferenceClient.create(
        control_plane_url=fake.url, default_llm_model="fake"
    )
    async_client = AsyncUnifiedInferenceClient.create(
        control_plane_url=fake.url, default_llm_model="fake"
    )
    busy = error(429, "rate_limit_error", "overloaded", "busy", **{"retry-after": "0.3"})
    warming = error(
        503, "service_unavailable", "service_unavailable", "warming", **{"retry-after": "0"}
    )
    scripts: dict[str, list[tuple[int, dict[str, str], bytes]]] = {
        "429": [busy, chat_reply("after the wait")],
        "503": [warming] * 3,
        "400": [_param_error(400, "bad_param", "no such field", "messages[0]"), chat_reply("no")],
        "404": [error(404, "invalid_request_error", "model_not_found", "gone")],
        "500": [error(500, "internal_error", None, "boom"), chat_reply("no")],
        "502": [(502, {"retry-after": "0"}, b"<html>bad gateway</html>")] * 3,
    }
    sync: dict[str, Outcome] = {}
    for name, script in scripts.items():
        fake.script = list(script)
        sync[name] = await asyncio.to_thread(_sync_outcome, fake, sync_client)
        waited = [b - a for (_, a), (_, b) in zip(fake.hits, fake.hits[1:], strict=False)]
        fake.script = list(script)
        assert await _async_outcome(fake, async_client) == sync[name], name
        if name == "429":  # Retry-After (0.3 s) was honoured, by both
            async_waited = fake.hits[1][1] - fake.hits[0][1]
            assert min(waited[0], async_waited) >= 0.25
    sync_client.close()
    await async_client.close()

    assert sync["429"] == ("ok", "after the wait", None, None, None, 2)
    assert sync["503"][0] == "ServiceUnavailableError" and sync["503"][5] == 3  # 1 + 2 retries
    assert sync["400"] == (
        "InvalidRequestError",
        "no such field",
        "messages[0]",
        "bad_param",
        None,
        1,
    )
    assert sync["404"][0] == "ModelNotFoundError" and sync["404"][5] == 1
    assert sync["500"][0] == "InternalError" and sync["500"][5] == 1
    assert sync["502"][0] == "UpstreamError" and sync["502"][5] == 3
    assert "bad gateway" in str(sync["502"][1])

    # Nothing listens: both retry once after a backoff, then say how to start a gateway
    # (the transport's own words in the message differ between httpx's sync and async).
    nowhere = f"http://127.0.0.1:{free_port()}/v1"
    refused = UnifiedInferenceClient.create(control_plane_url=nowhere, max_retries=1)
    async_refused = AsyncUnifiedInferenceClient.create(control_plane_url=nowhere, max_retries=1)
    for failure in (
        await asyncio.to_thread(_sync_outcome, fake, refused),
        await _async_outcome(fake, async_refused),
    ):
        assert failure[0] == "ServiceUnavailableError"
        assert "sage llm serve" in str(failure[1]) and "SAGE_UNIFIED_BASE_URL" in str(failure[1])
    refused.close()
    await async_refused.close()
