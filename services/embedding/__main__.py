"""`python -m sage.services.embedding`."""

import sys

from sage.common.grpc.runner import run_service_main

from .server import build_server

if __name__ == "__main__":
    sys.exit(run_service_main("embedding", "embedding_service_port", build_server))
