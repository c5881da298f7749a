"""Per-engine API keys for the engines lifecycle starts.

Each such engine requires `Authorization: Bearer <key>` where the key is derived from the
stack's internal token and the engine id (`sage.common.security.engine_api_key`): lifecycle
hands it to the engine in its environment, and the scheduler and the embedding service
compute it themselves, so no key travels and a local process without the token cannot
call the engine. External engines (registered by URL) get no key of ours.
"""

from __future__ import annotations

import functools

from sage.common.grpc.auth import process_token
from sage.common.security import engine_api_key

# Backends that launch nothing: an engine registered by URL (or directly with the
# scheduler, no backend named) was not started with one of our keys.
UNMANAGED_BACKENDS = frozenset({"", "external"})


def is_managed(backend: str) -> bool:
    """True for engines lifecycle launched (they require their derived key)."""
    return backend not in UNMANAGED_BACKENDS


@functools.lru_cache(maxsize=4096)
def _derived(token: str, engine_id: str) -> str:
    return engine_api_key(token, engine_id)


def engine_key(engine_id: str, managed: bool, internal_token: str | None = None) -> str | None:
    """The key engine `engine_id` requires when `managed`, else None. The token defaults to
    the process's (sage.common.grpc.auth.process_token); keys are cached (HMAC per call
    would cost ~2 µs on the hot path)."""
    if not managed:
        return None
    return _derived(internal_token if internal_token is not None else process_token(), engine_id)


def engine_auth_headers(
    engine_id: str, managed: bool, internal_token: str | None = None
) -> dict[str, str]:
    """`{"authorization": "Bearer <key>"}` for a managed engine, else `{}`."""
    key = engine_key(engine_id, managed, internal_token)
    return {"authorization": f"Bearer {key}"} if key else {}
