"""Per-tenant rate limits: token buckets on requests and tokens per minute.

Each request carries its caller's API key (the edge forwards the bearer key it checked);
the tenant and its limits come from the scheduler's own key table (`limits_for`), never
from the request, so a caller reaching the scheduler directly cannot bill another tenant
or lift its limits. A bucket is created the first time a tenant is seen and follows the
limits of its key. Everything runs on the event loop's thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from sage.common.apikeys import DEFAULT_TENANT, ApiKeyTable, InvalidApiKeyError, redact_key
from sage.common.exceptions import RateLimitError


@dataclass(frozen=True, slots=True)
class TenantLimits:
    """Who a request bills to and that tenant's per-minute limits (0 = none)."""

    tenant: str
    requests_per_minute: int = 0
    tokens_per_minute: int = 0

    @property
    def limited(self) -> bool:
        """True when either limit applies."""
        return self.requests_per_minute > 0 or self.tokens_per_minute > 0


def limits_for(keys: ApiKeyTable, api_key: str) -> TenantLimits:
    """The tenant and limits of `api_key` in the scheduler's table. Without configured keys
    every request is the default tenant's, unlimited; with keys, a missing or unknown key
    is refused (InvalidApiKeyError, UNAUTHENTICATED)."""
    if not keys.enabled:
        return TenantLimits(DEFAULT_TENANT)
    if not api_key:
        raise InvalidApiKeyError(
            "an API key is required: API keys are configured, and the request's "
            "options.api_key is empty",
            param="api_key",
        )
    entry = keys.get(api_key)
    if entry is None:
        raise InvalidApiKeyError(
            f"Incorrect API key provided: {redact_key(api_key)}.", param="api_key"
        )
    return TenantLimits(entry.tenant, entry.rate_limit_rpm, entry.rate_limit_tpm)


class _Bucket:
    """Holds up to `capacity` units, refilled at capacity per minute; may go into debt."""

    __slots__ = ("capacity", "level", "rate", "stamp")

    def __init__(self, capacity: float, now: float) -> None:
        self.capacity = capacity
        self.rate = capacity / 60.0
        self.level = capacity
        self.stamp = now

    def refill(self, capacity: float, now: float) -> None:
        if capacity != self.capacity:  # the key's limit changed
            self.level = min(self.level, capacity)
            self.capacity, self.rate = capacity, capacity / 60.0
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` is available (0 when it is now)."""
        missing = amount - self.level
        return 0.0 if missing <= 0 else missing / self.rate


class TenantRateLimiter:
    """Admits or refuses requests per tenant; refusals carry a Retry-After in seconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._requests: dict[str, _Bucket] = {}
        self._tokens: dict[str, _Bucket] = {}

    def _bucket(self, table: dict[str, _Bucket], tenant: str, limit: int, now: float) -> _Bucket:
        bucket = table.get(tenant)
        if bucket is None:
            bucket = table[tenant] = _Bucket(float(limit), now)
        else:
            bucket.refill(float(limit), now)
        return bucket

    def admit(self, limits: TenantLimits, tokens: int) -> None:
        """Take one request and `tokens` from the tenant's buckets, or raise RateLimitError.

        Both limits are checked before either is charged. A request costing more tokens
        than the whole per-minute budget is admitted when the bucket is full (it then
        owes the rest), so a large prompt is slowed down, never refused for ever.
        """
        now = self._clock()
        requests = tokens_bucket = None
        wait = 0.0
        reason = ""
        if limits.requests_per_minute > 0:
            requests = self._bucket(self._requests, limits.tenant, limits.requests_per_minute, now)
            wait = requests.wait_for(1.0)
            if wait:
                reason = f"requests per minute (limit {limits.requests_per_minute})"
        if limits.tokens_per_minute > 0:
            tokens_bucket = self._bucket(self._tokens, limits.tenant, limits.tokens_per_minute, now)
            token_wait = tokens_bucket.wait_for(min(float(tokens), tokens_bucket.capacity))
            if token_wait > wait:
                wait = token_wait
                reason = (
                    f"tokens per minute (limit {limits.tokens_per_minute}, this request ~{tokens})"
                )
        if wait > 0:
            raise RateLimitError(
                f"Rate limit reached for tenant {limits.tenant!r} on {reason}. "
                f"Please try again in {wait:.3g}s.",
                retry_after=wait,
            )
        if requests is not None:
            requests.level -= 1.0
        if tokens_bucket is not None:
            tokens_bucket.level -= tokens

    def settle(self, limits: TenantLimits, charged: int, used: int) -> None:
        """Correct a tokens-per-minute charge once the engine reported what was used."""
        if limits.tokens_per_minute <= 0 or used <= 0 or used == charged:
            return
        bucket = self._tokens.get(limits.tenant)
        if bucket is not None:
            bucket.level = min(bucket.capacity, bucket.level - (used - charged))
