"""API keys: the explicit argument first, then `{METHOD}_API_KEY` (and documented aliases).

This is the one place the embedding methods look at the environment for secrets; the
environment is passed in, so tests and services can hand over their own mapping.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sage.common.components.sage_embedding.protocols import ModelAvailability
from sage.common.components.sage_embedding.registry import AvailabilityCheck
from sage.common.exceptions import AuthenticationError

__all__ = ["api_key_check", "find_api_key", "resolve_api_key"]


def find_api_key(
    api_key: str | None, env_vars: Sequence[str], env: Mapping[str, str]
) -> str | None:
    """The first non-blank of `api_key` and the variables `env_vars`, or None."""
    if api_key is not None and api_key.strip():
        return api_key.strip()
    for name in env_vars:
        value = env.get(name)
        if value is not None and value.strip():
            return value.strip()
    return None


def resolve_api_key(
    method: str, api_key: str | None, env_vars: Sequence[str], env: Mapping[str, str]
) -> str:
    """The key to use; a missing key is an AuthenticationError naming the variable to set."""
    found = find_api_key(api_key, env_vars, env)
    if found is None:
        raise AuthenticationError(
            f"the {method!r} embedding method needs an API key: pass api_key=... "
            f"or set the environment variable {_names(env_vars)}",
            param="api_key",
            code="missing_api_key",
        )
    return found


def api_key_check(method: str, env_vars: Sequence[str]) -> AvailabilityCheck:
    """An availability check that only asks whether a key is configured (no network call)."""

    def check(model: str | None, env: Mapping[str, str]) -> ModelAvailability:
        target = f"{method} model {model!r}" if model else f"the {method} method"
        if find_api_key(None, env_vars, env) is None:
            return {
                "status": "needs_api_key",
                "message": f"{target} needs an API key and {_names(env_vars)} is not set",
                "action": f"export {env_vars[0]}=<your key>, or pass api_key=... to create()",
            }
        return {
            "status": "available",
            "message": f"{target} can be used: {_names(env_vars)} is set",
            "action": "",
        }

    return check


def _names(env_vars: Sequence[str]) -> str:
    if len(env_vars) == 1:
        return env_vars[0]
    return f"{env_vars[0]} (or {', '.join(env_vars[1:])})"
