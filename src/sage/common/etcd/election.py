"""Leader election on etcd, the way etcd's own concurrency package does it: every candidate
writes `<prefix>/<lease id>` under its lease; the key with the lowest create revision is the
leader. A leader that dies stops refreshing its lease, etcd deletes its key after the TTL,
and the next candidate in line leads. Every candidate watches the prefix, so each knows who
leads (its value: an address) without asking.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

from .client import EtcdClient
from .lease import KeptLease
from .mirror import PrefixMirror

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
        # The candidates, followed as any prefix is (a watch that lists again after a
        # compaction or an outage); every change decides the leader again.
        self._line = PrefixMirror(
            client, self.prefix, on_put=self._changed, on_delete=self._changed
        )
        self._name = ""

    @property
    def key(self) -> bytes:
        """This candidate's key. After a lost lease the KeptLease writes it again under its
        new lease: a new create revision, so the back of the line."""
        return (self.prefix + self._name).encode() if self._name else b""

    async def start(self) -> None:
        """Stand (the lease must be started) and follow the prefix."""
        self._name = f"{self.lease.lease_id:x}"
        await self.lease.put(self.key, self.value.encode())
        await self._line.start()
        self._decide()

    def _changed(self, _name: str, _value: bytes) -> None:
        # Not while the first listing lands key by key: a half-listed line would elect
        # whoever came first.
        if self._line.synced.is_set():
            self._decide()

    def _decide(self) -> None:
        created = self._line.created
        leader = min(created, key=created.__getitem__, default=None)
        value = self._line.items[leader].decode() if leader is not None else ""
        if value != self.leader_value:
            self.leader_value = value
            if self.on_leader is not None:
                self.on_leader(value)
        now = leader is not None and leader == self._name
        if now != self.is_leader:
            self.is_leader = now
            verb = "gained" if now else "lost"
            log.warning("election %s: this candidate %s leadership", self.prefix, verb)
            if self.on_change is not None:
                self.on_change(now)

    async def stop(self) -> None:
        """Stop following the prefix without touching the key: it goes with the lease (a
        crash, when the lease is left to expire)."""
        await self._line.close()

    async def resign(self) -> None:
        """Step down now (a clean stop): the next candidate leads without waiting for the TTL."""
        await self.stop()
        with contextlib.suppress(Exception):
            await self.lease.delete(self.key)
        if self.is_leader:
            self.is_leader = False
            if self.on_change is not None:
                self.on_change(False)
