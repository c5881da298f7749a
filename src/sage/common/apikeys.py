"""Tenant API keys: where they come from and how a key is looked up.

Keys come from `SAGE_API_KEYS` (`key` or `key:tenant`, comma-separated) and/or the file
named by `SAGE_API_KEYS_FILE` (YAML or JSON: a list of {key, tenant, rate_limit_rpm?,
rate_limit_tpm?}). The edge checks the caller's bearer key against this table and forwards
the key; the scheduler loads the same table and resolves the tenant and its limits from
the key itself, so a direct gRPC caller cannot name another tenant or lift its limits.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pydantic
import yaml

from sage.common.exceptions import AuthenticationError, ConfigurationError

DEFAULT_TENANT = "default"


class InvalidApiKeyError(AuthenticationError):
    """Missing or unknown API key, in OpenAI's shape (401, invalid_request_error)."""

    openai_type = "invalid_request_error"
    default_code = "invalid_api_key"


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One accepted key, the tenant it bills to, and that tenant's per-minute limits."""

    key: str
    tenant: str = DEFAULT_TENANT
    rate_limit_rpm: int = 0
    rate_limit_tpm: int = 0


class _KeyEntry(pydantic.BaseModel):
    """One entry of the keys file."""

    model_config = pydantic.ConfigDict(extra="forbid")

    key: str = pydantic.Field(min_length=1)
    tenant: str = pydantic.Field(default=DEFAULT_TENANT, min_length=1)
    rate_limit_rpm: int = pydantic.Field(default=0, ge=0, le=2**31 - 1)
    rate_limit_tpm: int = pydantic.Field(default=0, ge=0, le=2**31 - 1)


def parse_api_keys(spec: str) -> list[ApiKey]:
    """`k1,k2:tenant-b` → keys; a key without a tenant bills to the default tenant."""
    keys = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        key, _, tenant = item.partition(":")
        if not key.strip():
            raise ConfigurationError(
                f"SAGE_API_KEYS has an empty key in {item!r}", param="api_keys"
            )
        keys.append(ApiKey(key.strip(), tenant.strip() or DEFAULT_TENANT))
    return keys


def load_api_keys_file(path: Path) -> list[ApiKey]:
    """Keys from a YAML or JSON file; errors name the file and the bad entry."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read SAGE_API_KEYS_FILE {path}: {exc}", param="api_keys_file"
        ) from None
    try:
        doc: Any = orjson.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (orjson.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigurationError(
            f"{path} is not valid YAML/JSON: {exc}", param="api_keys_file"
        ) from None
    if isinstance(doc, dict) and "keys" in doc:
        doc = doc["keys"]
    if doc is None:
        return []
    if not isinstance(doc, list):
        raise ConfigurationError(
            f"{path} must hold a list of {{key, tenant, rate_limit_rpm, rate_limit_tpm}}",
            param="api_keys_file",
        )
    keys = []
    for i, raw in enumerate(doc):
        try:
            entry = _KeyEntry.model_validate(raw)
        except pydantic.ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'entry'}: {e['msg']}" for e in exc.errors()
            )
            raise ConfigurationError(
                f"{path} entry {i}: {problems}", param="api_keys_file"
            ) from None
        keys.append(ApiKey(entry.key, entry.tenant, entry.rate_limit_rpm, entry.rate_limit_tpm))
    return keys


def redact_key(token: str) -> str:
    """A key shortened for messages and logs (never the whole key)."""
    if len(token) <= 8:
        return "***"
    return f"{token[:3]}***{token[-4:]}"


class ApiKeyTable:
    """The accepted keys; empty means authentication is off."""

    def __init__(self, keys: Iterable[ApiKey] = ()) -> None:
        self._by_token: dict[str, ApiKey] = {}
        for key in keys:
            known = self._by_token.get(key.key)
            if known is not None and known != key:
                raise ConfigurationError(
                    f"API key {redact_key(key.key)} is configured twice with different settings",
                    param="api_keys",
                )
            self._by_token[key.key] = key

    def __len__(self) -> int:
        return len(self._by_token)

    @property
    def enabled(self) -> bool:
        """True when at least one key is configured."""
        return bool(self._by_token)

    def get(self, token: str) -> ApiKey | None:
        """The entry for the bare key `token`, or None when it is not configured."""
        return self._by_token.get(token)

    def lookup(self, headers: Mapping[str, str]) -> ApiKey | None:
        """The key in the `Authorization: Bearer` header, or None when absent or unknown."""
        token = bearer_token(headers.get("authorization"))
        return None if token is None else self._by_token.get(token)

    def authenticate(self, headers: Mapping[str, str]) -> ApiKey | None:
        """The caller's key; None when authentication is off; 401 when missing or wrong."""
        if not self._by_token:
            return None
        token = bearer_token(headers.get("authorization"))
        if token is None:
            raise InvalidApiKeyError(
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
        key = self._by_token.get(token)
        if key is None:
            raise InvalidApiKeyError(f"Incorrect API key provided: {redact_key(token)}.")
        return key


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value (the scheme in any case), else
    None: the one parser of the header for the edge's keys, the admin key and our engines."""
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def load_key_table(api_keys: str, api_keys_file: Path | None) -> ApiKeyTable:
    """The table from the two settings (both may be used at once)."""
    keys = parse_api_keys(api_keys)
    if api_keys_file is not None:
        keys.extend(load_api_keys_file(api_keys_file))
    return ApiKeyTable(keys)
