"""Issue 16, "traffic hijack and SSRF via external engines": a registered base_url is checked
and probed before it gets traffic, never joins a managed model's pool unasked, and what an
engine (or whatever answers at its address) sends back is summarised, not echoed.

The stack is the real one (every service in-process, the edge on a socket). Fake engines and
a fake "internal service" are tiny HTTP servers on loopback: the internal service on
127.0.0.1 (refused like any loopback address), fake engines on 127.0.0.2, which this
module's settings allow-list (SAGE_EXTERNAL_ENGINE_ALLOW).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from sage.common.config.settings import SageSettings
from sage.common.exceptions import (
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    UpstreamError,
)
from sage.common.security import local_interface_addresses
from sage.services.lifecycle.external_engines import (
    PROBE_TIMEOUT_S,
    ExternalEnginePolicy,
    refused_kind,
)
from sage.services.scheduler.executor import MAX_ENGINE_MESSAGE_CHARS, _engine_error
from sage.services.scheduler.registry import EngineKind, EngineRecord

from .conftest import admin, tenant

SECRET = "INTERNAL-SECRET-PAYLOAD-4e1f"
ENGINE_HOST = "127.0.0.2"  # allow-listed below; 127.0.0.1 is not


@pytest.fixture
def settings(settings: SageSettings) -> SageSettings:
    """The security settings with only 127.0.0.2 allowed for external engines."""
    return settings.model_copy(update={"external_engine_allow": ENGINE_HOST})


Reply = tuple[int, str, bytes]  # status, content-type, body


@dataclass
class FakeServer:
    """A real HTTP server answering GET/POST from `routes` (path → reply or callable);
    records every request it got (method, path, body)."""

    host: str
    routes: dict[str, Reply | Callable[[], Reply]] = field(default_factory=dict)
    seen: list[tuple[str, str, str]] = field(default_factory=list)
    hang: bool = False  # accept, read, never answer
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://{self.host}:{self.server.server_address[1]}"

    def start(self) -> FakeServer:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length).decode(errors="replace") if length else ""
                fake.seen.append((self.command, self.path, body))
                if fake.hang:
                    time.sleep(PROBE_TIMEOUT_S + 5)
                    return
                route = fake.routes.get(self.path)
                if route is None:
                    status, ctype, data = 404, "text/plain", b"not found"
                else:
                    status, ctype, data = route() if callable(route) else route
                self.send_response(status)
                self.send_header("content-type", ctype)
                if status in (301, 302, 307, 308):
                    self.send_header("location", data.decode())
                    data = b""
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = _answer
            do_POST = _answer

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

        self.server = ThreadingHTTPServer((self.host, 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def models(*names: str) -> Reply:
    """An OpenAI /v1/models reply listing `names`."""
    doc = {"object": "list", "data": [{"id": n, "object": "model"} for n in names]}
    return 200, "application/json", json.dumps(doc).encode()


def chat_reply(model: str) -> Reply:
    """A minimal OpenAI chat completion."""
    doc = {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "ok"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    return 200, "application/json", json.dumps(doc).encode()


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


async def register(plane: Any, **body: Any) -> httpx.Response:
    reply: httpx.Response = await plane.client.post(
        "/v1/management/engines/register", json=body, headers=admin()
    )
    return reply


async def engine_ids(plane: Any) -> list[str]:
    listed = (await plane.client.get("/v1/management/engines", headers=admin())).json()
    return [e["engine_id"] for e in listed["engines"] if e["status"] == "RUNNING"]


def internal_service(fakes: Callable[..., FakeServer]) -> FakeServer:
    """A service on 127.0.0.1 that answers everything with a secret (the SSRF target)."""
    body = json.dumps({"data": [{"id": "probe"}], "secret": SECRET}).encode()
    routes: dict[str, Reply | Callable[[], Reply]] = {
        "/v1/models": (200, "application/json", body),
        "/latest/v1/models": (200, "application/json", body),
    }
    return fakes("127.0.0.1", routes=routes)


# -- addresses -------------------------------------------------------------------------


async def test_loopback_link_local_metadata_and_unspecified_addresses_are_refused(
    secure_plane: Any, fakes: Callable[..., FakeServer]
) -> None:
    """Every such base_url is a 400 naming base_url; the internal service is never asked,
    nothing is registered, and its body never comes back."""
    inside = internal_service(fakes)
    port = inside.server.server_address[1] if inside.server else 0
    for base_url in (
        inside.url,
        f"http://localhost:{port}",
        f"http://127.1:{port}",
        f"http://[::ffff:127.0.0.1]:{port}/v1",
        f"http://0.0.0.0:{port}",
        "http://169.254.169.254/latest",
        "http://[fd00:ec2::254]/",
        "http://[fe80::1]:8000",
        "http://[::1]:9/",
        "http://224.0.0.1:80",
    ):
        reply = await register(secure_plane, model_id="probe", base_url=base_url)
        assert reply.status_code == 400, (base_url, reply.text)
        error = reply.json()["error"]
        assert error["param"] == "base_url", (base_url, error)
        assert SECRET not in reply.text
    assert inside.seen == []
    assert await engine_ids(secure_plane) == []


async def test_this_machines_own_interface_addresses_are_refused(
    secure_plane: Any, fakes: Callable[..., FakeServer]
) -> None:
    """A LAN or bridge address of this machine reaches its services bound to 0.0.0.0, so it
    is refused like loopback (found in review)."""
    own = sorted(
        str(a)
        for a in local_interface_addresses()
        if not a.is_loopback and not a.is_link_local and a.version == 4
    )
    if not own:
        pytest.skip("this machine has no non-loopback IPv4 address")
    reply = await register(secure_plane, model_id="probe", base_url=f"http://{own[0]}:9/v1")
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "base_url" and "this machine's own" in error["message"], error
    assert await engine_ids(secure_plane) == []


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.9.9.9", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("169.254.169.254", "cloud metadata"),
        ("fd00:ec2::254", "cloud metadata"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("::", "unspecified"),
        ("239.1.1.1", "multicast"),
        ("10.1.2.3", None),
        ("192.168.1.10", None),
        ("8.8.8.8", None),
    ],
)
def test_refused_address_kinds(address: str, kind: str | None) -> None:
    """Private networks (where real engines live) pass; the rest is named."""
    import ipaddress

    assert refused_kind(ipaddress.ip_address(address)) == kind


def test_allow_list_by_host_host_port_and_cidr() -> None:
    """SAGE_EXTERNAL_ENGINE_ALLOW entries open exactly what they name."""
    policy = ExternalEnginePolicy.parse("localhost:8000, 127.0.0.2/31, [::1]:9000")
    policy.check_address(httpx.URL("http://localhost:8000"))
    policy.check_address(httpx.URL("http://127.0.0.2:1234"))
    policy.check_address(httpx.URL("http://[::1]:9000/v1"))
    for refused in ("http://localhost:8001", "http://127.0.0.9:80", "http://[::1]:9001"):
        with pytest.raises(InvalidRequestError) as err:
            policy.check_address(httpx.URL(refused))
        assert err.value.param == "base_url" and "SAGE_EXTERNAL_ENGINE_ALLOW" in err.value.message
    with pytest.raises(InvalidRequestError, match="cloud metadata"):
        ExternalEnginePolicy.parse("").check_address(httpx.URL("http://169.254.169.254/"))


# -- the probe ---------------------------------------------------------------------------


async def test_an_allowed_engine_that_serves_the_model_is_registered_and_routed(
    secure_plane: Any, fakes: Callable[..., FakeServer]
) -> None:
    """The probe passes: RUNNING, and chat requests reach it."""
    engine = fakes(
        routes={
            "/v1/models": models("ext-model"),
            "/v1/chat/completions": chat_reply("ext-model"),
        }
    )
    reply = await register(secure_plane, model_id="ext-model", base_url=engine.url + "/v1")
    assert reply.status_code == 201, reply.text
    assert reply.json()["status"] == "RUNNING"
    chat = await secure_plane.client.post(
        "/v1/chat/completions",
        json={"model": "ext-model", "messages": [{"role": "user", "content": "hi"}]},
        headers=tenant(),
    )
    assert chat.status_code == 200, chat.text
    assert ("GET", "/v1/models", "") in engine.seen
    assert any(path == "/v1/chat/completions" for _, path, _ in engine.seen)


async def test_an_engine_that_does_not_serve_the_model_is_not_registered(
    secure_plane: Any, fakes: Callable[..., FakeServer]
) -> None:
    """/v1/models must list the model (or an alias): else a 400 naming the model."""
    engine = fakes(routes={"/v1/models": models("some-other-model")})
    reply = await register(secure_plane, model_id="ext-model", base_url=engine.url)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == "model_id"
    assert "does not serve model 'ext-model'" in reply.json()["error"]["message"]
    assert "some-other-model" not in reply.text
    assert await engine_ids(secure_plane) == []
    aliased = await register(
        secure_plane, model_id="ext-model", aliases=["some-other-model"], base_url=engine.url
    )
    assert aliased.status_code == 201, aliased.text


async def test_probe_failures_say_why_and_echo_nothing(
    secure_plane: Any, fakes: Callable[..., FakeServer]
) -> None:
    """A redirect (not followed), an HTML page, an oversized reply, an error status and a
    closed port are each a 400 naming base_url and the reason; nothing registered."""
    inside = internal_service(fakes)
    page = b"<html><body>" + SECRET.encode() + b"</body></html>"
    cases: list[tuple[dict[str, Reply | Callable[[], Reply]], str]] = [
        ({"/v1/models": (302, "text/plain", (inside.url + "/v1/models").encode())}, "redirect"),
        ({"/v1/models": (200, "text/html", page)}, "OpenAI model list"),
        ({"/v1/models": (200, "application/json", b"[" + b"1," * 700_000 + b"1]")}, "bytes"),
        ({"/v1/models": (500, "text/html", page)}, "HTTP 500"),
    ]
    for routes, reason in cases:
        engine = fakes(routes=routes)
        reply = await register(secure_plane, model_id="probe", base_url=engine.url)
        assert reply.status_code == 400, (reason, reply.text)
        error = reply.json()["error"]
        assert error["param"] == "base_url" and reason in error["message"], error
        assert SECRET not in reply.text
    closed = fakes()
    url = closed.url
    closed.stop()
    reply = await register(secure_plane, model_id="probe", base_url=url)
    assert reply.status_code == 400 and "cannot be reached" in reply.json()["error"]["message"]
    assert inside.seen == []  # the redirect was not followed
    assert await engine_ids(secure_plane) == []


async def test_a_silent_engine_fails_the_probe_within_its_bound(
    secure_plane: Any, fakes: Callable[..., FakeServer]
) -> None:
    """An address that accepts and never answers: refused after PROBE_TIMEOUT_S (5 s), not
    after the caller's deadline; stated bound here: under 5 s + 3 s."""
    engine = fakes(hang=True)
    started = time.monotonic()
    reply = await register(secure_plane, model_id="probe", base_url=engine.url)
    elapsed = time.monotonic() - started
    assert reply.status_code == 400, reply.text
    assert "did not answer" in reply.json()["error"]["message"]
    assert elapsed < PROBE_TIMEOUT_S + 3, elapsed


