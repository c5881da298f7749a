"""A lease kept alive for as long as its process lives, with the keys that belong to it.

A node agent's keys (its node report, its engines) hang off one lease: when the agent dies
the lease stops being refreshed and etcd deletes them after the TTL, which is what takes a
dead node's engines out of routing. When the lease is lost while the process lives (a
partition longer than the TTL), a new one is granted and every key is written again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from .client import EtcdClient

log = logging.getLogger("sage.etcd")


class KeptLease:
    """Grant, refresh every ttl/3, and re-grant + re-put after a loss."""

    def __init__(self, client: EtcdClient, ttl_s: int, *, name: str = "") -> None:
        if ttl_s < 2:
            raise ValueError(f"a lease TTL below 2 s cannot be kept alive reliably ({ttl_s})")
        self.client = client
        self.ttl_s = int(ttl_s)
        self.name = name
        self.lease_id = 0
        self._keys: dict[bytes, bytes] = {}
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.regrants = 0  # how many times the lease was lost and granted again
        # When the last grant or refresh that etcd confirmed was sent: the lease lives at
        # least until then + ttl_s (see `held`).
        self.refreshed_at = 0.0

    def held(self) -> bool:
        """True while the lease is surely alive: confirmed less than ttl_s ago. A process
        cut off from etcd stops believing it holds the lease (and what hangs off it, such as
        leadership) by the time etcd expires it for everyone else."""
        return self.lease_id != 0 and time.monotonic() - self.refreshed_at < self.ttl_s

    async def start(self) -> None:
        """Grant the lease (raises when no member answers) and start refreshing it."""
        sent = time.monotonic()
        self.lease_id = await self.client.grant(self.ttl_s)
        self.refreshed_at = sent
        self._task = asyncio.create_task(self._refresh(), name=f"etcd-lease-{self.name}")

    async def put(self, key: str | bytes, value: bytes) -> None:
        """Write a key under this lease, and remember it to write again after a re-grant."""
        k = key.encode() if isinstance(key, str) else key
        async with self._lock:
            self._keys[k] = value
            await self.client.put(k, value, lease=self.lease_id)

    async def delete(self, key: str | bytes) -> None:
        """Delete a key of this lease (and forget it)."""
        k = key.encode() if isinstance(key, str) else key
        async with self._lock:
            self._keys.pop(k, None)
            await self.client.delete(k)

    async def _refresh(self) -> None:
        interval = max(0.5, self.ttl_s / 3)
        while True:
            await asyncio.sleep(interval)
            sent = time.monotonic()
            try:
                ttl = await self.client.keepalive(self.lease_id)
            except Exception as exc:  # etcd unreachable, or a grpc error it did not retry
                log.warning("lease %s (%x): refresh failed: %r", self.name, self.lease_id, exc)
                continue
            if ttl > 0:
                self.refreshed_at = sent
                continue
            try:
                await self._regrant()
            except Exception as exc:
                log.warning("lease %s: re-grant failed (%s); retrying", self.name, exc)

    async def _regrant(self) -> None:
        async with self._lock:
            old = self.lease_id
            sent = time.monotonic()
            self.lease_id = await self.client.grant(self.ttl_s)
            self.refreshed_at = sent
            self.regrants += 1
            log.warning(
                "lease %s (%x) expired; granted %x and wrote %d keys again",
                self.name,
                old,
                self.lease_id,
                len(self._keys),
            )
            for key, value in self._keys.items():
                await self.client.put(key, value, lease=self.lease_id)

    async def close(self, *, revoke: bool = True) -> None:
        """Stop refreshing; revoke (delete the keys now) unless the keys should expire on
        their own (a crash is simulated by revoke=False)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if revoke and self.lease_id:
            with contextlib.suppress(Exception):
                await self.client.revoke(self.lease_id)
