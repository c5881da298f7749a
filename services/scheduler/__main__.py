"""`python -m sage.services.scheduler`."""

import sys

from sage.common.grpc.runner import run_service_main

from .server import build_server

if __name__ == "__main__":
    sys.exit(run_service_main("scheduler", "scheduler_port", build_server))
