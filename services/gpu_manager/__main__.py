"""`python -m sage.services.gpu_manager`."""

import sys

from sage.common.grpc.runner import run_service_main

from .server import build_server

if __name__ == "__main__":
    # A bad SAGE_GPU_* value fails loading the settings: a message naming it, exit 2.
    sys.exit(run_service_main("gpu_manager", "gpu_manager_port", build_server))
