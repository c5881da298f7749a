"""A recording OpenAI-compatible engine for tests: what exactly reached the engine?

It serves `/v1/chat/completions` and `/v1/completions` (JSON and SSE) with a fixed reply and
keeps every request's path, headers and raw body, so tests can check pass-through of
fields, header propagation (`traceparent`) and the like. It runs in the caller's event
loop on an ephemeral port: `async with RecordingEngine() as engine: engine.base_url`.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import orjson
import uvicorn

from .asgi import App, JSONResponse, Request, Response, StreamingResponse, sse_event


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the engine received it."""

    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON."""
        return orjson.loads(self.body)


class RecordingEngine:
    """Answers every generation with `reply_text` and records the request."""

    def __init__(
        self, *, reply_text: str = "ok", prompt_tokens: int = 3, completion_tokens: int = 1
    ) -> None:
        self.reply_text = reply_text
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.requests: list[RecordedRequest] = []
        self._ids = itertools.count(1)
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.base_url = ""
        self.app = App()
        self.app.add("POST", "/v1/chat/completions", self._generate)
        self.app.add("POST", "/v1/completions", self._generate)
        self.app.add("GET", "/health", self._health)

    @property
    def last(self) -> RecordedRequest:
        """The most recent request (AssertionError when there was none)."""
        assert self.requests, "the recording engine received no request"
        return self.requests[-1]

    def _usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    async def _health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _generate(self, request: Request) -> Response | StreamingResponse:
        body = await request.body()
        self.requests.append(RecordedRequest(request.path, dict(request.headers), body))
        doc = orjson.loads(body)
        chat = request.path.endswith("/chat/completions")
        rid = f"{'chatcmpl' if chat else 'cmpl'}-rec-{next(self._ids)}"
        common = {"id": rid, "created": int(time.time()), "model": doc.get("model", "")}
        if not doc.get("stream"):
            choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": self.reply_text}
            else:
                choice["text"] = self.reply_text
            return JSONResponse(
                {
                    **common,
                    "object": "chat.completion" if chat else "text_completion",
                    "choices": [choice],
                    "usage": self._usage(),
                }
            )
        kind = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool((doc.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict[str, Any] | None, text: str, finish: str | None) -> bytes:
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
            if chat:
                choice["delta"] = delta or {}
            else:
                choice["text"] = text
            doc: dict[str, Any] = {**common, "object": kind, "choices": [choice]}
            if include_usage:
                doc["usage"] = None
            return sse_event(orjson.dumps(doc))

        async def events() -> Any:
            if chat:
                yield chunk({"role": "assistant", "content": ""}, "", None)
            yield chunk({"content": self.reply_text}, self.reply_text, None)
            yield chunk({}, "", "stop")
            if include_usage:
                usage = {**common, "object": kind, "choices": [], "usage": self._usage()}
                yield sse_event(orjson.dumps(usage))
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events())

    async def start(self, host: str = "127.0.0.1") -> str:
        """Serve on an ephemeral port in the running loop; returns the base URL."""
        server = uvicorn.Server(
            uvicorn.Config(
                self.app, host=host, port=0, log_config=None, access_log=False, lifespan="off"
            )
        )
        self._server = server
        self._task = asyncio.create_task(server.serve())
        while not server.started:
            if self._task.done():
                self._task.result()  # surfaces the startup error
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        self.base_url = f"http://{host}:{port}"
        return self.base_url

    async def stop(self) -> None:
        """Stop serving and wait for the server task."""
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
        self._server = self._task = None

    async def __aenter__(self) -> RecordingEngine:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


def quiet_server(app: Any, port: int) -> uvicorn.Server:
    """A uvicorn server for `app` on 127.0.0.1:`port`, without access or config logging.

    Shutdown waits for open requests at most 10 s, as the services' own server does
    (sage.common.http.server): a request left hanging cannot hold a test's teardown."""
    return uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=10,
        )
    )


async def serve_in_task(server: uvicorn.Server, timeout_s: float = 10.0) -> asyncio.Task[None]:
    """Run `server` in a task of the running loop; return once it listens."""
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + timeout_s
    while not server.started:  # uvicorn exposes a flag, not an event
        if task.done():
            task.result()  # re-raises what stopped it
            raise RuntimeError("the server stopped before it listened")
        if time.monotonic() > deadline:
            raise TimeoutError(f"server not listening after {timeout_s:g}s")
        await asyncio.sleep(0.01)
    return task
