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
        fresh = {self._name(kv.key): kv.value for kv in kvs}
        for name in sorted(set(self.items) - set(fresh)):
            old = self.items.pop(name)
            if self.on_delete is not None:
                self.on_delete(name, old)
        for name, value in fresh.items():
            if self.items.get(name) != value:
                self.items[name] = value
                if self.on_put is not None:
                    self.on_put(name, value)
        self.revision = revision
        self.synced.set()

    async def _follow(self) -> None:
        while True:
            try:
                async for batch in self.client.watch_prefix(
                    self.prefix, start_revision=self.revision + 1
                ):
                    for event in batch:
                        name = self._name(event.key)
                        if event.deleted:
                            old = self.items.pop(name, None)
                            if old is not None and self.on_delete is not None:
                                self.on_delete(name, old)
                        else:
                            self.items[name] = event.value
                            if self.on_put is not None:
                                self.on_put(name, event.value)
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
