"""ASGI framework A/B: our hand-written App (sage.common.http.asgi) against Starlette.

Issue 18 asks for Starlette unless it costs more than 5% of the edge's throughput. Both
apps here do the edge's per-request work without its upstream: the same host/origin and
content-type guard, request id, server span, in-flight count, then for POST
/v1/chat/completions the edge's own body decoding (sage.protocol.openai) and a fixed
OpenAI-shaped reply (orjson), or 16 SSE chunks then [DONE]; GET /health answers JSON.
The Starlette app is written as a port would be: Route handlers taking Starlette's
Request and returning its Response/StreamingResponse, the cross-cutting work in a pure
ASGI middleware, SageError mapped by an exception handler.

Each app is served by serve_app (the edge's uvicorn settings: uvloop, the limited
httptools protocol, one process) in a child process; the two alternate A/B for --rounds
rounds, each case driven by wrk (1 thread) for --duration seconds. Server CPU per request
comes from psutil on the server process. Everything binds loopback; ratios hold only
within one run. Needs wrk and the `bench` extra (starlette).

Usage: python bench/asgi_ab.py [--rounds 4] [--duration 4]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import orjson
import psutil
from _stack import chat_lua, require_wrk, run_wrk
from opentelemetry import propagate, trace

from sage.common.exceptions import SageError
from sage.common.http.asgi import App, Request, Response, StreamingResponse, sse_event
from sage.common.http.guard import SAFE_METHODS, BrowserGuard
from sage.common.http.server import serve_app
from sage.common.utils.processes import free_port, stop_process, wait_http
from sage.protocol.openai import ChatCompletionRequest, decode

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

IMPLS = ("ours", "starlette")
CHUNKS = 16
DONE = b"data: [DONE]\n\n"
BODY = {"model": "sim", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
REPLY: dict[str, Any] = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "sim",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hello " * 16},
            "finish_reason": "length",
        }
    ],
    "usage": {"prompt_tokens": 1, "completion_tokens": 16, "total_tokens": 17},
}
# (case name, path, streamed, connections)
CASES = (
    ("chat c1", "/v1/chat/completions", False, 1),
    ("chat c64", "/v1/chat/completions", False, 64),
    ("stream c1", "/v1/chat/completions", True, 1),
    ("stream c64", "/v1/chat/completions", True, 64),
    ("health c64", "/health", False, 64),
)
_tracer = trace.get_tracer("sage.http")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # as App keeps a caller's request id


def _guard() -> BrowserGuard:
    return BrowserGuard.build("", ("127.0.0.1",), None)


def _reply(model: str) -> bytes:
    return orjson.dumps({**REPLY, "model": model})


async def _sse(model: str) -> AsyncIterator[bytes]:
    """What the edge relays for a streamed chat: one write per chunk, then [DONE]."""
    for i in range(CHUNKS):
        chunk = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "model": model,
            "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}],
        }
        yield sse_event(orjson.dumps(chunk))
    yield DONE


def read_chat(body: bytes) -> tuple[str, bool]:
    """The edge's reading of a chat body: (model, stream)."""
    parsed = decode(body, ChatCompletionRequest)
    return parsed.model, parsed.streaming


def ours_app(read: Callable[[bytes], tuple[str, bool]] = read_chat) -> App:
    """The edge's framework, configured as the edge configures it (guard on, no CORS)."""
    app = App(guard=_guard())

    @app.route("POST", "/v1/chat/completions")
    async def chat(request: Request) -> Response | StreamingResponse:
        model, stream = read(await request.body())
        request.model = model
        if stream:
            return StreamingResponse(_sse(model))
        return Response(_reply(model))

    @app.route("GET", "/health")
    async def health(request: Request) -> Response:
        return Response(orjson.dumps({"status": "ok", "engines_ready": 1}))

    return app


class _EdgeMiddleware:
    """What App does around every request, as a pure ASGI middleware in a Starlette port:
    request id, host/origin and content-type guard, server span, in-flight count."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        self.guard = _guard()
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from starlette.datastructures import Headers
        from starlette.responses import Response as SResponse

        headers = Headers(scope=scope)
        method: str = scope["method"]
        request_id = headers.get("x-request-id")
        if request_id is None or _REQUEST_ID.fullmatch(request_id) is None:
            request_id = uuid.uuid4().hex
        rid = (b"x-request-id", request_id.encode("latin-1"))
        try:
            self.guard.check_source(method, headers)
            if method not in SAFE_METHODS:
                self.guard.check_body_type(method, headers)
        except SageError as exc:
            refusal = SResponse(orjson.dumps(exc.to_openai()), exc.http_status)
            await refusal(scope, receive, send)
            return

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), rid]
            await send(message)

        self.in_flight += 1
        try:
            with _tracer.start_as_current_span(
                f"{method} {scope['path']}",
                context=propagate.extract(headers),
                kind=trace.SpanKind.SERVER,
            ):
                await self.app(scope, receive, send_with_id)
        finally:
            self.in_flight -= 1


def starlette_app() -> Any:
    """The same handlers in Starlette's idioms."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request as SRequest
    from starlette.responses import Response as SResponse
    from starlette.responses import StreamingResponse as SStreamingResponse
    from starlette.routing import Route

    async def chat(request: SRequest) -> SResponse:
        model, stream = read_chat(await request.body())
        if stream:
            return SStreamingResponse(
                _sse(model),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache"},
            )
        return SResponse(_reply(model), media_type="application/json")

    async def health(request: SRequest) -> SResponse:
        return SResponse(
            orjson.dumps({"status": "ok", "engines_ready": 1}), media_type="application/json"
        )

    async def sage_error(request: SRequest, exc: Exception) -> SResponse:
        assert isinstance(exc, SageError)
        return SResponse(orjson.dumps(exc.to_openai()), exc.http_status)

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
        ],
        middleware=[Middleware(_EdgeMiddleware)],
        exception_handlers={SageError: sage_error},
    )


