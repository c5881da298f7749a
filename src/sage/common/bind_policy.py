"""Which addresses a SAGE process may listen on (closed by default).

Loopback is always allowed. Any other address puts the process on the network, so it needs
the credential that guards it (the admin key for the edge and `sage llm serve`, the internal
token for a gRPC service) and TLS, which keeps that credential and every prompt off the wire
in clear. `--insecure` (SAGE_INSECURE=1) overrides, and the process then logs a loud warning.
The check runs before anything is bound, so a refused start leaves nothing listening.
"""

from __future__ import annotations

from typing import Literal

from sage.common.config.settings import SageSettings
from sage.common.exceptions import ConfigurationError
from sage.common.security import (
    admin_key_path,
    internal_token_path,
    is_loopback_host,
    is_wildcard_host,
    resolve_admin_key,
    resolve_internal_token,
)

__all__ = ["INSECURE_HINT", "Surface", "check_bind", "missing_for_bind"]

# "edge": the HTTP gateway (and `sage llm serve`, whose public face it is); "grpc": an
# internal service.
Surface = Literal["edge", "grpc"]

INSECURE_HINT = "pass --insecure (or set SAGE_INSECURE=1) to listen there anyway"


def missing_for_bind(settings: SageSettings, surface: Surface) -> list[str]:
    """What a non-loopback listener of `surface` lacks; empty when it has everything.

    An admin key or token file that exists but is unreadable or too open raises
    ConfigurationError naming the file: that is a broken setup, not a missing key.
    """
    missing: list[str] = []
    if surface == "edge":
        if resolve_admin_key(settings) is None:
            missing.append(
                "an admin key (SAGE_ADMIN_API_KEY, or a 0600 file named by "
                f"SAGE_ADMIN_API_KEY_FILE; default {admin_key_path(settings)})"
            )
    elif resolve_internal_token(settings) is None:
        missing.append(
            "an internal token (SAGE_INTERNAL_TOKEN, or a 0600 file named by "
            f"SAGE_INTERNAL_TOKEN_FILE; default {internal_token_path(settings)})"
        )
    if not (settings.tls.cert_file and settings.tls.key_file):
        missing.append("TLS (SAGE_TLS_CERT_FILE and SAGE_TLS_KEY_FILE)")
    return missing


def check_bind(settings: SageSettings, host: str, what: str, surface: Surface) -> str | None:
    """Refuse (ConfigurationError, exit 2) a non-loopback `host` that lacks what
    `missing_for_bind` names, unless `settings.insecure`; returns the warning `what` logs
    when the bind is allowed only because of that override, else None."""
    if is_loopback_host(host):
        return None
    missing = missing_for_bind(settings, surface)
    if not missing:
        return None
    where = f"{host or '0.0.0.0'} (every interface)" if is_wildcard_host(host) else host
    lacking = " and ".join(missing)
    if not settings.insecure:
        raise ConfigurationError(
            f"refusing to listen on {where} without {lacking}; "
            f"bind 127.0.0.1 (the default), provide them, or {INSECURE_HINT}"
        )
    return (
        f"INSECURE: {what} listens on {where} without {lacking} because --insecure / "
        "SAGE_INSECURE=1 is set: anyone who can reach this address can use it, and "
        "keys and prompts cross the network in clear text"
    )
