"""A minimal ASGI toolkit for the edge and the engines this project ships.

Why not a framework: the edge is on every request's hot path and the benchmark holds it
to a ratio against a Rust router, so routing is a dict lookup and bodies are bytes.
"""

from sage.common.http.asgi import (
    App,
    Handler,
    JSONResponse,
    Observer,
    Request,
    Response,
    StreamingResponse,
    error_response,
    sse_event,
)
from sage.common.http.cors import CorsPolicy
from sage.common.http.guard import BrowserGuard

__all__ = [
    "App",
    "BrowserGuard",
    "CorsPolicy",
    "Handler",
    "JSONResponse",
    "Observer",
    "Request",
    "Response",
    "StreamingResponse",
    "error_response",
    "sse_event",
]
