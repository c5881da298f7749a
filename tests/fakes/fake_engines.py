#!/usr/bin/env python3
"""Stand-ins for the engine programs lifecycle launches but CI does not have.

Copied (or linked) under the real program's name, this script behaves like that program:
`vllm` (`vllm serve MODEL ...`), `text-embeddings-router` (TEI) or `infinity_emb`
(`infinity_emb v2 ...`). It parses the real flag names with argparse (an unknown flag
exits 2, as the real programs do), records what it was started with as JSON in the file
named by $FAKE_ARGV_FILE (`{"argv": [...], "env": {"CUDA_VISIBLE_DEVICES": ...}}`), and
answers the program's HTTP routes minimally in its wire format:

- vllm: GET /health, /v1/models, /metrics; POST /v1/chat/completions (also streaming),
  /v1/completions; unknown model names get vLLM's 404.
- text-embeddings-router: GET /health, /info, /metrics; POST /embed, /embeddings,
  /v1/embeddings (TEI has no /v1/models).
- infinity_emb: GET /health (never prefixed), {url-prefix}/models, /metrics;
  POST {url-prefix}/embeddings.

Standard library only, so any python3 runs it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

Handler = Callable[[dict[str, Any]], tuple[int, Any]]
FAKE_TEXT = "fake engine answer"
DIM = 8


def vector(text: str) -> list[float]:
    """A deterministic unit vector for `text`."""
    digest = hashlib.sha256(text.encode()).digest()
    raw = [b / 255.0 - 0.5 for b in digest[:DIM]]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


def texts_of(value: Any) -> list[str]:
    """OpenAI/TEI `input`/`inputs`: a string or a list of strings."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError("input must be a string or a list of strings")


def record(program: str, argv: Sequence[str]) -> None:
    path = os.environ.get("FAKE_ARGV_FILE")
    if path:
        doc = {
            "program": program,
            "argv": list(argv),
            "env": {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")},
        }
        Path(path).write_text(json.dumps(doc))


def serve(
    host: str,
    port: int,
    get_routes: dict[str, Callable[[], tuple[int, Any]]],
    post_routes: dict[str, Handler],
    sse_routes: dict[str, Callable[[dict[str, Any]], list[Any]]] | None = None,
) -> None:
    """Serve until killed; a body that is a str is sent as text, anything else as JSON."""
    streams = sse_routes or {}

    class RequestHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, body: Any) -> None:
            if isinstance(body, str):
                data, kind = body.encode(), "text/plain; charset=utf-8"
            else:
                data, kind = json.dumps(body).encode(), "application/json"
            self.send_response(status)
            self.send_header("content-type", kind)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            # Real servers route on the path alone (vLLM's /metrics also filters by name[]).
            route = get_routes.get(self.path.partition("?")[0])
            if route is None:
                self._send(404, {"detail": "Not Found"})
            else:
                self._send(*route())

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except json.JSONDecodeError:
                self._send(400, {"error": "body is not JSON"})
                return
            if not isinstance(body, dict):
                self._send(400, {"error": "body must be an object"})
                return
            stream = streams.get(self.path)
            if stream is not None and body.get("stream"):
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("connection", "close")
                self.end_headers()
                for event in stream(body):
                    payload = event if isinstance(event, str) else json.dumps(event)
                    self.wfile.write(f"data: {payload}\n\n".encode())
                    self.wfile.flush()
                self.close_connection = True
                return
            route = post_routes.get(self.path)
            if route is None:
                self._send(404, {"detail": "Not Found"})
                return
            try:
                self._send(*route(body))
            except ValueError as exc:
                self._send(422, {"error": str(exc)})

    server = ThreadingHTTPServer((host, port), RequestHandler)
    server.daemon_threads = True
    server.serve_forever()


# -- vllm --------------------------------------------------------------------------------


