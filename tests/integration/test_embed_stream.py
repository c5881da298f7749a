"""EmbedStream, the scheduler's one long-lived call to the embedding service: every caller
gets what a unary EmbedBatch call gives it (its own vectors, the same errors, a deadline, a
cancel), and the call is opened again after the service restarts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from sage.common.config.settings import SageSettings
from sage.common.exceptions import DeadlineExceededError, SageError
from sage.common.grpc import SageServer, create_channel, from_rpc_error
from sage.rpc.embedding.v1 import embedding_pb2 as pb
from sage.rpc.embedding.v1 import embedding_pb2_grpc as pb_grpc
from sage.services.embedding.server import build_server as build_embedding
from sage.services.scheduler.embedding_stream import EmbedStreamClient

MODEL = "sim-embedding"
DIM = 16


def request(
    base: str, *texts: str, engine_id: str = "emb-a", **fields: Any
) -> pb.EmbedBatchRequest:
    return pb.EmbedBatchRequest(
        model=MODEL,
        inputs=list(texts),
        engines=[pb.EngineEndpoint(engine_id=engine_id, base_url=base)] if base else [],
        packed_vectors=True,
        **fields,
    )


@pytest.fixture
async def service(settings: SageSettings) -> AsyncIterator[tuple[SageServer, int]]:
    server, port = build_embedding(settings, "127.0.0.1:0")
    await server.start()
    yield server, port
    await server.stop(1)


@pytest.fixture
async def stub(service: tuple[SageServer, int]) -> AsyncIterator[pb_grpc.EmbeddingServiceAsyncStub]:
    channel = create_channel(f"127.0.0.1:{service[1]}", default_timeout=20)
    yield pb_grpc.EmbeddingServiceStub(channel)
    await channel.close(None)


async def test_concurrent_callers_each_get_what_a_unary_call_gives(
    stub: pb_grpc.EmbeddingServiceAsyncStub, sim_engine: Any
) -> None:
    base = sim_engine("--embedding-dim", str(DIM), model=MODEL)
    client = EmbedStreamClient(stub)
    requests = [request(base, f"text {i}", *([f"second {i}"] * (i % 2))) for i in range(40)]
    streamed = await asyncio.gather(*(client.embed(r, 20) for r in requests))
    assert client.supported
    for req, got in zip(requests, streamed, strict=True):
        want = await stub.EmbedBatch(req)
        assert [v.packed_values for v in got.vectors] == [v.packed_values for v in want.vectors]
        assert len(got.vectors) == len(req.inputs)
        assert all(len(v.packed_values) == 4 * DIM for v in got.vectors)
        assert got.usage == want.usage and list(got.engine_ids) == ["emb-a"] * len(req.inputs)
    await client.aclose()


async def test_errors_are_the_ones_a_unary_call_raises(
    stub: pb_grpc.EmbeddingServiceAsyncStub, sim_engine: Any
) -> None:
    base = sim_engine("--embedding-dim", str(DIM), model=MODEL)
    client = EmbedStreamClient(stub)
    bad = [
        pb.EmbedBatchRequest(model="", inputs=["x"]),  # the service's own check
        request("", "no engine"),  # no engine ready
        request(base, "x", dimensions=DIM + 1),  # the engine's 400, passed on
    ]
    for req in bad:
        with pytest.raises(SageError) as streamed:
            await client.embed(req, 20)
        with pytest.raises(grpc.RpcError) as unary:
            await stub.EmbedBatch(req)
        want = from_rpc_error(unary.value)
        assert type(streamed.value) is type(want)
        assert (streamed.value.message, streamed.value.param) == (want.message, want.param)
    ok = await client.embed(request(base, "after the errors"), 20)  # the call is still up
    assert len(ok.vectors) == 1
    await client.aclose()


async def test_deadline_and_cancel_stop_only_their_own_request(
    stub: pb_grpc.EmbeddingServiceAsyncStub, sim_engine: Any
) -> None:
    slow = sim_engine("--embedding-dim", str(DIM), "--ttft-ms", "5000", model=MODEL)
    fast = sim_engine("--embedding-dim", str(DIM), model=MODEL)
    client = EmbedStreamClient(stub)
    # The engine would answer after 5 s: only the deadline ends this one.
    with pytest.raises(DeadlineExceededError):
        await client.embed(request(slow, "too slow", engine_id="emb-slow"), 0.5)
    waiting = asyncio.create_task(
        client.embed(request(slow, "caller leaves", engine_id="emb-slow"), 20)
    )
    await asyncio.sleep(0.3)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    ok = await client.embed(request(fast, "still served", engine_id="emb-fast"), 20)
    assert len(ok.vectors) == 1 and list(ok.engine_ids) == ["emb-fast"]
    await client.aclose()


async def test_the_call_is_opened_again_after_the_service_restarts(
    settings: SageSettings, sim_engine: Any
) -> None:
    base = sim_engine("--embedding-dim", str(DIM), model=MODEL)
    server, port = build_embedding(settings, "127.0.0.1:0")
    await server.start()
    channel = create_channel(f"127.0.0.1:{port}", default_timeout=20)
    client = EmbedStreamClient(pb_grpc.EmbeddingServiceStub(channel))
    try:
        first = await client.embed(request(base, "before"), 20)
        await server.stop(1)
        with pytest.raises(SageError):
            await client.embed(request(base, "while it is down"), 2)
        server, _ = build_embedding(settings, f"127.0.0.1:{port}")
        await server.start()
        again: pb.EmbedBatchResponse | None = None
        for _ in range(50):  # the channel reconnects with backoff
            try:
                again = await client.embed(request(base, "before"), 5)
                break
            except SageError:
                await asyncio.sleep(0.2)
        assert again is not None and again.vectors == first.vectors
    finally:
        await client.aclose()
        await channel.close(None)
        await server.stop(1)
