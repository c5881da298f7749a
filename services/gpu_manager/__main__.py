"""`python -m sage.services.gpu_manager`."""

import functools
import sys

import pydantic

from sage.common.grpc.runner import run_service_main

from .config import GpuManagerOptions
from .server import build_server


def main() -> int:
    """Validate SAGE_GPU_* first so a bad value is a message, not a traceback."""
    try:
        options = GpuManagerOptions()
    except pydantic.ValidationError as exc:
        print(f"invalid SAGE_GPU_* setting:\n{exc}", file=sys.stderr)
        return 2
    return run_service_main(
        "gpu_manager", "gpu_manager_port", functools.partial(build_server, options=options)
    )


if __name__ == "__main__":
    sys.exit(main())