def vllm(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="vllm")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("serve")
    cmd.add_argument("model_tag")
    cmd.add_argument("--host", default=None)
    cmd.add_argument("--port", type=int, default=8000)
    cmd.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    cmd.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    cmd.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    cmd.add_argument("--max-model-len", type=int, default=None)
    cmd.add_argument("--served-model-name", nargs="+", default=None)
    cmd.add_argument("--max-num-seqs", type=int, default=None)
    cmd.add_argument("--dtype", default="auto")
    cmd.add_argument("--enforce-eager", action="store_true")
    cmd.add_argument("--trust-remote-code", action="store_true")
    cmd.add_argument("--override-generation-config", default=None)
    cmd.add_argument("--task", default="auto")
    cmd.add_argument("--runner", choices=["auto", "generate", "pooling", "draft"])
    cmd.add_argument("--convert", choices=["auto", "none", "embed", "classify"])
    cmd.add_argument("--kv-transfer-config", type=json.loads)
    cmd.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction)
    cmd.add_argument("--kv-events-config", type=json.loads)
    args = parser.parse_args(argv)
    record("vllm", argv)
    names: list[str] = args.served_model_name or [args.model_tag]
    max_len = args.max_model_len or 2048

    def not_found(model: str) -> tuple[int, Any]:
        return 404, {
            "error": {
                "message": f"The model `{model}` does not exist.",
                "type": "NotFoundError",
                "param": "model",
                "code": 404,
            }
        }

    def models() -> tuple[int, Any]:
        data = [
            {
                "id": n,
                "object": "model",
                "owned_by": "vllm",
                "root": args.model_tag,
                "max_model_len": max_len,
            }
            for n in names
        ]
        return 200, {"object": "list", "data": data}

    def usage() -> dict[str, int]:
        return {"prompt_tokens": 3, "total_tokens": 6, "completion_tokens": 3}

    def chat(body: dict[str, Any]) -> tuple[int, Any]:
        model = body.get("model", names[0])
        if model not in names:
            return not_found(model)
        return 200, {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": FAKE_TEXT},
                    "finish_reason": "stop",
                }
            ],
            "usage": usage(),
        }

    def chat_stream(body: dict[str, Any]) -> list[Any]:
        head = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body.get("model", names[0]),
        }
        events: list[Any] = [
            {
                **head,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "finish_reason": None,
                    }
                ],
            },
        ]
        words = FAKE_TEXT.split(" ")
        for i, word in enumerate(words):
            piece = word if i == 0 else " " + word
            last = i == len(words) - 1
            events.append(
                {
                    **head,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"content": piece},
                            "finish_reason": "stop" if last else None,
                        }
                    ],
                }
            )
        events.append("[DONE]")
        return events

    def completions(body: dict[str, Any]) -> tuple[int, Any]:
        model = body.get("model", names[0])
        if model not in names:
            return not_found(model)
        return 200, {
            "id": "cmpl-fake",
            "object": "text_completion",
            "model": model,
            "choices": [{"index": 0, "text": FAKE_TEXT, "finish_reason": "stop"}],
            "usage": usage(),
        }

    def metrics() -> tuple[int, Any]:
        return 200, (
            f'vllm:num_requests_running{{model_name="{names[0]}"}} 0.0\n'
            f'vllm:num_requests_waiting{{model_name="{names[0]}"}} 0.0\n'
        )

    serve(
        args.host or "0.0.0.0",
        args.port,
        {"/health": lambda: (200, ""), "/v1/models": models, "/metrics": metrics},
        {"/v1/chat/completions": chat, "/v1/completions": completions},
        {"/v1/chat/completions": chat_stream},
    )


# -- text-embeddings-router (TEI) ----------------------------------------------------------


