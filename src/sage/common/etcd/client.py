"""A small asyncio etcd v3 client over etcd's own gRPC API (stubs generated from a
wire-compatible subset of its protos, protos/sage/rpc/etcd/v3).

Why our own: the maintained asyncio clients pin protobuf < 5, which this project is past,
and the cluster mode needs only KV, Watch and Lease. Endpoints are tried in turn: a call
that finds its member unreachable (or without quorum) moves to the next one and is sent
again, so losing one member of three is invisible to callers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import grpc

from sage.common.exceptions import ServiceUnavailableError
from sage.rpc.etcd.v3 import etcd_pb2 as pb
from sage.rpc.etcd.v3 import etcd_pb2_grpc as pbg

log = logging.getLogger("sage.etcd")

# Codes after which the same call may go to another member: the member is gone, has no
# leader, or did not answer in time. Anything else is the caller's problem.
_RETRY_CODES: Final = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN}
)


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that makes [prefix, end) every key starting with `prefix` (etcd's
    clientv3.GetPrefixRangeEnd)."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"  # every key


def _b(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


def parse_endpoints(text: str | Sequence[str]) -> list[str]:
    """`http://h1:2379,h2:2379` (or a list) → ["h1:2379", "h2:2379"]; a scheme is dropped
    (TLS is set by the CA/cert settings, not by `https://`)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    for raw in items:
        item = raw.strip()
        for scheme in ("http://", "https://", "unix://"):
            if item.startswith(scheme):
                item = item[len(scheme) :]
        item = item.rstrip("/")
        if not item:
            continue
        if ":" not in item:
            raise ValueError(f"etcd endpoint {raw.strip()!r} needs a port (host:2379)")
        if item not in out:
            out.append(item)
    return out


@dataclass(frozen=True)
class KeyValue:
    """One key as etcd holds it."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int

    @classmethod
    def of(cls, kv: pb.KeyValue) -> KeyValue:
        """From the wire message."""
        return cls(kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.lease)


@dataclass(frozen=True)
class WatchEvent:
    """A put (value set) or a delete (value empty; also a lease expiry)."""

    key: bytes
    value: bytes
    deleted: bool
    revision: int
    create_revision: int = 0
    lease: int = 0


class CompactedError(Exception):
    """The revision a watch asked for was compacted away: list again, then watch."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted (oldest kept: {compact_revision})")
        self.compact_revision = compact_revision


