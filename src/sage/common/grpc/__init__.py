"""The one way every SAGE service runs and calls gRPC.

Server side: `create_server(addr, registrations)` builds an asyncio server with
`grpc.health.v1`, reflection, and one interceptor that sets the request id, opens an
OpenTelemetry span and maps `sage.common.exceptions` to gRPC status (anything unexpected
becomes INTERNAL with a log line, never a crash). Client side: `create_channel(addr)` adds
a default deadline and propagates the request id and trace context on every call;
`from_rpc_error` rebuilds the original `SageError` from the status and trailers.
"""

from __future__ import annotations

from .client import create_channel, from_rpc_error, rpc_errors_as_sage
from .server import Registration, SageServer, create_server, serve_until_signalled

__all__ = [
    "Registration",
    "SageServer",
    "create_channel",
    "create_server",
    "from_rpc_error",
    "rpc_errors_as_sage",
    "serve_until_signalled",
]
