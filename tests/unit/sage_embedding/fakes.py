"""Fakes for the remote embedding providers: a real HTTP server on 127.0.0.1, port 0.

Each test hands the server a handler that checks the provider's request format (path,
auth header, body) and answers in that provider's response format. A failed check in
the handler becomes a 400 whose message names the check, and is recorded in `failures`,
so a wrong request fails the test loudly from both sides.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Recorded:
    """One request as the fake server saw it (header names lower-cased)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body decoded as JSON."""
        return json.loads(self.body)


@dataclass
class Reply:
    """What the fake answers: status, JSON body, extra headers."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Recorded], Reply]
FakeFactory = Callable[[Handler], "FakeProvider"]


class _QuietServer(ThreadingHTTPServer):
    """Clients that hang up early (timeout tests) are expected; don't print their traces."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class FakeProvider:
    """A threaded HTTP server that records requests and answers through `handler`."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[Recorded] = []
        self.failures: list[str] = []
        self._lock = threading.Lock()
        provider = self

        class _RequestHandler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self._serve()

            def do_GET(self) -> None:
                self._serve()

            def _serve(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                recorded = Recorded(
                    method=self.command,
                    path=self.path,
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=self.rfile.read(length),
                )
                with provider._lock:
                    provider.requests.append(recorded)
                try:
                    reply = provider.handler(recorded)
                except AssertionError as exc:
                    with provider._lock:
                        provider.failures.append(str(exc))
                    reply = Reply(400, {"error": {"message": f"fake provider: {exc}"}})
                payload = b"" if reply.body is None else json.dumps(reply.body).encode()
                self.send_response(reply.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        self._server = _QuietServer(("127.0.0.1", 0), _RequestHandler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        """`http://127.0.0.1:<port>`."""
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        """Stop serving and wait for the server thread."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        assert not self._thread.is_alive()


def fake_vector(text: str, dim: int = 4) -> list[float]:
    """A vector that identifies `text`, so tests can check every input got its own answer."""
    codes = [float(ord(ch)) for ch in text[: dim - 1]]
    return [float(len(text)), *codes, *([0.0] * (dim - 1 - len(codes)))]


def expect(condition: bool, message: str) -> None:
    """An assertion that survives `python -O`, for the fake handlers."""
    if not condition:
        raise AssertionError(message)


def openai_style_reply(texts: list[str], model: str, reverse: bool = True) -> Reply:
    """OpenAI's embeddings answer; `reverse` lists the items out of order (index says where)."""
    data = [
        {"object": "embedding", "index": i, "embedding": fake_vector(t)}
        for i, t in enumerate(texts)
    ]
    if reverse:
        data.reverse()
    return Reply(
        200,
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": len(texts), "total_tokens": len(texts)},
        },
    )
