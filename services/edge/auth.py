"""Bearer API keys for the edge's /v1 routes.

The table lives in `sage.common.apikeys` so the scheduler loads the same keys and resolves
tenants and limits itself; this module re-exports it for the edge and its callers.
"""

from __future__ import annotations

from sage.common.apikeys import (
    DEFAULT_TENANT,
    ApiKey,
    ApiKeyTable,
    InvalidApiKeyError,
    load_api_keys_file,
    load_key_table,
    parse_api_keys,
)

__all__ = [
    "DEFAULT_TENANT",
    "ApiKey",
    "ApiKeyTable",
    "InvalidApiKeyError",
    "load_api_keys_file",
    "load_key_table",
    "parse_api_keys",
]
