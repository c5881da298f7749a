"""Retries on 429/5xx: bounded, exponential backoff, Retry-After honoured; errors mapped."""

from __future__ import annotations

import socket
import threading
import time
from datetime import UTC, datetime

import pytest

from sage.common.components.sage_embedding import OpenAIEmbedding, RetryPolicy
from sage.common.components.sage_embedding.remote import parse_retry_after
from sage.common.exceptions import (
    AuthenticationError,
    DeadlineExceededError,
    InvalidRequestError,
    RateLimitError,
    ServiceUnavailableError,
    UpstreamError,
)

from .fakes import FakeFactory, Recorded, Reply, fake_vector, openai_style_reply


class Script:
    """Answers with the scripted replies first, then with success."""

    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies)
        self.lock = threading.Lock()

    def __call__(self, request: Recorded) -> Reply:
        with self.lock:
            if self.replies:
                return self.replies.pop(0)
        return openai_style_reply(request.json()["input"], "m")


def rate_limited(retry_after: str | None = None) -> Reply:
    headers = {"retry-after": retry_after} if retry_after is not None else {}
    body = {"error": {"message": "Rate limit reached", "type": "requests", "code": None}}
    return Reply(429, body, headers)


def embedder_for(
    url: str, sleeps: list[float], policy: RetryPolicy | None = None
) -> OpenAIEmbedding:
    """An embedder that records its waits instead of sleeping."""
    return OpenAIEmbedding(
        api_key="k", base_url=url + "/v1", retry=policy or RetryPolicy(), sleep=sleeps.append
    )


def test_429_once_with_retry_after_then_success(fake_provider: FakeFactory) -> None:
    server = fake_provider(Script(rate_limited("2")))
    sleeps: list[float] = []
    assert embedder_for(server.url, sleeps).embed("x") == fake_vector("x")
    assert sleeps == [2.0]
    assert len(server.requests) == 2


def test_retry_after_really_waits(fake_provider: FakeFactory) -> None:
    server = fake_provider(Script(rate_limited("1")))
    embedder = OpenAIEmbedding(api_key="k", base_url=server.url + "/v1")
    started = time.monotonic()
    assert embedder.embed("x") == fake_vector("x")
    assert time.monotonic() - started >= 0.95
    assert len(server.requests) == 2


def test_retry_after_ms_is_preferred(fake_provider: FakeFactory) -> None:
    reply = rate_limited("20")
    reply.headers["retry-after-ms"] = "250"
    server = fake_provider(Script(reply))
    sleeps: list[float] = []
    embedder_for(server.url, sleeps).embed("x")
    assert sleeps == [0.25]


def test_5xx_backoff_grows_and_is_bounded(fake_provider: FakeFactory) -> None:
    server = fake_provider(Script(Reply(503, {}), Reply(502, {}), Reply(500, {})))
    sleeps: list[float] = []
    embedder = embedder_for(server.url, sleeps, RetryPolicy(backoff_base_s=0.5, backoff_max_s=1.5))
    assert embedder.embed("x") == fake_vector("x")
    assert len(sleeps) == 3
    for delay, ceiling in zip(sleeps, [0.5, 1.0, 1.5], strict=True):
        assert ceiling / 2 <= delay <= ceiling


def test_persistent_5xx_gives_up_after_max_retries(fake_provider: FakeFactory) -> None:
    server = fake_provider(lambda request: Reply(500, {"error": {"message": "boom"}}))
    sleeps: list[float] = []
    with pytest.raises(UpstreamError, match="HTTP 500: boom"):
        embedder_for(server.url, sleeps, RetryPolicy(max_retries=2)).embed("x")
    assert len(server.requests) == 3
    assert len(sleeps) == 2


def test_persistent_429_is_a_rate_limit_error(fake_provider: FakeFactory) -> None:
    server = fake_provider(lambda request: rate_limited("7"))
    sleeps: list[float] = []
    with pytest.raises(RateLimitError, match="Rate limit reached") as caught:
        embedder_for(server.url, sleeps, RetryPolicy(max_retries=1)).embed("x")
    assert caught.value.retry_after == 7.0
    assert sleeps == [7.0]


def test_huge_retry_after_is_capped(fake_provider: FakeFactory) -> None:
    server = fake_provider(Script(rate_limited("3600")))
    sleeps: list[float] = []
    embedder_for(server.url, sleeps, RetryPolicy(retry_after_max_s=5.0)).embed("x")
    assert sleeps == [5.0]


def test_client_errors_are_not_retried(fake_provider: FakeFactory) -> None:
    server = fake_provider(lambda request: Reply(401, {"error": {"message": "Incorrect key"}}))
    sleeps: list[float] = []
    with pytest.raises(AuthenticationError, match="Incorrect key"):
        embedder_for(server.url, sleeps).embed("x")
    assert len(server.requests) == 1
    assert sleeps == []


def test_unreachable_server_is_retried_then_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens once the socket closes
    sleeps: list[float] = []
    with pytest.raises(ServiceUnavailableError, match="cannot reach"):
        embedder_for(f"http://127.0.0.1:{port}", sleeps, RetryPolicy(max_retries=2)).embed("x")
    assert len(sleeps) == 2


def test_timeout_is_a_deadline_error(fake_provider: FakeFactory) -> None:
    def slow(request: Recorded) -> Reply:
        time.sleep(0.5)
        return openai_style_reply(["x"], "m")

    server = fake_provider(slow)
    embedder = OpenAIEmbedding(
        api_key="k", base_url=server.url + "/v1", timeout=0.1, retry=RetryPolicy(max_retries=0)
    )
    with pytest.raises(DeadlineExceededError, match="timed out"):
        embedder.embed("x")


def test_parse_retry_after_forms() -> None:
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after({"Retry-After": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "Wed, 01 Jan 2025 12:00:10 GMT"}, now) == 10.0
    assert parse_retry_after({"retry-after": "Wed, 01 Jan 2025 11:00:00 GMT"}, now) == 0.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({"retry-after": "-1"}) is None
    assert parse_retry_after({}) is None


def test_retry_policy_validates() -> None:
    with pytest.raises(InvalidRequestError, match="max_retries"):
        RetryPolicy(max_retries=-1)
    assert RetryPolicy(max_retries=0).delay(5, None, jitter=lambda: 1.0) == 8.0
