"""`python -m sage.services.scheduler`."""

import sys

from sage.common.config.settings import SageSettings
from sage.common.grpc.runner import run_service_main

from .policies import create_policy
from .routing import create_router
from .server import build_server


def check_config(settings: SageSettings) -> None:
    """`--check-config`: the policy and routing names are known."""
    create_policy(settings.scheduler.policy)
    create_router(settings.scheduler.routing)


if __name__ == "__main__":
    sys.exit(run_service_main("scheduler", "scheduler_port", build_server, check=check_config))