# -- hijacking a managed model -------------------------------------------------------


async def test_an_external_engine_never_silently_joins_a_managed_models_pool(
    no_leaked_children: None, secure_plane: Any, fakes: Callable[..., FakeServer]
) -> None:
    """With a lifecycle-started engine serving `sim-pool`, registering an attacker's engine
    under that name (or as an alias) is a 409 and none of the tenants' prompts reach it;
    with join_existing_model it is the operator's explicit choice."""
    started = await secure_plane.client.post(
        "/v1/management/engines",
        json={"model_id": "sim-pool", "backend": "sim", "startup_timeout_s": 60},
        headers=admin(),
    )
    assert started.status_code == 201, started.text
    attacker = fakes(
        routes={
            "/v1/models": models("sim-pool", "decoy"),
            "/v1/chat/completions": chat_reply("sim-pool"),
        }
    )
    for body in (
        {"model_id": "sim-pool"},
        {"model_id": "decoy", "aliases": ["sim-pool"]},
    ):
        reply = await register(secure_plane, base_url=attacker.url, **body)
        assert reply.status_code == 409, (body, reply.text)
        error = reply.json()["error"]
        assert error["param"] == "model_id" and "join_existing_model" in error["message"]
    assert await engine_ids(secure_plane) == [started.json()["engine_id"]]
    for _ in range(6):
        chat = await secure_plane.client.post(
            "/v1/chat/completions",
            json={"model": "sim-pool", "messages": [{"role": "user", "content": "tenant secret"}]},
            headers=tenant(),
        )
        assert chat.status_code == 200, chat.text
    assert not [seen for seen in attacker.seen if "tenant secret" in seen[2]]
    joined = await register(
        secure_plane, model_id="sim-pool", base_url=attacker.url, join_existing_model=True
    )
    assert joined.status_code == 201, joined.text
    await secure_plane.client.delete(
        f"/v1/management/engines/{started.json()['engine_id']}", headers=admin()
    )