def serve(impl: str, port: int) -> int:
    app = ours_app() if impl == "ours" else starlette_app()
    return serve_app(app, "127.0.0.1", port, what=f"asgi_ab {impl}")


def _check(url: str, impl: str) -> None:
    """Both apps answer the same thing (so the A/B compares equal work)."""
    import urllib.request

    for stream in (False, True):
        req = urllib.request.Request(
            url + "/v1/chat/completions",
            data=orjson.dumps({**BODY, "stream": stream}),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            data = resp.read()
            if resp.headers.get("x-request-id") is None:
                raise RuntimeError(f"{impl}: no x-request-id")
        if stream and data.count(b"data: ") != CHUNKS + 1:
            raise RuntimeError(f"{impl}: expected {CHUNKS} events and [DONE], got {data!r}")
        if not stream and orjson.loads(data)["model"] != "sim":
            raise RuntimeError(f"{impl}: bad reply {data!r}")


def measure(
    impl: str,
    duration: float,
    scripts: dict[bool, Path],
    tmp: Path,
    server_script: str = __file__,
    cases: tuple[tuple[str, str, bool, int], ...] = CASES,
) -> dict[str, Any]:
    """Start `impl` (`server_script --serve impl`), run every case against it once, stop it."""
    port = free_port()
    log = (tmp / f"{impl}-{port}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, server_script, "--serve", impl, "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    results: dict[str, Any] = {}
    try:
        wait_http(url + "/health", proc, timeout=30)
        _check(url, impl)
        server = psutil.Process(proc.pid)
        run_wrk(url + "/health", scripts[False], 1, 8)  # warm-up
        for name, path, streamed, conns in cases:
            script = scripts[streamed] if path != "/health" else tmp / "get.lua"
            before = server.cpu_times()
            got = run_wrk(url + path, script, duration, conns)
            after = server.cpu_times()
            if got["errors"]:
                raise RuntimeError(f"{impl} {name}: {got['errors']:.0f} errors")
            cpu = (after.user + after.system) - (before.user + before.system)
            results[name] = {
                "rps": got["rps"],
                "p50_ms": got["p50_ms"],
                "cpu_us_per_req": 1e6 * cpu / max(got["requests"], 1.0),
            }
    finally:
        stop_process(proc)
        log.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--json", type=Path, help="write every round's figures here")
    parser.add_argument("--serve", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        raise SystemExit(serve(args.serve, args.port))
    require_wrk()
    tmp = Path(tempfile.mkdtemp(prefix="sage-asgi-ab-"))
    scripts = {s: tmp / f"chat-{s}.lua" for s in (False, True)}  # streamed or not
    for streamed, path in scripts.items():
        path.write_text(chat_lua(json.dumps({**BODY, "stream": streamed})))
    (tmp / "get.lua").write_text('wrk.method = "GET"\n')
    runs: dict[str, list[dict[str, Any]]] = {impl: [] for impl in IMPLS}
    started = time.monotonic()
    for r in range(args.rounds):
        for impl in IMPLS:
            runs[impl].append(measure(impl, args.duration, scripts, tmp))
            print(f"round {r + 1} {impl} done ({time.monotonic() - started:.0f} s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    print(f"\n{args.rounds} rounds x {args.duration:g} s per case, medians; events = 17/stream")
    print(
        f"{'case':<11} {'ours rps':>9} {'starl rps':>9} {'ratio':>6} "
        f"{'ours us/req':>11} {'starl us/req':>12} {'ratio':>6}"
    )
    for name, *_ in CASES:
        rps = {i: statistics.median(run[name]["rps"] for run in runs[i]) for i in IMPLS}
        cpu = {i: statistics.median(run[name]["cpu_us_per_req"] for run in runs[i]) for i in IMPLS}
        print(
            f"{name:<11} {rps['ours']:>9.0f} {rps['starlette']:>9.0f} "
            f"{rps['starlette'] / rps['ours']:>6.3f} {cpu['ours']:>11.0f} "
            f"{cpu['starlette']:>12.0f} {cpu['starlette'] / cpu['ours']:>6.3f}"
        )
    with contextlib.suppress(OSError):
        for f in tmp.iterdir():
            f.unlink()
        os.rmdir(tmp)


if __name__ == "__main__":
    main()
