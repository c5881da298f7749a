"""Metadata keys that carry SAGE context across gRPC hops."""

from __future__ import annotations

REQUEST_ID = "x-request-id"
# Trailers that carry a SageError across a hop so the far side can rebuild it exactly.
ERROR_CLASS = "sage-error"
ERROR_PARAM = "sage-error-param"
ERROR_CODE = "sage-error-code"
RETRY_AFTER = "retry-after"
# The stack's internal credential on every call between its services (see auth.py).
INTERNAL_TOKEN = "x-sage-internal-token"
