"""`python -m sage.common.grpc.healthcheck grpc|http HOST:PORT`: exit 0 when healthy.

The probe container health checks, systemd `ExecStartPost` and scripts use: it speaks
grpc.health.v1 to a gRPC service, or GETs /health on the edge, with the same TLS settings
(SAGE_TLS_*) the services use, so a TLS deployment is probed over TLS.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sage.common.exceptions import ConfigurationError

from .client import create_sync_channel
from .tls import TlsConfig, process_tls


def build_parser() -> argparse.ArgumentParser:
    """`grpc|http HOST:PORT` plus the health service name / HTTP path and a timeout."""
    parser = argparse.ArgumentParser(prog="python -m sage.common.grpc.healthcheck")
    parser.add_argument("protocol", choices=("grpc", "http"))
    parser.add_argument("addr", help="host:port to probe")
    parser.add_argument("--service", default="", help="grpc.health.v1 service name ('' = all)")
    parser.add_argument("--path", default="/health", help="HTTP path (http only)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    return parser


def probe_grpc(addr: str, service: str, timeout: float, tls: TlsConfig) -> str:
    """'' when SERVING, else what is wrong."""
    # Health is open to probes: no token needed (nor a SAGE_HOME to find one in).
    with create_sync_channel(addr, tls=tls, internal_token="") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as err:
            return f"{err.code().name}: {err.details()}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    return ""


def probe_http(addr: str, path: str, timeout: float, tls: TlsConfig) -> str:
    """'' when GET path answers 200, else what is wrong."""
    url = f"{tls.http_scheme}://{addr}{path}"
    try:
        resp = httpx.get(url, timeout=timeout, trust_env=False, verify=tls.httpx_verify())
    except httpx.HTTPError as exc:
        return f"{url}: {exc!r}"
    return "" if resp.status_code == 200 else f"{url}: HTTP {resp.status_code} {resp.text[:200]}"


def main(argv: Sequence[str] | None = None) -> int:
    """0 healthy, 1 unhealthy (reason on stderr), 2 bad configuration."""
    args = build_parser().parse_args(argv)
    try:
        tls = process_tls()
    except ConfigurationError as exc:
        print(f"healthcheck: {exc.message}", file=sys.stderr)
        return 2
    if args.protocol == "grpc":
        problem = probe_grpc(args.addr, args.service, args.timeout, tls)
    else:
        problem = probe_http(args.addr, args.path, args.timeout, tls)
    if problem:
        print(f"unhealthy: {args.addr}: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
