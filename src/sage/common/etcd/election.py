"""Leader election on etcd, the way etcd's own concurrency package does it: every candidate
writes `<prefix>/<lease id>` under its lease; the key with the lowest create revision is the
leader. A leader that dies stops refreshing its lease, etcd deletes its key after the TTL,
and the next candidate in line leads. Every candidate watches the prefix, so each knows who
leads (its value: an address) without asking.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from sage.common.exceptions import SageError

from .client import CompactedError, EtcdClient
from .lease import KeptLease

log = logging.getLogger("sage.etcd")


class Election:
    """One candidate. `is_leader` and `leader_value` follow the prefix as it changes;
    `on_change(is_leader)` is called whenever this candidate gains or loses leadership, and
    `on_leader(value)` whenever the leader (its value; "" for none) changes, as every
    candidate sees it (a follower forwards to the leader's address)."""

    def __init__(
        self,
        client: EtcdClient,
        prefix: str,
        value: str,
        *,
        lease: KeptLease,
        on_change: Callable[[bool], None] | None = None,
        on_leader: Callable[[str], None] | None = None,
    ) -> None:
        self.client = client
        self.prefix = prefix.rstrip("/") + "/"
        self.value = value
        self.lease = lease
        self.on_change = on_change
        self.on_leader = on_leader
        self.is_leader = False
        self.leader_value = ""
        self._candidates: dict[bytes, tuple[int, bytes]] = {}  # key -> (create rev, value)
        self._task: asyncio.Task[None] | None = None
        self._key = b""

    @property
    def key(self) -> bytes:
        """This candidate's key. After a lost lease the KeptLease writes it again under its
        new lease: a new create revision, so the back of the line."""
        return self._key

    async def start(self) -> None:
        """Stand (the lease must be started) and follow the prefix."""
        await self._stand()
        kvs, revision = await self.client.get_prefix(self.prefix)
        self._candidates = {kv.key: (kv.create_revision, kv.value) for kv in kvs}
        self._decide()
        self._task = asyncio.create_task(self._follow(revision + 1), name="etcd-election")

    async def _stand(self) -> None:
        self._key = (self.prefix + f"{self.lease.lease_id:x}").encode()
        await self.lease.put(self._key, self.value.encode())

    def _decide(self) -> None:
        leader = min(self._candidates.items(), key=lambda kv: kv[1][0], default=None)
        value = leader[1][1].decode() if leader else ""
        if value != self.leader_value:
            self.leader_value = value
            if self.on_leader is not None:
                self.on_leader(value)
        now = leader is not None and leader[0] == self._key
        if now != self.is_leader:
            self.is_leader = now
            verb = "gained" if now else "lost"
            log.warning("election %s: this candidate %s leadership", self.prefix, verb)
            if self.on_change is not None:
                self.on_change(now)

    async def _follow(self, start: int) -> None:
        while True:
            try:
                async for batch in self.client.watch_prefix(self.prefix, start_revision=start):
                    for event in batch:
                        if event.deleted:
                            self._candidates.pop(event.key, None)
                        else:
                            self._candidates[event.key] = (event.create_revision, event.value)
                        start = event.revision + 1
                    self._decide()
            except CompactedError:
                pass
            except (SageError, OSError) as exc:
                log.warning("election %s: watch failed (%s); listing again", self.prefix, exc)
                await asyncio.sleep(0.5)
            with contextlib.suppress(SageError, OSError):
                kvs, revision = await self.client.get_prefix(self.prefix)
                self._candidates = {kv.key: (kv.create_revision, kv.value) for kv in kvs}
                start = revision + 1
                self._decide()

    async def stop(self) -> None:
        """Stop following the prefix without touching the key: it goes with the lease (a
        crash, when the lease is left to expire)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def resign(self) -> None:
        """Step down now (a clean stop): the next candidate leads without waiting for the TTL."""
        await self.stop()
        with contextlib.suppress(Exception):
            await self.lease.delete(self._key)
        if self.is_leader:
            self.is_leader = False
            if self.on_change is not None:
                self.on_change(False)
