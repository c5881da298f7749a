"""vLLM's KV-cache event publisher for the simulator (`--kv-events-endpoint`).

vLLM started with `--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq",
"endpoint": ...}'` binds a ZMQ PUB socket and sends multipart messages `[topic, seq (8 bytes,
big-endian), msgpack EventBatch [ts, [event, ...]]]`, each event a map tagged by "type". The
sim sends the same for its prefix cache (prefix_cache.py), so the scheduler's kv_events
router can be run and measured against sim engines.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import msgspec
import zmq

__all__ = ["KvEventPublisher"]


class KvEventPublisher:
    """A bound PUB socket sending event batches as vLLM does; sends never block (a slow or
    absent subscriber loses events, as with vLLM)."""

    def __init__(self, endpoint: str, topic: str = "kv") -> None:
        self.endpoint = endpoint
        self._topic = topic.encode()
        self._seq = 0
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.PUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(endpoint)

    def publish(self, events: list[dict[str, Any]]) -> None:
        """Send `events` as one batch (nothing when empty)."""
        if not events:
            return
        payload = msgspec.msgpack.encode([time.time(), events])
        # At the high-water mark the batch is dropped, as vLLM's publisher does.
        with contextlib.suppress(zmq.Again):
            self._socket.send_multipart(
                [self._topic, self._seq.to_bytes(8, "big"), payload], flags=zmq.NOBLOCK
            )
        self._seq += 1

    def close(self) -> None:
        """Unbind and end the socket."""
        self._socket.close(linger=0)
        self._context.term()
