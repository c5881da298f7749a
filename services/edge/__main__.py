"""`python -m sage.services.edge`: the OpenAI-compatible gateway on SagePorts.GATEWAY_DEFAULT."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import pydantic

from sage.common.bind_policy import check_bind
from sage.common.config.settings import load_settings
from sage.common.exceptions import ConfigurationError
from sage.common.grpc.tls import set_process_tls, tls_from_settings
from sage.common.http.limits import HttpLimits
from sage.common.http.server import serve_app
from sage.common.utils.logging import configure_logging
from sage.common.utils.tracing import configure_tracing

from .app import create_app


def build_parser() -> argparse.ArgumentParser:
    """The edge's command line (deploy files are checked against it)."""
    parser = argparse.ArgumentParser(prog="python -m sage.services.edge")
    parser.add_argument("--host", default=None, help="bind address (default: SAGE_HOST)")
    parser.add_argument(
        "--port", type=int, default=None, help="HTTP port (default: SAGE_GATEWAY_PORT or 8889)"
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="listen on a non-loopback address without an admin key and TLS (SAGE_INSECURE=1)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the edge until SIGTERM/SIGINT (HTTPS when SAGE_TLS_CERT_FILE is set)."""
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except pydantic.ValidationError as exc:
        print(f"invalid SAGE_* setting:\n{exc}", file=sys.stderr)
        return 2
    except ConfigurationError as exc:  # a SAGE_CONFIG file that is unreadable or wrong
        print(f"invalid configuration: {exc.message}", file=sys.stderr)
        return 2
    try:
        # HTTPS on the edge and TLS on its gRPC channels: one config, checked before serving.
        tls = tls_from_settings(settings)
    except ConfigurationError as exc:
        print(f"edge: cannot start: {exc.message}", file=sys.stderr)
        return 2
    if args.insecure:
        settings = settings.model_copy(update={"insecure": True})
    host = args.host or settings.host
    try:
        # Before anything is bound: a non-loopback address needs the admin key and TLS.
        bind_warning = check_bind(settings, host, "edge", surface="edge")
    except ConfigurationError as exc:
        print(f"edge: cannot start: {exc.message}", file=sys.stderr)
        return 2
    set_process_tls(tls)
    configure_logging("edge", settings.log_level, settings.log_format)
    configure_tracing("edge", settings.otel_exporter)
    if bind_warning:
        logging.getLogger("sage.edge").warning(bind_warning)
    try:
        app = create_app(settings, bind_host=host)
        limits = HttpLimits.from_settings(settings)
    except ConfigurationError as exc:  # e.g. an unreadable SAGE_API_KEYS_FILE
        print(f"edge: {exc.message}", file=sys.stderr)
        return 2
    port = args.port if args.port is not None else settings.edge.port
    # serve_app: HTTPS with the same PEM files, and SIGTERM is a clean stop (exit 0).
    return serve_app(app, host, port, what="edge", tls=tls, limits=limits)


if __name__ == "__main__":
    sys.exit(main())
