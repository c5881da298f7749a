"""Run an ASGI app on uvicorn the same way everywhere (engines, edge)."""

from __future__ import annotations

import importlib.util
import logging
import signal
import socket
from types import FrameType
from typing import Any

import uvicorn

log = logging.getLogger("sage.http")


class _Server(uvicorn.Server):
    """uvicorn's server, logging one line with the bound URL once it listens."""

    def __init__(self, config: uvicorn.Config, what: str, info: dict[str, Any]) -> None:
        super().__init__(config)
        self.what = what
        self.info = info

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.servers and self.servers[0].sockets:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            log.info(f"{self.what} listening", extra={"url": f"http://{host}:{port}", **self.info})


def serve_app(
    app: Any, host: str, port: int, *, what: str, info: dict[str, Any] | None = None
) -> int:
    """Serve `app` until SIGTERM/SIGINT; 0 after a clean stop, 1 if it never started."""
    server = _Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
            http="httptools",
            access_log=False,
            log_config=None,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=10,
            backlog=4096,
        ),
        what,
        info or {},
    )

    def on_term(signum: int, frame: FrameType | None) -> None:
        # uvicorn handles SIGTERM while it runs and re-raises it afterwards; this turns
        # that re-raise (or a signal before uvicorn is up) into a clean stop.
        server.should_exit = True

    signal.signal(signal.SIGTERM, on_term)
    server.run()
    return 0 if server.started else 1
