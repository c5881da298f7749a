"""gRPC clients the scheduler calls: the embedding service's batcher and lifecycle (for
the autoscaler's replica starts and stops, and LoRA adapters loaded on demand)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import grpc

from sage.common.engine_keys import is_managed
from sage.common.exceptions import NotFoundError, ServiceUnavailableError
from sage.common.float32 import packed_or_pack
from sage.common.grpc import create_channel, rpc_errors_as_sage
from sage.rpc.common.v1 import common_pb2
from sage.rpc.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from sage.rpc.lifecycle.v1 import lifecycle_pb2, lifecycle_pb2_grpc

from .convert import record_from_pb
from .core import EmbedResult, TokenUsage
from .embedding_stream import EmbedStreamClient
from .nodes import Node, NodeState
from .registry import AdapterEntry, EngineRecord

if TYPE_CHECKING:
    from sage.rpc.lifecycle.v1.lifecycle_pb2_grpc import LifecycleServiceAsyncStub

log = logging.getLogger("sage.scheduler.autoscaler")


class GrpcEmbeddingBackend:
    """EmbeddingBackend that sends EmbedBatch requests to the embedding service, over one
    EmbedStream call (embedding_stream.py)."""

    def __init__(
        self, channel: grpc.aio.Channel, timeout_s: float, rpc_timeout_s: float = 10.0
    ) -> None:
        self._stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        self._stream = EmbedStreamClient(self._stub)
        self._timeout_s = timeout_s
        self._rpc_timeout_s = rpc_timeout_s

    async def embed_batch(
        self, model: str, inputs: Sequence[str], engines: Sequence[EngineRecord], dimensions: int
    ) -> EmbedResult:
        """One EmbedBatch call; errors come back as the SageError the service raised."""
        request = embedding_pb2.EmbedBatchRequest(
            model=model,
            inputs=list(inputs),
            engines=[
                embedding_pb2.EngineEndpoint(
                    engine_id=e.engine_id, base_url=e.base_url, managed=is_managed(e.backend)
                )
                for e in engines
            ],
            dimensions=dimensions,
            packed_vectors=True,
        )
        reply = await self._stream.embed(request, self._timeout_s)
        usage = reply.usage
        return EmbedResult(
            # An embedding service from before packed vectors fills only `values`.
            vectors=[packed_or_pack(v.packed_values, v.values) for v in reply.vectors],
            usage=TokenUsage(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens),
            engine_ids=list(reply.engine_ids),
        )

    async def abort_engines(self, engines: Sequence[EngineRecord], reason: str) -> int:
        """AbortEngineCalls: the service cuts its batches under way to `engines`."""
        request = embedding_pb2.AbortEngineCallsRequest(
            base_urls=[e.base_url for e in engines], reason=reason
        )
        with rpc_errors_as_sage():
            reply = await self._stub.AbortEngineCalls(request, timeout=self._rpc_timeout_s)
        return int(reply.cut)


class _LifecycleStubs:
    """One lifecycle stub per address (node agents' lifecycles), its channel kept open until
    aclose()."""

    def __init__(self, rpc_timeout_s: float) -> None:
        self._rpc_timeout_s = rpc_timeout_s
        self._stubs: dict[str, LifecycleServiceAsyncStub] = {}
        self._channels: list[grpc.aio.Channel] = []

    def at(self, addr: str) -> LifecycleServiceAsyncStub:
        stub = self._stubs.get(addr)
        if stub is None:
            channel = create_channel(addr, default_timeout=self._rpc_timeout_s)
            self._channels.append(channel)
            stub = self._stubs[addr] = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        return stub  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        for channel in self._channels:
            await channel.close(None)


class LifecycleScalerActions:
    """ScalerActions over lifecycle gRPC: StartEngine like an existing replica, drained stop.

    With `nodes` (etcd mode, where the scheduler's host may run no lifecycle at all) the
    lifecycles are the node agents' own: a replica starts on a node that runs a ready one
    to copy (lifecycle copies only its own engines), and a stop goes to the engine's node.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        rpc_timeout_s: float,
        start_timeout_s: float,
        *,
        nodes: Callable[[], list[Node]] | None = None,
        node_of: Callable[[str], str] | None = None,
    ):
        self._stub = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        self._rpc_timeout_s = rpc_timeout_s
        self._start_timeout_s = start_timeout_s
        self._nodes = nodes
        self._node_of = node_of
        self._agents = _LifecycleStubs(rpc_timeout_s)

    def _lifecycles(self) -> list[tuple[str, LifecycleServiceAsyncStub]]:
        """(where, stub) of each lifecycle to look in: the live nodes' (ready ones first),
        or this stack's own when there are no nodes to go by."""
        if self._nodes is None:
            return [("lifecycle", self._stub)]
        live = [n for n in self._nodes() if n.state is not NodeState.DOWN]
        live.sort(key=lambda n: (n.state is not NodeState.READY, n.node_id))
        if not live:
            return [("lifecycle", self._stub)]
        return [(f"node {n.node_id}", self._agents.at(n.report.lifecycle_addr)) for n in live]

    async def start_replica(self, model: str) -> None:
        """Start an engine with the model/kind/backend/role of a ready one of `model`."""
        for where, stub in self._lifecycles():
            try:
                with rpc_errors_as_sage():
                    listed = await stub.ListEngines(
                        lifecycle_pb2.ListEnginesRequest(), timeout=self._rpc_timeout_s
                    )
            except ServiceUnavailableError:
                if self._nodes is None:
                    raise
                continue  # that node's agent is gone; another may run a template
            template = next(
                (
                    e
                    for e in listed.engines
                    if e.model == model and e.state == common_pb2.ENGINE_STATE_READY
                ),
                None,
            )
            if template is None:
                continue
            # Lifecycle copies the template's whole spec (extra args, parallelism, memory).
            request = lifecycle_pb2.StartEngineRequest(like_engine_id=template.engine_id)
            with rpc_errors_as_sage():
                await stub.StartEngine(request, timeout=self._start_timeout_s)
            log.info("autoscaler started a replica of %s on %s", model, where)
            return
        raise NotFoundError(f"lifecycle runs no ready engine of {model!r} to copy", param="model")

    async def stop_replica(self, engine_id: str) -> None:
        """Drain then stop `engine_id` (lifecycle deregisters it from us first), on its
        node's lifecycle when the node is known."""
        stub: LifecycleServiceAsyncStub = self._stub
        node_id = self._node_of(engine_id) if self._node_of is not None else ""
        if node_id and self._nodes is not None:
            addr = next(
                (n.report.lifecycle_addr for n in self._nodes() if n.node_id == node_id), ""
            )
            if addr:
                stub = self._agents.at(addr)
        with rpc_errors_as_sage():
            await stub.StopEngine(
                lifecycle_pb2.StopEngineRequest(engine_id=engine_id, drain=True),
                timeout=self._start_timeout_s,
            )

    async def aclose(self) -> None:
        """Close the channels opened to node agents."""
        await self._agents.aclose()


# Longer than lifecycle's own bound on a load (lifecycle/adapters.py LOAD_TIMEOUT_S).
ADAPTER_RPC_TIMEOUT_S = 150.0


class LifecycleAdapterLoader:
    """AdapterLoader over lifecycle gRPC: LoadAdapter on the lifecycle of the engine's node
    (from the node table), else on this stack's own lifecycle."""

    def __init__(
        self, nodes: Callable[[], list[Node]], default_addr: str, rpc_timeout_s: float
    ) -> None:
        self._nodes = nodes
        self._default_addr = default_addr
        self._lifecycles = _LifecycleStubs(rpc_timeout_s)

    def _stub(self, node_id: str) -> LifecycleServiceAsyncStub:
        addr = next(
            (n.report.lifecycle_addr for n in self._nodes() if node_id and n.node_id == node_id),
            self._default_addr,
        )
        return self._lifecycles.at(addr)

    async def __call__(self, engine: EngineRecord, adapter: AdapterEntry) -> EngineRecord:
        """Load `adapter` on `engine`; the engine as lifecycle registered it after."""
        request = lifecycle_pb2.LoadAdapterRequest(
            engine_id=engine.engine_id,
            adapter=common_pb2.LoraAdapter(name=adapter.name, path=adapter.path),
        )
        with rpc_errors_as_sage():
            # Lifecycle bounds the engine call itself; the caller bounds its own wait.
            reply = await self._stub(engine.node_id).LoadAdapter(
                request, timeout=ADAPTER_RPC_TIMEOUT_S
            )
        return record_from_pb(reply.engine)

    async def aclose(self) -> None:
        """Close the channels opened."""
        await self._lifecycles.aclose()
