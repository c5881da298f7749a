"""`python -m sage.services.<name>` entry point shared by every gRPC service."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import pydantic

from sage.common.bind_policy import check_bind
from sage.common.config.settings import SageSettings, describe_settings_error, load_settings
from sage.common.exceptions import ConfigurationError, ServiceUnavailableError
from sage.common.utils.logging import configure_logging
from sage.common.utils.tracing import configure_tracing

from .auth import ensure_internal_token, set_process_token
from .server import SageServer, serve_until_signalled
from .tls import set_process_tls, tls_from_settings


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run `main` on uvloop when installed (faster I/O), else the stdlib loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - optional speed-up
        asyncio.run(main)
        return
    uvloop.run(main)


BuildServer = Callable[[SageSettings, str], tuple[SageServer, int]]


def build_parser(service: str, default_port_attr: str) -> argparse.ArgumentParser:
    """The command line every gRPC service accepts (deploy files are checked against it)."""
    parser = argparse.ArgumentParser(prog=f"python -m sage.services.{service}")
    parser.add_argument("--host", default=None, help="bind address (default: SAGE_HOST)")
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"gRPC port (default: SAGE_{default_port_attr.upper()})",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback bind without an internal token and TLS (SAGE_INSECURE=1)",
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="check the settings this service would start with, then exit (0 ok, 2 not)",
    )
    return parser


def run_service_main(
    service: str,
    default_port_attr: str,
    build: BuildServer,
    argv: Sequence[str] | None = None,
    check: Callable[[SageSettings], None] | None = None,
) -> int:
    """Parse --host/--port, build the server from settings, serve until SIGTERM/SIGINT.

    `--check-config` only loads the settings and runs `check` (which raises
    ConfigurationError): `sage llm serve` asks that before it starts anything, without
    importing the service.

    Every call but health and reflection must carry the stack's internal token (auth.py).

    The bind address defaults to SAGE_HOST, itself 127.0.0.1: a service is reachable from
    other hosts only when configured so (and then should use SAGE_TLS_*).
    """
    parser = build_parser(service, default_port_attr)
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except pydantic.ValidationError as exc:
        print(f"invalid SAGE_* setting:\n{describe_settings_error(exc)}", file=sys.stderr)
        return 2
    except ConfigurationError as exc:  # a SAGE_CONFIG file that is unreadable or wrong
        print(f"invalid configuration: {exc.message}", file=sys.stderr)
        return 2
    if args.check_config:
        try:
            if check is not None:
                check(settings)
        except ConfigurationError as exc:
            print(f"{service}: {exc.message}", file=sys.stderr)
            return 2
        return 0
    try:
        set_process_tls(tls_from_settings(settings))
        # The token its server demands and its channels send; `sage llm serve` hands its
        # children the file, a service started alone creates it in SAGE_HOME.
        set_process_token(ensure_internal_token(settings))
    except ConfigurationError as exc:
        print(f"{service}: cannot start: {exc.message}", file=sys.stderr)
        return 2
    if args.insecure:
        settings = settings.model_copy(update={"insecure": True})
    host = args.host or settings.host
    try:
        # Before anything is bound: a non-loopback address needs the token and TLS.
        bind_warning = check_bind(settings, host, service, surface="grpc")
    except ConfigurationError as exc:
        print(f"{service}: cannot start: {exc.message}", file=sys.stderr)
        return 2
    configure_logging(service, settings.log_level, settings.log_format)
    configure_tracing(service, settings.otel_exporter)
    if bind_warning:
        logging.getLogger(f"sage.{service}").warning(bind_warning)
    port = args.port if args.port is not None else getattr(settings, default_port_attr)

    async def _main() -> None:
        server, bound = build(settings, f"{host}:{port}")
        logging.getLogger(f"sage.{service}").info("listening", extra={"addr": f"{host}:{bound}"})
        await serve_until_signalled(server)

    try:
        run_event_loop(_main())
    except KeyboardInterrupt:  # second Ctrl-C during shutdown
        return 130
    except ConfigurationError as exc:  # e.g. an unreadable SAGE_API_KEYS_FILE
        print(f"{service}: cannot start: {exc.message}", file=sys.stderr)
        return 2
    except OSError as exc:
        logging.getLogger(f"sage.{service}").error("cannot start: %s", exc)
        return 1
    except ServiceUnavailableError as exc:  # a store it needs at start (etcd) did not answer
        logging.getLogger(f"sage.{service}").error("cannot start: %s", exc.message)
        return 1
    return 0
