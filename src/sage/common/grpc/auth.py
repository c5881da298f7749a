"""The credential every gRPC call between the stack's services carries.

A per-stack token (`SAGE_INTERNAL_TOKEN`, else the 0600 file `SAGE_INTERNAL_TOKEN_FILE`,
default `$SAGE_HOME/llm/internal.token`) travels as `x-sage-internal-token` metadata. Any
local process can reach a loopback port, so a port alone proves nothing: without the token
lifecycle would start engines and the scheduler would route traffic for anyone. Servers
check it in their one interceptor (server.py); `create_channel` adds it (client.py). mTLS
does not replace it (a client certificate of the CA may belong to an HTTPS user of the edge).

Each service sets the token once at start (`set_process_token`, done by the service
runner); a process that never did (the edge, the CLI) resolves it from its settings on
first use, creating the file when none exists, so processes sharing a SAGE_HOME agree.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sage.common.config.settings import SageSettings, load_settings
from sage.common.exceptions import ConfigurationError
from sage.common.security import (
    ensure_secret_file,
    internal_token_path,
    resolve_internal_token,
)

from . import metadata as md

_process_token: str | None = None
_resolved_token: str | None = None


def ensure_internal_token(settings: SageSettings) -> str:
    """The stack's token from `settings`, creating the 0600 token file when there is none."""
    token = resolve_internal_token(settings)
    if token:
        return token
    path = internal_token_path(settings)
    try:
        return ensure_secret_file(path)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot create the internal token file {path}: {exc.strerror or exc}; set "
            "SAGE_INTERNAL_TOKEN or SAGE_INTERNAL_TOKEN_FILE",
            param="internal_token_file",
        ) from None


def set_process_token(token: str | None) -> None:
    """Fix this process's internal token (once at start); None goes back to resolving it
    from the environment on first use."""
    global _process_token, _resolved_token
    if token is not None and not token.strip():
        raise ConfigurationError("the internal token must not be empty", param="internal_token")
    _process_token = token
    _resolved_token = None


def process_token() -> str:
    """The token set at start, else the one the environment's settings name (resolved once:
    a token does not change while the stack runs)."""
    global _resolved_token
    if _process_token is not None:
        return _process_token
    if _resolved_token is None:
        _resolved_token = ensure_internal_token(load_settings())
    return _resolved_token


def token_matches(given: str | bytes | None, expected: str) -> bool:
    """Constant-time comparison, so response timing does not leak the token."""
    if given is None:
        return False
    raw = given if isinstance(given, bytes) else given.encode("utf-8", "surrogateescape")
    return hmac.compare_digest(raw, expected.encode())


def metadata_token(metadata: Iterable[Any] | None) -> str | bytes | None:
    """The `x-sage-internal-token` value among a call's invocation metadata, if any."""
    for item in metadata or ():
        if item[0] == md.INTERNAL_TOKEN:
            value: str | bytes = item[1]
            return value
    return None


@dataclass(frozen=True)
class ServerAuth:
    """What a server accepts as a caller's credential: the stack's token. mTLS does not
    replace it: the edge's HTTPS may trust client certificates of the same CA, and such a
    client must not reach the internal services."""

    token: str

    def allows(self, metadata: Iterable[Any] | None) -> bool:
        """True when the call may proceed."""
        return token_matches(metadata_token(metadata), self.token)