@dataclass(frozen=True)
class EtcdTls:
    """PEM files for an etcd served over TLS (`--client-cert-auth` wants cert + key)."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    def credentials(self) -> grpc.ChannelCredentials | None:
        """gRPC channel credentials, or None for plain text."""
        if not (self.ca_file or self.cert_file):
            return None

        def read(path: str) -> bytes | None:
            if not path:
                return None
            with open(path, "rb") as f:
                return f.read()

        return grpc.ssl_channel_credentials(
            read(self.ca_file), read(self.key_file), read(self.cert_file)
        )


class EtcdClient:
    """KV, lease and watch calls with failover across the cluster's members.

    One channel per endpoint, opened lazily; `_current` is the member calls go to until it
    fails. Calls carry `timeout_s` as their deadline.
    """

    def __init__(
        self,
        endpoints: Sequence[str] | str,
        *,
        timeout_s: float = 5.0,
        tls: EtcdTls | None = None,
    ) -> None:
        self.endpoints = parse_endpoints(endpoints)
        if not self.endpoints:
            raise ValueError("no etcd endpoints given (SAGE_ETCD_ENDPOINTS=host:2379,...)")
        self.timeout_s = timeout_s
        self._tls = tls or EtcdTls()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._current = 0
        self._closed = False

    def _channel(self, endpoint: str) -> grpc.aio.Channel:
        channel = self._channels.get(endpoint)
        if channel is None:
            options = [
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", 5_000),
                ("grpc.keepalive_permit_without_calls", 1),
                # Fail fast to the next member instead of waiting out a reconnect backoff.
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2_000),
                # Channels to one address share a subchannel (and its backoff) across a
                # process by default: a new client after an outage inherited the old
                # refusal for up to 2 s. A pool of its own starts fresh.
                ("grpc.use_local_subchannel_pool", 1),
            ]
            creds = self._tls.credentials()
            channel = (
                grpc.aio.secure_channel(endpoint, creds, options=options)
                if creds is not None
                else grpc.aio.insecure_channel(endpoint, options=options)
            )
            self._channels[endpoint] = channel
        return channel

    @property
    def endpoint(self) -> str:
        """The member calls go to now."""
        return self.endpoints[self._current % len(self.endpoints)]

    def _rotate(self, failed: str) -> None:
        if self.endpoint == failed:
            self._current = (self._current + 1) % len(self.endpoints)

    async def _call(self, service: str, method: str, request: Any) -> Any:
        """One unary call, tried on each member in turn (from the current one)."""
        last: grpc.aio.AioRpcError | None = None
        for _ in range(len(self.endpoints)):
            endpoint = self.endpoint
            stub = _STUBS[service](self._channel(endpoint))
            try:
                return await getattr(stub, method)(request, timeout=self.timeout_s)
            except grpc.aio.AioRpcError as err:
                if err.code() not in _RETRY_CODES:
                    raise
                last = err
                log.debug("etcd %s at %s failed (%s); next member", method, endpoint, err.code())
                self._rotate(endpoint)
        detail = last.details() if last is not None else "no endpoints"
        raise ServiceUnavailableError(
            f"no etcd member answered {method} (tried {', '.join(self.endpoints)}): {detail}"
        )

    # -- KV ---------------------------------------------------------------------------

    async def get(self, key: str | bytes) -> KeyValue | None:
        """The key, or None."""
        reply = await self._call("KV", "Range", pb.RangeRequest(key=_b(key)))
        return KeyValue.of(reply.kvs[0]) if reply.kvs else None

    async def get_prefix(self, prefix: str | bytes) -> tuple[list[KeyValue], int]:
        """Every key under `prefix`, and the store revision they were read at (watch from
        revision + 1 to miss nothing)."""
        p = _b(prefix)
        reply = await self._call("KV", "Range", pb.RangeRequest(key=p, range_end=prefix_end(p)))
        return [KeyValue.of(kv) for kv in reply.kvs], reply.header.revision

    async def put(self, key: str | bytes, value: bytes, *, lease: int = 0) -> int:
        """Set the key (attached to `lease` when non-zero); the new revision."""
        reply = await self._call("KV", "Put", pb.PutRequest(key=_b(key), value=value, lease=lease))
        return int(reply.header.revision)

    async def delete(self, key: str | bytes) -> int:
        """Delete one key; how many were deleted (0 or 1)."""
        reply = await self._call("KV", "DeleteRange", pb.DeleteRangeRequest(key=_b(key)))
        return int(reply.deleted)

    async def delete_prefix(self, prefix: str | bytes) -> int:
        """Delete every key under `prefix`; how many."""
        p = _b(prefix)
        reply = await self._call(
            "KV", "DeleteRange", pb.DeleteRangeRequest(key=p, range_end=prefix_end(p))
        )
        return int(reply.deleted)

    async def _guarded(self, compare: pb.Compare, op: pb.RequestOp) -> bool:
        """Run `op` only if `compare` holds; True when it ran."""
        reply = await self._call("KV", "Txn", pb.TxnRequest(compare=[compare], success=[op]))
        return bool(reply.succeeded)

    async def create(self, key: str | bytes, value: bytes, *, lease: int = 0) -> bool:
        """Set the key only if it does not exist; True when this call created it."""
        k = _b(key)
        return await self._guarded(
            pb.Compare(key=k, target=pb.Compare.CREATE, result=pb.Compare.EQUAL, create_revision=0),
            pb.RequestOp(request_put=pb.PutRequest(key=k, value=value, lease=lease)),
        )

    async def put_if(
        self, key: str | bytes, value: bytes, *, mod_revision: int, lease: int = 0
    ) -> bool:
        """Set the key only if it was last changed at `mod_revision` (0: does not exist) —
        a compare-and-swap; True when it was set."""
        k = _b(key)
        return await self._guarded(
            pb.Compare(
                key=k, target=pb.Compare.MOD, result=pb.Compare.EQUAL, mod_revision=mod_revision
            ),
            pb.RequestOp(request_put=pb.PutRequest(key=k, value=value, lease=lease)),
        )

    async def apply(
        self, puts: Mapping[str | bytes, bytes], deletes: Iterable[str | bytes] = ()
    ) -> int:
        """Put and delete keys (no lease) in one transaction: all of them or none; the new
        revision. A key may appear once (etcd refuses duplicates); etcd caps one
        transaction at 128 operations by default (--max-txn-ops)."""
        ops = [pb.RequestOp(request_put=pb.PutRequest(key=_b(k), value=v)) for k, v in puts.items()]
        ops += [
            pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=_b(k))) for k in deletes
        ]
        reply = await self._call("KV", "Txn", pb.TxnRequest(success=ops))
        return int(reply.header.revision)

    # -- leases -----------------------------------------------------------------------

    async def grant(self, ttl_s: int) -> int:
        """A new lease of `ttl_s` seconds; its id."""
        reply = await self._call("Lease", "LeaseGrant", pb.LeaseGrantRequest(TTL=int(ttl_s)))
        if reply.error:
            raise ServiceUnavailableError(f"etcd refused a lease: {reply.error}")
        return int(reply.ID)

    async def revoke(self, lease: int) -> None:
        """End a lease now: its keys are deleted (a clean exit, not a wait for the TTL)."""
        try:
            await self._call("Lease", "LeaseRevoke", pb.LeaseRevokeRequest(ID=lease))
        except grpc.aio.AioRpcError as err:
            if err.code() is not grpc.StatusCode.NOT_FOUND:  # already expired
                raise

    async def keepalive(self, lease: int) -> int:
        """Refresh a lease once; the TTL it now has (<= 0: it has expired).

        A single request on its own stream, so a dead member or stream never leaves a
        half-open keepalive behind; the cost is one stream per refresh (every TTL/3 s).
        """
        last: grpc.aio.AioRpcError | None = None
        for _ in range(len(self.endpoints)):
            endpoint = self.endpoint
            stub = pbg.LeaseStub(self._channel(endpoint))
            # grpc.aio writes with call.write(); the stubs type the iterator as required.
            call = stub.LeaseKeepAlive(timeout=self.timeout_s)  # type: ignore[call-arg]
            try:
                await call.write(pb.LeaseKeepAliveRequest(ID=lease))
                reply = await call.read()
                await call.done_writing()
                call.cancel()
                if not isinstance(reply, pb.LeaseKeepAliveResponse):  # grpc.aio.EOF
                    raise ServiceUnavailableError("etcd ended the keepalive stream")
                return int(reply.TTL)
            except grpc.aio.AioRpcError as err:
                call.cancel()
                if err.code() not in _RETRY_CODES:
                    raise
                last = err
                self._rotate(endpoint)
        detail = last.details() if last is not None else "no endpoints"
        raise ServiceUnavailableError(f"no etcd member refreshed lease {lease:x}: {detail}")

    async def status(self, endpoint: str | None = None) -> pb.StatusResponse:
        """One member's status (leader id, raft term, db size); the current member by
        default. No failover: this asks about a member."""
        stub = pbg.MaintenanceStub(self._channel(endpoint or self.endpoint))
        return await stub.Status(pb.StatusRequest(), timeout=self.timeout_s)

    # -- watch ------------------------------------------------------------------------

    async def watch_prefix(
        self, prefix: str | bytes, *, start_revision: int
    ) -> AsyncIterator[list[WatchEvent]]:
        """Batches of events under `prefix` from `start_revision` on, across member
        failures (each reconnect resumes after the last revision seen). Raises
        CompactedError when that revision is gone: the caller lists again."""
        p = _b(prefix)
        next_rev = start_revision
        failures = 0
        while not self._closed:
            endpoint = self.endpoint
            stub = pbg.WatchStub(self._channel(endpoint))
            call = stub.Watch()  # type: ignore[call-arg]
            try:
                await call.write(
                    pb.WatchRequest(
                        create_request=pb.WatchCreateRequest(
                            key=p,
                            range_end=prefix_end(p),
                            start_revision=next_rev,
                            progress_notify=True,
                        )
                    )
                )
                async for reply in call:
                    failures = 0
                    if reply.compact_revision:
                        raise CompactedError(int(reply.compact_revision))
                    if reply.canceled:
                        raise ServiceUnavailableError(
                            f"etcd cancelled the watch on {p!r}: {reply.cancel_reason}"
                        )
                    if reply.events:
                        batch = [
                            WatchEvent(
                                key=e.kv.key,
                                value=e.kv.value,
                                deleted=e.type == pb.Event.DELETE,
                                revision=int(e.kv.mod_revision),
                                create_revision=int(e.kv.create_revision),
                                lease=int(e.kv.lease),
                            )
                            for e in reply.events
                        ]
                        next_rev = batch[-1].revision + 1
                        yield batch
                    elif reply.header.revision >= next_rev and not reply.created:
                        next_rev = int(reply.header.revision) + 1  # progress notify
                # The server ended the stream (member shutting down): resume elsewhere.
                self._rotate(endpoint)
            except grpc.aio.AioRpcError as err:
                if err.code() is grpc.StatusCode.CANCELLED and self._closed:
                    return
                failures += 1
                log.info("etcd watch on %s via %s ended (%s); resuming", p, endpoint, err.code())
                self._rotate(endpoint)
                await asyncio.sleep(min(2.0, 0.1 * failures))
            finally:
                call.cancel()

    async def close(self) -> None:
        """Close every channel (watches end)."""
        self._closed = True
        channels = list(self._channels.values())
        self._channels.clear()
        for channel in channels:
            await channel.close(grace=None)


_STUBS: Final[dict[str, Any]] = {
    "KV": pbg.KVStub,
    "Lease": pbg.LeaseStub,
    "Watch": pbg.WatchStub,
    "Maintenance": pbg.MaintenanceStub,
}
