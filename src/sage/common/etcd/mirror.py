"""A prefix of etcd kept in memory: listed once, then followed by a watch.

Schedulers and edges learn nodes, engines and scheduler replicas this way instead of being
told over gRPC. `on_put`/`on_delete` see every change in revision order; after a compaction
or a long outage the prefix is listed again and the differences are replayed, so a consumer
never misses a delete (a node that expired while we were away).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from sage.common.exceptions import SageError

from .client import CompactedError, EtcdClient

log = logging.getLogger("sage.etcd")


class PrefixMirror:
    """Every key under `prefix` (relative key → value), kept current."""

    def __init__(
        self,
        client: EtcdClient,
        prefix: str,
        *,
        on_put: Callable[[str, bytes], None] | None = None,
        on_delete: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.on_put = on_put
        self.on_delete = on_delete
        self.items: dict[str, bytes] = {}
        # Each key's create revision (the order keys were created in: an election's line).
        self.created: dict[str, int] = {}
        self.revision = 0  # the store revision the mirror reflects
        self.relists = 0
        self._task: asyncio.Task[None] | None = None
        self.synced = asyncio.Event()

    def _name(self, key: bytes) -> str:
        return key.decode()[len(self.prefix) :]

    async def start(self) -> None:
        """List the prefix (raises when etcd cannot be reached) and start following it."""
        await self._list()
        self._task = asyncio.create_task(self._follow(), name=f"etcd-mirror-{self.prefix}")

    async def _list(self) -> None:
        kvs, revision = await self.client.get_prefix(self.prefix)
        fresh = {self._name(kv.key): kv for kv in kvs}
        for name in sorted(set(self.items) - set(fresh)):
            self._deleted(name)
        for name, kv in fresh.items():
            # A key deleted and created again while we were away is a put even with the
            # same value: its create revision moved.
            if self.items.get(name) != kv.value or self.created.get(name) != kv.create_revision:
                self._put(name, kv.value, kv.create_revision)
        self.revision = revision
        self.synced.set()

    def _put(self, name: str, value: bytes, created: int) -> None:
        self.items[name] = value
        self.created[name] = created
        if self.on_put is not None:
            self.on_put(name, value)

    def _deleted(self, name: str) -> None:
        old = self.items.pop(name, None)
        self.created.pop(name, None)
        if old is not None and self.on_delete is not None:
            self.on_delete(name, old)

    async def _follow(self) -> None:
        while True:
            try:
                async for batch in self.client.watch_prefix(
                    self.prefix, start_revision=self.revision + 1
                ):
                    for event in batch:
                        name = self._name(event.key)
                        if event.deleted:
                            self._deleted(name)
                        else:
                            self._put(name, event.value, event.create_revision)
                        self.revision = event.revision
            except CompactedError:
                log.info("mirror %s: history compacted; listing again", self.prefix)
            except (SageError, OSError) as exc:
                log.warning("mirror %s: watch failed (%s); listing again", self.prefix, exc)
                await asyncio.sleep(0.5)
            with contextlib.suppress(SageError, OSError):
                self.relists += 1
                await self._list()

    async def close(self) -> None:
        """Stop following."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
