"""The reservation ledger in etcd (etcd mode): one key per reservation,

    <prefix>/gpu/<node id>/reservations/<engine id, %-quoted>/<gpu index>

holding the JSON object the file store writes for that reservation, with no lease: the
records must outlive gpu_manager, and a restarted one with the same node id adopts them.

The ledger is synchronous (its calls run in worker threads) and the etcd client is asyncio,
so the store owns a small event loop on a thread of its own and waits there for each call:
the caller blocks exactly as on a file write, and nothing depends on which loop (if any)
the caller runs. A save sends only what changed, in one transaction.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
from collections.abc import Coroutine
from dataclasses import asdict
from typing import Any, TypeVar
from urllib.parse import quote

from sage.common.etcd import EtcdClient
from sage.common.exceptions import SageError, ServiceUnavailableError

from .store import Reservation, reservation_of

log = logging.getLogger("sage.gpu_manager.store")

T = TypeVar("T")

# etcd's default --max-txn-ops is 128; a change larger than this (a resync of a big ledger,
# a reconcile releasing many engines) goes in several transactions.
MAX_TXN_OPS = 128


def reservation_key(prefix: str, r: Reservation) -> bytes:
    """The key of one reservation under a node's prefix (quoting keeps one '/' per key)."""
    return f"{prefix}{quote(r.engine_id, safe='')}/{r.gpu_index}".encode()


def _value(r: Reservation) -> bytes:
    return json.dumps(asdict(r), separators=(",", ":"), sort_keys=True).encode()


class EtcdReservationStore:
    """LedgerStore over etcd keys under `prefix` (ClusterKeys.gpu_reservations(node id))."""

    def __init__(self, client: EtcdClient, prefix: str) -> None:
        if not prefix.endswith("/"):
            raise ValueError(f"reservation prefix must end with '/', got {prefix!r}")
        self.client = client
        self.prefix = prefix
        # What etcd holds as far as this process knows; keys of a write that failed are
        # `_unsure` (it may have been applied) and are written again by the next save.
        self._saved: dict[bytes, bytes] = {}
        self._unsure: set[bytes] = set()
        self._lock = threading.Lock()
        # Each etcd call may try every member in turn before giving up.
        self._wait_s = client.timeout_s * (len(client.endpoints) + 1) + 5.0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="gpu-etcd-store", daemon=True
        )
        self._thread.start()
        self._closed = False

    @property
    def where(self) -> str:
        """The key prefix and the members."""
        return f"etcd {','.join(self.client.endpoints)} {self.prefix}"

    def _run(self, call: Coroutine[Any, Any, T], what: str) -> T:
        if self._closed:
            call.close()
            raise ServiceUnavailableError(f"GPU reservation store is closed ({what})")
        future = asyncio.run_coroutine_threadsafe(call, self._loop)
        try:
            return future.result(self._wait_s)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise ServiceUnavailableError(
                f"etcd did not answer {what} in {self._wait_s:g}s ({self.where})"
            ) from exc
        except SageError:
            raise
        except Exception as exc:  # grpc errors etcd gives for a refused request
            raise ServiceUnavailableError(f"etcd failed {what} ({self.where}): {exc}") from exc

    def load(self) -> list[Reservation]:
        """Every reservation under the prefix. A record that is not one is logged and left
        where it is (for an operator to read); no member answering raises, so the service
        does not start with a ledger it could not read (it would over-commit)."""
        kvs, _ = self._run(self.client.get_prefix(self.prefix), "reading reservations")
        loaded: list[Reservation] = []
        with self._lock:
            self._saved.clear()
            self._unsure.clear()
            for kv in kvs:
                try:
                    r = reservation_of(json.loads(kv.value))
                except (ValueError, KeyError, TypeError) as exc:
                    log.error("ignoring unreadable reservation %s: %s", kv.key.decode(), exc)
                    continue
                key = reservation_key(self.prefix, r)
                if key != kv.key:
                    log.error("ignoring reservation %s: its record is for %s", kv.key.decode(), key)
                    continue
                self._saved[key] = kv.value
                loaded.append(r)
        return loaded

    def save(self, reservations: list[Reservation]) -> None:
        """Write what changed since the last save (puts and deletes in one transaction, or
        a few for a change over MAX_TXN_OPS keys); returns once etcd committed it."""
        wanted = {reservation_key(self.prefix, r): _value(r) for r in reservations}
        with self._lock:
            puts = {k: v for k, v in wanted.items() if self._saved.get(k) != v or k in self._unsure}
            deletes = [k for k in (*self._saved, *self._unsure) if k not in wanted]
            deletes = list(dict.fromkeys(deletes))
            ops: list[tuple[bytes, bytes | None]] = [*puts.items(), *((k, None) for k in deletes)]
            for start in range(0, len(ops), MAX_TXN_OPS):
                chunk = ops[start : start + MAX_TXN_OPS]
                chunk_puts: dict[str | bytes, bytes] = {k: v for k, v in chunk if v is not None}
                chunk_deletes = [k for k, v in chunk if v is None]
                try:
                    self._run(self.client.apply(chunk_puts, chunk_deletes), "saving reservations")
                except SageError:
                    # Applied or not, nobody knows: write these keys again next time.
                    for k, _ in ops[start:]:
                        self._saved.pop(k, None)
                        self._unsure.add(k)
                    raise
                for k, v in chunk:
                    self._unsure.discard(k)
                    if v is None:
                        self._saved.pop(k, None)
                    else:
                        self._saved[k] = v

    def close(self) -> None:
        """Close the client's channels and stop the store's loop."""
        if self._closed:
            return
        try:
            self._run(self.client.close(), "closing")
        except SageError as exc:
            log.warning("closing the etcd client: %s", exc)
        finally:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self._loop.close()