# -- upstream error bodies -------------------------------------------------------------


async def test_engine_error_bodies_are_summarised_not_echoed(
    secure_plane: Any, fakes: Callable[..., FakeServer]
) -> None:
    """An engine answering a chat request with some other service's page: the caller gets
    a 502 saying what came back (status, kind, size), not the page."""
    page = b"<!DOCTYPE html><html><body>" + SECRET.encode() + b"</body></html>"
    engine = fakes(
        routes={
            "/v1/models": models("ext-err"),
            "/v1/chat/completions": (500, "text/html", page),
        }
    )
    assert (
        await register(secure_plane, model_id="ext-err", base_url=engine.url)
    ).status_code == 201
    chat = await secure_plane.client.post(
        "/v1/chat/completions",
        json={"model": "ext-err", "messages": [{"role": "user", "content": "hi"}]},
        headers=tenant(),
    )
    assert chat.status_code == 502, chat.text
    assert SECRET not in chat.text
    assert f"HTTP 500 (html, {len(page)} bytes)" in chat.json()["error"]["message"]


_ENGINE = EngineRecord(
    engine_id="e1", model="m", kind=EngineKind.LLM, base_url="http://10.0.0.1:8000"
)


def test_openai_error_messages_are_kept_but_clipped() -> None:
    """An OpenAI-shaped error keeps its message (at most 300 characters, one line) and
    param; its status picks the error class."""
    body = json.dumps(
        {"error": {"message": "bad temperature\n" + "x" * 5000, "param": "temperature"}}
    ).encode()
    err = _engine_error(_ENGINE, 400, body)
    assert isinstance(err, InvalidRequestError) and err.param == "temperature"
    assert err.message.startswith("bad temperature ") and "\n" not in err.message
    assert len(err.message) <= MAX_ENGINE_MESSAGE_CHARS
    vllm_old = json.dumps({"object": "error", "message": "The model `q` does not exist."})
    assert isinstance(_engine_error(_ENGINE, 404, vllm_old.encode()), ModelNotFoundError)
    tei = json.dumps({"error": "Input validation error", "error_type": "Validation"})
    assert "Input validation error" in _engine_error(_ENGINE, 500, tei.encode()).message


@pytest.mark.parametrize(
    ("status", "body", "summary", "kind"),
    [
        (
            500,
            b"<html><title>" + SECRET.encode() + b"</title></html>",
            "HTTP 500 (html, ",
            UpstreamError,
        ),
        (400, b"plain text " + SECRET.encode(), "HTTP 400 (text, ", InvalidRequestError),
        (429, b"slow down " + SECRET.encode(), "HTTP 429 (text, ", OverloadedError),
        (404, json.dumps({"detail": SECRET}).encode(), "HTTP 404 (json, ", UpstreamError),
        (503, b"", "HTTP 503 (empty, 0 bytes)", UpstreamError),
    ],
)
def test_other_error_bodies_become_a_summary(
    status: int, body: bytes, summary: str, kind: type[Exception]
) -> None:
    """Anything that is not an OpenAI error is summarised (status, kind and size only); the
    status still picks the error class (a 429 stays an overload the scheduler can retry)."""
    err = _engine_error(_ENGINE, status, body)
    assert type(err) is kind
    assert summary in err.message and SECRET not in err.message
