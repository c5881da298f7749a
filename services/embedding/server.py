"""gRPC transport of the embedding service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from sage.common.config.settings import SageSettings
from sage.common.exceptions import InvalidRequestError
from sage.common.float32 import unpack
from sage.common.grpc import Registration, SageServer, create_server
from sage.rpc.common.v1 import common_pb2
from sage.rpc.embedding.v1 import embedding_pb2 as pb
from sage.rpc.embedding.v1 import embedding_pb2_grpc as pb_grpc

from .batcher import BatcherConfig, EmbeddingBatcher
from .executor import EmbeddingExecutor, Endpoint
from .stream import serve_stream


class EmbeddingServicer(pb_grpc.EmbeddingServiceServicer):
    """EmbeddingService over the EmbeddingBatcher."""

    def __init__(self, batcher: EmbeddingBatcher, executor: EmbeddingExecutor) -> None:
        self.batcher = batcher
        self.executor = executor

    async def EmbedBatch(
        self, request: pb.EmbedBatchRequest, context: Any
    ) -> pb.EmbedBatchResponse:
        return await self.embed(request)

    async def EmbedStream(
        self, request_iterator: AsyncIterator[pb.EmbedStreamRequest], context: Any
    ) -> AsyncIterator[pb.EmbedStreamResponse]:
        async for message in serve_stream(request_iterator, self.embed):
            yield message

    async def AbortEngineCalls(
        self, request: pb.AbortEngineCallsRequest, context: Any
    ) -> pb.AbortEngineCallsResponse:
        base_urls = {url.rstrip("/") for url in request.base_urls}
        self.batcher.forget(base_urls)  # first: a batch cut now must not pick them again
        reason = request.reason or "the engine's node was lost"
        cut = sum(self.executor.abort(url, reason) for url in base_urls)
        return pb.AbortEngineCallsResponse(cut=cut)

    async def embed(self, request: pb.EmbedBatchRequest) -> pb.EmbedBatchResponse:
        """One EmbedBatch request, whichever call carried it."""
        if not request.model:
            raise InvalidRequestError("model is required", param="model")
        if not request.inputs:
            raise InvalidRequestError("input must not be empty", param="input")
        if request.dimensions < 0:
            raise InvalidRequestError("dimensions must be positive", param="dimensions")
        outcome = await self.batcher.embed(
            request.model,
            list(request.inputs),
            [Endpoint(e.engine_id, e.base_url, managed=e.managed) for e in request.engines],
            request.dimensions,
        )
        total = sum(outcome.tokens)
        if request.packed_vectors:
            vectors = [pb.Vector(packed_values=v) for v in outcome.vectors]
        else:  # a caller from before packed vectors reads `values`
            vectors = [pb.Vector(values=unpack(v)) for v in outcome.vectors]
        return pb.EmbedBatchResponse(
            vectors=vectors,
            usage=common_pb2.Usage(prompt_tokens=total, total_tokens=total),
            engine_ids=outcome.engine_ids,
        )


def build_server(settings: SageSettings, addr: str | None = None) -> tuple[SageServer, int]:
    """The embedding server wired from settings."""
    executor = EmbeddingExecutor(timeout_s=settings.request_timeout_s)
    batcher = EmbeddingBatcher(
        executor.send,
        BatcherConfig(max_request_tokens=settings.embedding_max_tokens_per_request),
    )
    server, port = create_server(
        addr or f"{settings.host}:{settings.embedding_service.port}",
        [
            Registration(
                pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name,
                pb_grpc.add_EmbeddingServiceServicer_to_server,
                EmbeddingServicer(batcher, executor),
            )
        ],
    )

    async def _close() -> None:
        await batcher.close()
        await executor.aclose()

    server.on_stop(_close)
    return server, port
