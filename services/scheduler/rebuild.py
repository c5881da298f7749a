"""A restarted scheduler asks lifecycle for its ready engines at once, instead of routing
nothing (404 model not found) until lifecycle's periodic resync registers them again."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc

from sage.common.grpc import create_channel
from sage.rpc.common.v1 import common_pb2
from sage.rpc.lifecycle.v1 import lifecycle_pb2, lifecycle_pb2_grpc

log = logging.getLogger("sage.scheduler")

Register = Callable[[common_pb2.Engine], Awaitable[None]]


async def rebuild_from_lifecycle(
    address: str,
    register: Register,
    *,
    timeout_s: float = 5.0,
    attempts: int = 5,
    backoff_s: float = 0.5,
) -> int:
    """Register every READY engine lifecycle at `address` lists; returns how many.

    Bounded retries: lifecycle may be starting too (`sage llm serve` starts it after the
    scheduler); when it is not there, its own resync registers the engines later.
    """
    channel = create_channel(address, default_timeout=timeout_s)
    try:
        stub = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        for attempt in range(attempts):
            try:
                reply = await stub.ListEngines(lifecycle_pb2.ListEnginesRequest())
            except grpc.RpcError as err:
                if attempt == attempts - 1:
                    log.info("lifecycle not reachable; waiting for its resync: %s", err.code())
                    return 0
                await asyncio.sleep(backoff_s * 2**attempt)
                continue
            ready = [e for e in reply.engines if e.state == common_pb2.ENGINE_STATE_READY]
            for engine in ready:
                try:
                    await register(engine)
                except Exception as exc:  # one bad record must not stop the others
                    log.warning(
                        "could not re-register engine from lifecycle",
                        extra={"engine_id": engine.engine_id, "error": str(exc)},
                    )
            log.info("re-registered engines from lifecycle", extra={"count": len(ready)})
            return len(ready)
        return 0
    finally:
        await channel.close(None)
