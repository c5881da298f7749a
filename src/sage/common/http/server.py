"""Run an ASGI app on uvicorn the same way everywhere (engines, edge), with the header
timeout, header size and count limits and connection limit of `limits.py`."""

from __future__ import annotations

import importlib.util
import logging
import signal
import socket
from types import FrameType
from typing import Any

import uvicorn

from sage.common.grpc.tls import TlsConfig

from .limits import HttpLimits, protocol_class

log = logging.getLogger("sage.http")


class _Server(uvicorn.Server):
    """uvicorn's server, logging one line with the bound URL once it listens."""

    def __init__(
        self, config: uvicorn.Config, what: str, info: dict[str, Any], scheme: str = "http"
    ) -> None:
        super().__init__(config)
        self.what = what
        self.info = info
        self.scheme = scheme

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.servers and self.servers[0].sockets:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            log.info(
                f"{self.what} listening",
                extra={"url": f"{self.scheme}://{host}:{port}", **self.info},
            )


def serve_app(
    app: Any,
    host: str,
    port: int,
    *,
    what: str,
    info: dict[str, Any] | None = None,
    tls: TlsConfig | None = None,
    limits: HttpLimits | None = None,
) -> int:
    """Serve `app` until SIGTERM/SIGINT; 0 after a clean stop, 1 if it never started.

    With a `tls` that has a certificate it serves HTTPS (demanding client certs with
    client_auth), from the same PEM files the gRPC services use. `limits` default to
    HttpLimits() (SageSettings' defaults); pass HttpLimits.from_settings(settings).
    """
    tls_kwargs: dict[str, Any] = tls.uvicorn_kwargs() if tls else {}
    server = _Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
            http=protocol_class(limits or HttpLimits()),
            access_log=False,
            log_config=None,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=10,
            backlog=4096,
            **tls_kwargs,
        ),
        what,
        info or {},
        tls.http_scheme if tls else "http",
    )

    def on_term(signum: int, frame: FrameType | None) -> None:
        # uvicorn handles SIGTERM while it runs and re-raises it afterwards; this turns
        # that re-raise (or a signal before uvicorn is up) into a clean stop.
        server.should_exit = True

    signal.signal(signal.SIGTERM, on_term)
    server.run()
    return 0 if server.started else 1
