"""`python -m sage.services.edge`: the OpenAI-compatible gateway on SagePorts.GATEWAY_DEFAULT."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import pydantic
import uvicorn

from sage.common.config.settings import load_settings
from sage.common.exceptions import ConfigurationError
from sage.common.utils.logging import configure_logging
from sage.common.utils.tracing import configure_tracing

from .app import create_app


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the edge until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m sage.services.edge")
    parser.add_argument("--host", default=None, help="bind address (default: SAGE_HOST)")
    parser.add_argument(
        "--port", type=int, default=None, help="HTTP port (default: SAGE_GATEWAY_PORT or 8889)"
    )
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except pydantic.ValidationError as exc:
        print(f"invalid SAGE_* setting:\n{exc}", file=sys.stderr)
        return 2
    configure_logging("edge", settings.log_level, settings.log_format)
    configure_tracing("edge", settings.otel_exporter)
    try:
        app = create_app(settings)
    except ConfigurationError as exc:  # e.g. an unreadable SAGE_API_KEYS_FILE
        print(f"edge: {exc.message}", file=sys.stderr)
        return 2
    host = args.host or settings.host
    port = args.port if args.port is not None else settings.gateway_port
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:  # pragma: no cover
        loop = "asyncio"
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop=loop,
        http="httptools",
        lifespan="on",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=10,
        backlog=4096,
    )
    logging.getLogger("sage.edge").info("listening", extra={"addr": f"{host}:{port}"})
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
