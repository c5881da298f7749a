"""What engines answer is summarised, and their redirects are never followed, on every hop
to an engine: the embedding service's batches, the scheduler's chat calls and its /metrics
scraper.

An external engine that passed the registration probe may later answer anything: some
internal service's error page (it must not reach the caller), or a 307 to a loopback or
metadata address (it must not be followed: the batch or scrape would land there). The stack
is the real one (edge → scheduler → embedding service, every service in-process); the fake
engines are tiny HTTP servers on 127.0.0.2 (allow-listed), the redirect target on 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sage.common.config.settings import SageSettings
from sage.common.engine_errors import engine_error
from sage.common.exceptions import InvalidRequestError, ModelNotFoundError, UpstreamError
from sage.services.embedding.executor import Endpoint
from sage.services.embedding.executor import _engine_error as embedding_engine_error
from sage.services.scheduler.executor import _engine_error as scheduler_engine_error
from sage.services.scheduler.load import EngineLoadTracker
from sage.services.scheduler.registry import EngineKind, EngineRecord

from .conftest import tenant
from .test_external_engines import (
    ENGINE_HOST,
    SECRET,
    FakeServer,
    Reply,
    models,
    register,
)

_PAGE = b"<!DOCTYPE html><html><body>" + SECRET.encode() + b"</body></html>"


@pytest.fixture
def settings(settings: SageSettings) -> SageSettings:
    """The security settings with only 127.0.0.2 allowed for external engines."""
    return settings.model_copy(update={"external_engine_allow": ENGINE_HOST})


@pytest.fixture
def fakes() -> Iterator[Callable[..., FakeServer]]:
    """Start FakeServers for one test; all are stopped after it."""
    started: list[FakeServer] = []

    def make(host: str = ENGINE_HOST, **kwargs: Any) -> FakeServer:
        server = FakeServer(host, **kwargs).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def redirect_target(fakes: Callable[..., FakeServer]) -> FakeServer:
    """A loopback service (the SSRF target) that would answer every path with a secret."""
    ok: Reply = (200, "application/json", b'{"secret": "' + SECRET.encode() + b'"}')
    routes: dict[str, Reply | Callable[[], Reply]] = {
        path: ok for path in ("/v1/embeddings", "/v1/chat/completions", "/metrics")
    }
    return fakes("127.0.0.1", routes=routes)


def redirect(to: str) -> Reply:
    """A 307 to `to` (FakeServer sends the body as Location)."""
    return 307, "text/plain", to.encode()


async def embed(plane: Any, model: str) -> Any:
    return await plane.client.post(
        "/v1/embeddings", json={"model": model, "input": ["hello", "world"]}, headers=tenant()
    )


# -- the embedding path: edge → scheduler → embedding service → engine -------------------


async def test_an_embedding_engines_error_page_is_summarised_not_echoed(
    secure_plane: Any, fakes: Callable[..., FakeServer]
) -> None:
    """An embedding engine answering a batch with some other service's HTML 500: the
    caller gets a 502 saying what came back (status, kind, size), never the page."""
    engine = fakes(
        routes={
            "/v1/models": models("emb-err"),
            "/v1/embeddings": (500, "text/html", _PAGE),
        }
    )
    reply = await register(
        secure_plane, model_id="emb-err", base_url=engine.url, engine_kind="embedding"
    )
    assert reply.status_code == 201, reply.text
    got = await embed(secure_plane, "emb-err")
    assert got.status_code == 502, got.text
    assert SECRET not in got.text
    message = got.json()["error"]["message"]
    assert f"HTTP 500 (html, {len(_PAGE)} bytes)" in message, message
    assert any(path == "/v1/embeddings" for _, path, _ in engine.seen)


async def test_an_embedding_engines_redirect_is_not_followed(
    secure_plane: Any, fakes: Callable[..., FakeServer]
) -> None:
    """An embedding engine answering 307 to a loopback service: the batch never reaches
    that service, and the caller gets a 502 naming the redirect, not where it pointed."""
    target = redirect_target(fakes)
    engine = fakes(
        routes={
            "/v1/models": models("emb-307"),
            "/v1/embeddings": redirect(target.url + "/v1/embeddings"),
        }
    )
    reply = await register(
        secure_plane, model_id="emb-307", base_url=engine.url, engine_kind="embedding"
    )
    assert reply.status_code == 201, reply.text
    got = await embed(secure_plane, "emb-307")
    assert got.status_code == 502, got.text
    assert SECRET not in got.text and target.url not in got.text
    assert "HTTP 307 (empty, 0 bytes), a redirect, not followed" in got.json()["error"]["message"]
    assert any(path == "/v1/embeddings" for _, path, _ in engine.seen)
    assert target.seen == []


# -- the chat path and the /metrics scraper ------------------------------------------------


async def test_a_chat_engines_redirect_is_not_followed(
    secure_plane: Any, fakes: Callable[..., FakeServer]
) -> None:
    """A 307 from a chat engine is an engine error (502), not an empty success, and its
    target is never asked."""
    target = redirect_target(fakes)
    engine = fakes(
        routes={
            "/v1/models": models("chat-307"),
            "/v1/chat/completions": redirect(target.url + "/v1/chat/completions"),
        }
    )
    reply = await register(secure_plane, model_id="chat-307", base_url=engine.url)
    assert reply.status_code == 201, reply.text
    for stream in (False, True):
        chat = await secure_plane.client.post(
            "/v1/chat/completions",
            json={
                "model": "chat-307",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": stream,
            },
            headers=tenant(),
        )
        assert chat.status_code == 502, (stream, chat.text)
        assert SECRET not in chat.text and target.url not in chat.text
        assert "HTTP 307 (empty, 0 bytes), a redirect, not followed" in chat.text
    assert target.seen == []


async def test_the_metrics_scraper_does_not_follow_redirects(
    fakes: Callable[..., FakeServer],
) -> None:
    """An engine whose /metrics answers 307 to a loopback service: the scrape fails (no
    load report) and the target is never asked."""
    target = redirect_target(fakes)
    engine = fakes(routes={"/metrics": redirect(target.url + "/metrics")})
    record = EngineRecord(engine_id="e-307", model="m", kind=EngineKind.LLM, base_url=engine.url)
    tracker = EngineLoadTracker(scrape_timeout_s=5.0)
    try:
        tracker.report("e-307", 7.0)
        await tracker.scrape_once([record])
    finally:
        await tracker.aclose()
    # No filtered page at /metrics/ (404), then the whole /metrics, whose 307 is not followed.
    assert [path.partition("?")[0] for _, path, _ in engine.seen] == ["/metrics/", "/metrics"]
    assert target.seen == []
    assert tracker.load("e-307") == 0.0  # the old report is dropped, nothing new taken


# -- one parser: the embedding service maps replies exactly like the scheduler -----------


_SCHED_ENGINE = EngineRecord(
    engine_id="e1", model="m", kind=EngineKind.EMBEDDING, base_url="http://10.0.0.1:8000"
)
_EMB_ENGINE = Endpoint("e1", "http://10.0.0.1:8000")


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (500, _PAGE, UpstreamError),
        (502, b"bad gateway " + SECRET.encode(), UpstreamError),
        (404, b"<html>" + SECRET.encode() + b"</html>", UpstreamError),
        (404, b'{"error": {"message": "model m not found", "param": "model"}}', ModelNotFoundError),
        (400, b"plain text " + SECRET.encode(), InvalidRequestError),
        (307, b"", UpstreamError),
        (500, b'{"error": {"message": "' + b"x" * 5000 + b'"}}', UpstreamError),
    ],
)
def test_embedding_and_scheduler_summarise_alike(
    status: int, body: bytes, kind: type[Exception]
) -> None:
    """Both executors go through sage.common.engine_errors: the same class and the same
    clipped or summarised text (only the engine's label differs); no secret, no long body."""
    emb = embedding_engine_error(_EMB_ENGINE, status, body)
    sched = scheduler_engine_error(_SCHED_ENGINE, status, body)
    assert type(emb) is type(sched) is kind
    assert emb.message == sched.message.replace("engine e1", "embedding engine e1")
    assert SECRET not in emb.message and len(emb.message) < 400
    assert emb.message == engine_error("e1", status, body, label="embedding engine").message
