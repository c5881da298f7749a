"""The edge in front of several scheduler replicas: one Multiplex call (mux.py) per replica,
each request on a healthy one, and requests moved off a replica that dies.

Replicas come from a static list (SAGE_SCHEDULER_ADDRS, default the one SAGE_SCHEDULER_ADDR)
or, in etcd mode, from the replicas' own keys under schedulers/ (gone with their lease).
A request goes to the healthy replica with the fewest requests outstanding (round robin
among equals). When the call it was on breaks (the replica died, drained or cannot be
reached), the replica is marked down and probed with backoff until it answers again, and
the request moves within its deadline:

- non-streamed requests are sent again to another replica, whether or not the dead one
  had started them: generation has no effect but its reply, and the scheduler itself sends
  a request whose engine died to another engine the same way;
- a stream that has sent nothing yet is sent again; one already under way is continued on
  another replica from the text the client was sent (resume.py), as the scheduler continues
  a stream whose engine died; a reply that cannot be continued ends with the error.

An answer of the scheduler's own (an error it raised, a timeout) is the request's and is
never sent again. In etcd mode a replica whose key goes (lease ended) gets no new requests
and its requests under way a short grace before they move too. Management, status and
metrics calls (`any_replica`) go to one healthy replica while it lives (tokenize, rerank
and score are spread), moving on when one cannot be reached; the scheduler forwards
placement to its leader. With one replica nothing changes: a request that finds it down
fails as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Iterable
from typing import TYPE_CHECKING, Any, Final, cast

import grpc

from sage.common.config.settings import SageSettings
from sage.common.exceptions import DeadlineExceededError, SageError, ServiceUnavailableError
from sage.common.grpc import create_channel
from sage.common.grpc import metadata as md
from sage.common.grpc.status import DETAILS_KEY
from sage.rpc.scheduler.v1 import scheduler_pb2 as spb
from sage.rpc.scheduler.v1 import scheduler_pb2_grpc as spb_grpc

from .mux import SchedulerMux
from .resume import StreamContinuation

if TYPE_CHECKING:
    from sage.common.etcd import EtcdClient, PrefixMirror
    from sage.rpc.scheduler.v1.scheduler_pb2_grpc import SchedulerServiceAsyncStub

log = logging.getLogger("sage.edge.replicas")

# A replica that stopped answering is probed after MIN_BACKOFF_S, then twice as long after
# each failed probe, at most MAX_BACKOFF_S.
MIN_BACKOFF_S: Final = 0.25
MAX_BACKOFF_S: Final = 4.0
# Batches of a stream kept as they came, in case its replica dies (see _FirstLeg): a few
# hundred KiB of chunks.
RETAIN_BATCHES: Final = 1024
_STREAM_REPLY: Final = {
    "chat_stream": spb.ChatStreamResponse,
    "complete_stream": spb.CompleteStreamResponse,
}


def transport_failure(exc: grpc.RpcError) -> bool:
    """Whether a failed unary call never got an answer from the scheduler (connection
    refused or lost, server going away) rather than an error the scheduler raised, which
    carries its error details."""
    if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return False
    raw: Any = exc.trailing_metadata() or ()  # type: ignore[attr-defined]
    trailers = dict(raw)
    return DETAILS_KEY not in trailers and md.ERROR_CLASS not in trailers


class Replica:
    """One scheduler replica: its channel, stub and Multiplex call, and its health."""

    def __init__(self, addr: str, channel: grpc.aio.Channel) -> None:
        self.addr = addr
        self.channel = channel
        self.stub: SchedulerServiceAsyncStub = spb_grpc.SchedulerServiceStub(channel)
        self.mux = SchedulerMux(self.stub)
        self.outstanding = 0  # requests on it now
        self.down = False
        self.retired = False  # no longer listed: closed once its requests are done
        self.closed = False
        self.probe: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"Replica({self.addr!r}, down={self.down}, outstanding={self.outstanding})"

    async def close(self) -> None:
        """End its call and channel (once); requests still on it fail as calls lost."""
        if self.closed:
            return
        self.closed = True
        if self.probe is not None:
            self.probe.cancel()
        await self.mux.aclose()
        await self.channel.close(None)


class SchedulerReplicas:
    """The scheduler replicas the edge knows, and requests spread over them (module doc).
    `unary` and `stream` take what SchedulerMux's do."""

    def __init__(
        self,
        open_channel: Callable[[str], grpc.aio.Channel],
        *,
        min_backoff_s: float = MIN_BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
        probe_timeout_s: float = 2.0,
        retire_grace_s: float = 5.0,
    ) -> None:
        self._open_channel = open_channel
        self.retire_grace_s = retire_grace_s
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self.probe_timeout_s = probe_timeout_s
        self.replicas: list[Replica] = []
        self._next = 0  # round robin among replicas equally loaded
        self._names: dict[str, str] = {}  # etcd mode: instance -> address
        self._mirror: PrefixMirror | None = None
        self._etcd: EtcdClient | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        # Requests moved to another replica after their call broke: non-streamed, streams
        # before their first message, streams continued mid-way.
        self.failovers = {"unary": 0, "stream_start": 0, "stream": 0}

    # -- membership -----------------------------------------------------------------------

    def add(self, addr: str) -> None:
        """List replica `addr` (again: nothing changes)."""
        if any(r.addr == addr for r in self.replicas):
            return
        self.replicas.append(Replica(addr, self._open_channel(addr)))
        log.info("scheduler replica added", extra={"addr": addr})

    def remove(self, addr: str) -> None:
        """Stop sending requests to `addr`. Its requests under way get `retire_grace_s` to
        finish (a replica shutting down drains them); then its call is closed and what is
        left moves to another replica, as from a dead one: its key went because it died or
        was cut off from etcd, and a request must not wait out its deadline on it."""
        for replica in self.replicas:
            if replica.addr == addr:
                self.replicas.remove(replica)
                replica.retired = True
                log.info("scheduler replica removed", extra={"addr": addr})
                self._close_later(replica, 0.0 if replica.outstanding == 0 else self.retire_grace_s)
                return

    def _close_later(self, replica: Replica, after_s: float = 0.0) -> None:
        async def close() -> None:
            with contextlib.suppress(TimeoutError):  # the grace, cut short by our own close
                await asyncio.wait_for(self._stopping.wait(), after_s)
            await replica.close()

        task = asyncio.get_running_loop().create_task(close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _named(self, name: str, value: bytes) -> None:
        addr = value.decode(errors="replace").strip()
        old = self._names.get(name)
        self._names[name] = addr
        if old is not None and old != addr and old not in self._names.values():
            self.remove(old)
        if addr:
            self.add(addr)

    def _unnamed(self, name: str, value: bytes) -> None:
        addr = self._names.pop(name, None)
        if addr is not None and addr not in self._names.values():
            self.remove(addr)

    async def start_static(self, addrs: Iterable[str]) -> None:
        """List a fixed set of replicas."""
        for addr in addrs:
            self.add(addr)

    async def start_etcd(self, client: EtcdClient, prefix: str, wait_s: float = 5.0) -> None:
        """Follow the replicas' keys under `prefix` (values "host:port"), waiting up to
        `wait_s` for the first listing; when etcd cannot be reached yet, keep trying in the
        background (requests fail cleanly with 503 until a replica is known)."""
        from sage.common.etcd import PrefixMirror

        self._etcd = client
        mirror = PrefixMirror(client, prefix, on_put=self._named, on_delete=self._unnamed)
        self._mirror = mirror
        self._watcher = asyncio.get_running_loop().create_task(self._start_mirror())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(mirror.synced.wait(), wait_s)

    async def _start_mirror(self) -> None:
        assert self._mirror is not None
        delay = self.min_backoff_s
        while True:
            try:
                await self._mirror.start()
                return
            except (SageError, OSError, grpc.RpcError) as exc:
                log.warning("cannot list scheduler replicas in etcd yet: %s", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_backoff_s)

    async def close(self) -> None:
        """Stop following etcd; close every replica's call and channel."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self._mirror is not None:
            await self._mirror.close()
        if self._etcd is not None:
            await self._etcd.close()
        replicas, self.replicas = self.replicas, []
        for replica in replicas:
            replica.retired = True
            await replica.close()
        self._stopping.set()  # retired replicas close now, without their grace
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def states(self) -> dict[str, int]:
        """How many listed replicas are up and down."""
        down = sum(r.down for r in self.replicas)
        return {"up": len(self.replicas) - down, "down": down}

    # -- health ---------------------------------------------------------------------------

    def pick(self, tried: set[Replica]) -> Replica | None:
        """The replica for the next try: healthy before down, fewest outstanding first,
        round robin among equals; None once every replica was tried."""
        replicas = self.replicas
        count = len(replicas)
        if not count:
            return None
        start = self._next % count
        self._next = start + 1
        best: Replica | None = None
        for i in range(count):
            replica = replicas[(start + i) % count]
            if replica in tried:
                continue
            if best is None or (replica.down, replica.outstanding) < (
                best.down,
                best.outstanding,
            ):
                best = replica
        return best

    def first(self, tried: set[Replica]) -> Replica | None:
        """The first healthy replica in listing order not yet tried (else the first down
        one): status and metrics keep coming from one replica while it lives, so the
        scheduler's counters on the edge's /metrics do not jump between replicas."""
        untried = [r for r in self.replicas if r not in tried]
        return next((r for r in untried if not r.down), untried[0] if untried else None)

    def mark_down(self, replica: Replica, exc: BaseException) -> None:
        """Send no requests to `replica` (while another is up) until a probe answers."""
        if replica.down or replica.retired:
            return
        replica.down = True
        log.warning("scheduler replica down", extra={"addr": replica.addr, "error": str(exc)})
        replica.probe = asyncio.get_running_loop().create_task(self._probe(replica))

    def mark_up(self, replica: Replica) -> None:
        if replica.down:
            replica.down = False
            log.info("scheduler replica up again", extra={"addr": replica.addr})

    async def _probe(self, replica: Replica) -> None:
        delay = self.min_backoff_s
        while replica.down and not replica.retired:
            await asyncio.sleep(delay)
            if not replica.down:
                return  # a request found it answering
            if await self._answers(replica):
                self.mark_up(replica)
                return
            delay = min(delay * 2, self.max_backoff_s)

    async def _answers(self, replica: Replica) -> bool:
        """Whether `replica` is back: it answers, and (etcd mode) has listed the engines
        from etcd; until then it would refuse every request."""
        try:
            status = await replica.stub.GetStatus(
                spb.GetStatusRequest(), timeout=self.probe_timeout_s
            )
        except grpc.RpcError as exc:
            return not transport_failure(exc) and exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED
        return bool(status.synced)

    def release(self, replica: Replica) -> None:
        """One request is done with `replica`; a retired one is closed after its last."""
        replica.outstanding -= 1
        if replica.retired and replica.outstanding == 0 and not replica.closed:
            self._close_later(replica)

    # -- requests -------------------------------------------------------------------------

    @staticmethod
    def _remaining(deadline: float, timeout_s: float, last: BaseException | None) -> float:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            if last is not None:
                raise last
            raise DeadlineExceededError(f"no scheduler answered within {timeout_s:g} s")
        return remaining

    @staticmethod
    def _none_left(last: BaseException | None) -> BaseException:
        return last or ServiceUnavailableError("no scheduler replica is known yet")

    async def unary(self, kind: str, message: Any, timeout_s: float) -> Any:
        """One non-streamed request ("chat", "complete", "embed") on a healthy replica,
        sent again to another when the call it was on breaks."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        tried: set[Replica] = set()
        last: BaseException | None = None
        while (replica := self.pick(tried)) is not None:
            remaining = self._remaining(deadline, timeout_s, last)
            tried.add(replica)
            replica.outstanding += 1
            try:
                reply = await replica.mux.unary(kind, message, remaining)
            except SageError as exc:
                if not replica.mux.lost(exc):
                    raise
                self.mark_down(replica, exc)
                last = exc
                continue
            finally:
                self.release(replica)
            self.mark_up(replica)
            if last is not None:
                self.failovers["unary"] += 1
            return reply
        raise self._none_left(last)

    async def stream(
        self, kind: str, message: Any, timeout_s: float
    ) -> AsyncGenerator[list[Any], None]:
        """One streamed request ("chat_stream", "complete_stream"): its messages in lists,
        as SchedulerMux.stream gives them, across replicas (module doc)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        tried: set[Replica] = set()
        last: BaseException | None = None
        started = False  # the client was sent something
        first = _FirstLeg(kind, message)
        resume: StreamContinuation | None = None  # set once another replica continues
        request = message
        while (replica := self.pick(tried)) is not None:
            remaining = self._remaining(deadline, timeout_s, last)
            tried.add(replica)
            replica.outstanding += 1
            try:
                async with contextlib.aclosing(
                    replica.mux.stream(kind, request, remaining)
                ) as messages:
                    async for batch in messages:
                        started = True
                        if resume is None:
                            first.add(batch)
                            yield batch
                            continue
                        rewritten = _rewritten(resume, batch)
                        if rewritten:
                            yield rewritten
                self.mark_up(replica)
                return
            except SageError as exc:
                if not replica.mux.lost(exc):
                    raise
                self.mark_down(replica, exc)
                last = exc
                lost = exc
            finally:
                self.release(replica)
            if not started:
                self.failovers["stream_start"] += 1
                log.warning(
                    "scheduler replica lost a stream before it began; sending it again",
                    extra={"addr": replica.addr, "error": str(last)},
                )
                continue
            if resume is None:
                resume = first.continuation()
                if resume is None:
                    raise lost
            if resume.finished:
                return  # the client had the whole reply; only the end was lost
            if resume.exhausted:
                yield [_STREAM_REPLY[kind](data=resume.closing_chunk())]
                return
            self.failovers["stream"] += 1
            log.warning(
                "scheduler replica died mid-stream; continuing on another",
                extra={"addr": replica.addr, "resumed_tokens": resume.tokens},
            )
            request = type(message)()
            request.CopyFrom(message)
            request.body = resume.continuation()
        raise self._none_left(last)


class _FirstLeg:
    """What the first replica sent of a stream, for continuing it if that replica dies.

    Kept as it came while small and read only then, so a stream that ends normally (nearly
    all) pays nothing but a list append per batch; past RETAIN_BATCHES it is accounted as
    it goes instead, so a long reply is not held twice.
    """

    __slots__ = ("batches", "kind", "message", "resumable", "tracker")

    def __init__(self, kind: str, message: Any) -> None:
        self.kind = kind
        self.message = message
        self.batches: list[list[Any]] = []
        self.tracker: StreamContinuation | None = None
        self.resumable = True  # until the request turns out not to be continuable

    def add(self, batch: list[Any]) -> None:
        """Note one batch the client is sent."""
        if self.tracker is not None:
            _absorb(self.tracker, batch)
        elif self.resumable:
            self.batches.append(batch)
            if len(self.batches) > RETAIN_BATCHES:
                self._account()

    def _account(self) -> None:
        self.tracker = _continuation(self.kind, self.message)
        self.resumable = self.tracker is not None
        if self.tracker is not None:
            for batch in self.batches:
                _absorb(self.tracker, batch)
        self.batches = []

    def continuation(self) -> StreamContinuation | None:
        """The tracker of what the client was sent; None when the reply cannot be
        continued."""
        if self.tracker is None and self.resumable:
            self._account()
        return self.tracker


def _absorb(tracker: StreamContinuation, batch: list[Any]) -> None:
    for m in batch:
        tracker.absorb(m.data)
        for chunk in m.more:
            tracker.absorb(chunk)


def _continuation(kind: str, message: Any) -> StreamContinuation | None:
    """A tracker for a stream that may be continued elsewhere: chat and completions (not the
    Responses or Messages event streams)."""
    if kind == "chat_stream" and message.api == spb.CHAT_API_UNSPECIFIED:
        return StreamContinuation.for_request(True, message.body)
    if kind == "complete_stream":
        return StreamContinuation.for_request(False, message.body)
    return None


def _rewritten(resume: StreamContinuation, batch: list[Any]) -> list[Any]:
    """A continuation's messages with their payloads as part of the client's stream."""
    out: list[Any] = []
    for m in batch:
        payloads = [p for p in (resume.rewrite(d) for d in (m.data, *m.more)) if p is not None]
        if payloads:
            out.append(type(m)(data=payloads[0], engine_id=m.engine_id, more=payloads[1:]))
    return out


class _AnyReplica:
    """A scheduler stub whose unary calls go to a healthy replica (management, status and
    metrics: the same one while it lives; tokenize, rerank, score: spread), moving on to
    another when one cannot be reached."""

    def __init__(self, replicas: SchedulerReplicas, spread: bool) -> None:
        self._replicas = replicas
        self._spread = spread

    def __getattr__(self, rpc: str) -> Callable[..., Any]:
        replicas = self._replicas
        choose = replicas.pick if self._spread else replicas.first

        async def call(request: Any, **kwargs: Any) -> Any:
            tried: set[Replica] = set()
            last: BaseException | None = None
            while (replica := choose(tried)) is not None:
                tried.add(replica)
                replica.outstanding += 1
                try:
                    reply = await getattr(replica.stub, rpc)(request, **kwargs)
                except grpc.RpcError as exc:
                    if not transport_failure(exc):
                        raise
                    replicas.mark_down(replica, exc)
                    last = exc
                    continue
                finally:
                    replicas.release(replica)
                replicas.mark_up(replica)
                return reply
            raise replicas._none_left(last)

        return call


def any_replica(replicas: SchedulerReplicas, spread: bool = False) -> SchedulerServiceAsyncStub:
    """A stub for calls any replica may answer (see _AnyReplica); `spread`: each call on
    the least busy replica, as requests are, instead of the same one."""
    return cast("SchedulerServiceAsyncStub", _AnyReplica(replicas, spread))


def scheduler_addresses(settings: SageSettings) -> list[str]:
    """The static replica list: SAGE_SCHEDULER_ADDRS, else the one scheduler address."""
    listed = [a.strip() for a in settings.scheduler.addrs.split(",") if a.strip()]
    return list(dict.fromkeys(listed)) or [settings.address("scheduler")]


def open_replicas(settings: SageSettings) -> SchedulerReplicas:
    """Replicas over channels as the edge opens them (deadline, token, no stream
    interceptor: the edge passes deadline and metadata itself on the hot path)."""

    def channel(addr: str) -> grpc.aio.Channel:
        # gRPC waits up to 2 minutes between reconnects by default: a replica back on its
        # port would sit unused that long. Reconnect at the pace of our own probes.
        return create_channel(
            addr,
            default_timeout=settings.rpc_timeout_s,
            intercept_streams=False,
            options=(
                ("grpc.initial_reconnect_backoff_ms", int(MIN_BACKOFF_S * 1000)),
                ("grpc.min_reconnect_backoff_ms", int(MIN_BACKOFF_S * 1000)),
                ("grpc.max_reconnect_backoff_ms", int(MAX_BACKOFF_S * 1000)),
            ),
        )

    return SchedulerReplicas(channel)


async def start_replicas(replicas: SchedulerReplicas, settings: SageSettings) -> None:
    """Learn the replicas: from etcd in etcd mode, else the static list."""
    if settings.cluster.etcd_mode:
        from sage.common.etcd import cluster_keys, etcd_client

        await replicas.start_etcd(etcd_client(settings), cluster_keys(settings).schedulers)
    else:
        await replicas.start_static(scheduler_addresses(settings))