def tei(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="text-embeddings-router")
    parser.add_argument("--model-id", required=True)
    parser.add_argument("--revision")
    parser.add_argument("--served-model-name")
    parser.add_argument("--hostname", default="0.0.0.0")
    parser.add_argument("--port", "-p", type=int, default=3000)
    parser.add_argument("--max-concurrent-requests", type=int, default=512)
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--max-client-batch-size", type=int, default=32)
    parser.add_argument("--auto-truncate", action="store_true")
    parser.add_argument("--payload-limit", type=int, default=2_000_000)
    parser.add_argument("--uds-path", default="/tmp/text-embeddings-inference-server")
    parser.add_argument("--prometheus-port", type=int, default=9000)
    parser.add_argument("--dtype", choices=["float16", "float32"])
    parser.add_argument("--pooling")
    parser.add_argument("--json-output", action="store_true")
    args = parser.parse_args(argv)
    record("text-embeddings-router", argv)
    served = args.served_model_name or args.model_id

    def check(texts: list[str]) -> None:
        if len(texts) > args.max_client_batch_size:
            raise ValueError(
                f"batch size {len(texts)} > maximum allowed batch size {args.max_client_batch_size}"
            )

    def embed(body: dict[str, Any]) -> tuple[int, Any]:
        texts = texts_of(body.get("inputs"))
        check(texts)
        return 200, [vector(t) for t in texts]

    def openai(body: dict[str, Any]) -> tuple[int, Any]:
        texts = texts_of(body.get("input"))
        check(texts)
        data = [
            {"object": "embedding", "embedding": vector(t), "index": i} for i, t in enumerate(texts)
        ]
        tokens = sum(len(t.split()) for t in texts)
        return 200, {
            "object": "list",
            "data": data,
            "model": served,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def info() -> tuple[int, Any]:
        return 200, {
            "model_id": args.model_id,
            "model_type": {"embedding": {"pooling": "mean"}},
            "max_concurrent_requests": args.max_concurrent_requests,
            "max_client_batch_size": args.max_client_batch_size,
            "auto_truncate": args.auto_truncate,
            "version": "fake",
        }

    serve(
        args.hostname,
        args.port,
        {"/health": lambda: (200, ""), "/info": info, "/metrics": lambda: (200, "")},
        {"/embed": embed, "/embeddings": openai, "/v1/embeddings": openai},
    )


# -- infinity_emb --------------------------------------------------------------------------


def infinity(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="infinity_emb")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("v2")
    cmd.add_argument("--model-id", action="append", required=True)
    cmd.add_argument("--served-model-name", action="append")
    cmd.add_argument("--host", default="0.0.0.0")
    cmd.add_argument("--port", type=int, default=7997)
    cmd.add_argument("--url-prefix", default="")
    cmd.add_argument("--device", choices=["cpu", "cuda", "mps", "tensorrt", "xla", "auto"])
    cmd.add_argument("--batch-size", type=int)
    cmd.add_argument("--engine")
    cmd.add_argument("--dtype")
    cmd.add_argument("--model-warmup", action="store_true")
    cmd.add_argument("--no-model-warmup", action="store_true")
    cmd.add_argument("--trust-remote-code", action="store_true")
    cmd.add_argument("--no-trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    record("infinity_emb", argv)
    names = args.served_model_name or args.model_id
    prefix = args.url_prefix.rstrip("/")

    def models() -> tuple[int, Any]:
        data = [
            {
                "id": n,
                "object": "model",
                "owned_by": "infinity",
                "backend": "torch",
                "capabilities": ["embed"],
            }
            for n in names
        ]
        return 200, {"object": "list", "data": data}

    def embeddings(body: dict[str, Any]) -> tuple[int, Any]:
        model = body.get("model", names[0])
        if len(names) > 1 and model not in names:
            return 400, {"error": {"message": f"model {model} not found", "code": 400}}
        texts = texts_of(body.get("input"))
        data = [
            {"object": "embedding", "embedding": vector(t), "index": i} for i, t in enumerate(texts)
        ]
        tokens = sum(len(t) for t in texts)
        return 200, {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "id": "infinity-fake",
            "created": int(time.time()),
        }

    serve(
        args.host,
        args.port,
        {
            "/health": lambda: (200, {"unix": time.time()}),
            f"{prefix}/models": models,
            "/metrics": lambda: (200, ""),
        },
        {f"{prefix}/embeddings": embeddings},
    )


PROGRAMS: dict[str, Callable[[list[str]], None]] = {
    "vllm": vllm,
    "text-embeddings-router": tei,
    "infinity_emb": infinity,
}


def main() -> None:
    """Act as the program this file was installed as (its file name)."""
    program = Path(sys.argv[0]).name
    run = PROGRAMS.get(program)
    if run is None:
        sys.exit(f"fake_engines: install me as one of {', '.join(PROGRAMS)} (got {program})")
    run(sys.argv[1:])


if __name__ == "__main__":
    main()
