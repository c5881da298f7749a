"""Provider API keys (sage_embedding's remote methods) stay out of error messages, reprs
and logs, even when the provider echoes the key back in its error body."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from sage.common.components.sage_embedding import EmbeddingFactory
from sage.common.exceptions import SageError

from .conftest import PROVIDER_KEY, assert_no_secret


class _EchoingProvider(BaseHTTPRequestHandler):
    """Answers every request with `status` and an error that quotes the bearer token,
    as some proxies and providers do."""

    status = 401

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        token = (self.headers.get("authorization") or "").removeprefix("Bearer ")
        body = json.dumps({"error": {"message": f"Incorrect API key provided: {token}"}})
        self.send_response(self.status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


@pytest.fixture(params=[401, 400, 500])
def echoing_provider(request: pytest.FixtureRequest) -> Iterator[str]:
    """A real HTTP server on loopback that echoes the key in its error; yields /v1 URL."""
    handler = type("Handler", (_EchoingProvider,), {"status": request.param})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_provider_key_not_in_errors_or_logs(
    echoing_provider: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The OpenAI method with OPENAI_API_KEY from the environment: its failure names the
    provider and status, but the key is masked everywhere."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("OPENAI_API_KEY", PROVIDER_KEY)
    embedder = EmbeddingFactory.create(
        "openai", model="text-embedding-3-small", base_url=echoing_provider
    )
    try:
        assert_no_secret(repr(embedder), "repr")
        with pytest.raises(SageError) as failure:
            embedder.embed("hello")
    finally:
        embedder.close()
    message = str(failure.value)
    assert "Incorrect API key provided" in message  # the provider's text is kept
    assert_no_secret(message, "the error message")
    assert_no_secret(json.dumps(failure.value.to_openai()), "the OpenAI error JSON")
    assert_no_secret(caplog.text, "logs")
