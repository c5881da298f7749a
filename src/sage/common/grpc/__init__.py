"""The one way every SAGE service runs and calls gRPC.

Server side: `create_server(addr, registrations)` builds an asyncio server with
`grpc.health.v1`, reflection, and one interceptor that sets the request id, opens an
OpenTelemetry span and maps `sage.common.exceptions` to gRPC status (anything unexpected
becomes INTERNAL with a log line, never a crash); the error travels as a standard
`google.rpc.Status` (`status.py`). Client side: `create_channel(addr)` adds a default
deadline and propagates the request id and trace context on every call; `from_rpc_error`
rebuilds the original `SageError` from the status and trailers. Both
sides use TLS/mTLS when SAGE_TLS_* name certificates (`tls.py`), and every call between
services carries the stack's internal token (`auth.py`), checked by the server interceptor.
"""

from __future__ import annotations

from .auth import ensure_internal_token, process_token, set_process_token
from .client import (
    call_metadata,
    create_channel,
    create_sync_channel,
    from_rpc_error,
    rpc_errors_as_sage,
    token_metadata,
)
from .server import Registration, SageServer, create_server, serve_until_signalled
from .tls import TlsConfig, process_tls, set_process_tls, tls_from_settings

__all__ = [
    "Registration",
    "SageServer",
    "TlsConfig",
    "call_metadata",
    "create_channel",
    "create_server",
    "create_sync_channel",
    "ensure_internal_token",
    "from_rpc_error",
    "process_tls",
    "process_token",
    "rpc_errors_as_sage",
    "serve_until_signalled",
    "set_process_tls",
    "set_process_token",
    "tls_from_settings",
    "token_metadata",
]
