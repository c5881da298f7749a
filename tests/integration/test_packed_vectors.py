"""Embedding vectors travel as packed float32 bytes: the caller gets the engine's float32
values exactly (float and base64, through the OpenAI SDK too), and peers from before packed
vectors keep working in both directions (they send and read repeated floats)."""

from __future__ import annotations

import base64
import struct
from typing import Any

import httpx
import openai

from sage.common.config.settings import SageSettings
from sage.common.float32 import pack
from sage.common.grpc import Registration, create_channel, create_server
from sage.rpc.common.v1 import common_pb2
from sage.rpc.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from sage.rpc.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from sage.services.scheduler.server import build_server as build_scheduler

MODEL = "sim-embedding"
DIM = 24
TEXTS = ["packed vectors", "写一份日报", "a third text, somewhat longer than the others"]


async def engine_base64(base: str) -> list[str]:
    """The engine's own base64 vectors for TEXTS: the exact values every path must give."""
    async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
        reply = await http.post(
            base + "/v1/embeddings",
            json={"model": MODEL, "input": TEXTS, "encoding_format": "base64"},
        )
    assert reply.status_code == 200, reply.text
    return [d["embedding"] for d in sorted(reply.json()["data"], key=lambda d: d["index"])]


def floats_of(b64: str) -> list[float]:
    raw = base64.b64decode(b64)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


async def test_vectors_reach_the_caller_exactly_in_both_encodings(
    control_plane: Any, sim_engine: Any
) -> None:
    base = sim_engine("--embedding-dim", str(DIM), model=MODEL)
    await control_plane.register("emb-a", MODEL, base, kind="embedding")
    want = await engine_base64(base)

    async def gateway(encoding: str | None) -> list[Any]:
        body: dict[str, Any] = {"model": MODEL, "input": TEXTS}
        if encoding:
            body["encoding_format"] = encoding
        reply = await control_plane.client.post("/v1/embeddings", json=body)
        assert reply.status_code == 200, reply.text
        assert [d["index"] for d in reply.json()["data"]] == [0, 1, 2]
        return [d["embedding"] for d in reply.json()["data"]]

    assert await gateway("base64") == want  # the engine's bytes, base64 as it sent them
    floats = await gateway(None)
    assert floats == await gateway("float") == [floats_of(b) for b in want]
    assert all(len(v) == DIM for v in floats)
    # The OpenAI SDK asks for base64 by default and decodes it itself.
    async with openai.AsyncOpenAI(
        base_url=f"{control_plane.client.base_url}/v1", api_key="unused", max_retries=0
    ) as sdk:
        got = await sdk.embeddings.create(model=MODEL, input=TEXTS)
    assert [d.embedding for d in got.data] == floats


async def test_grpc_callers_without_the_flag_still_read_repeated_floats(
    control_plane: Any, sim_engine: Any
) -> None:
    """A scheduler caller from before packed vectors (or one in another language that
    never set the flag) reads `values`; one that sets it reads `packed_values`."""
    base = sim_engine("--embedding-dim", str(DIM), model=MODEL)
    await control_plane.register("emb-a", MODEL, base, kind="embedding")
    want = await engine_base64(base)
    old = await control_plane.scheduler.Embed(scheduler_pb2.EmbedRequest(model=MODEL, inputs=TEXTS))
    assert [list(e.values) for e in old.data] == [floats_of(b) for b in want]
    assert all(not e.packed_values for e in old.data)
    new = await control_plane.scheduler.Embed(
        scheduler_pb2.EmbedRequest(model=MODEL, inputs=TEXTS, packed_vectors=True)
    )
    assert [e.packed_values for e in new.data] == [base64.b64decode(b) for b in want]
    assert all(not e.values for e in new.data)


class EmbeddingServiceBeforePackedVectors(embedding_pb2_grpc.EmbeddingServiceServicer):
    """The embedding service as the release before packed vectors answers: it does not know
    `packed_vectors` and fills only the repeated float `values`. It has no EmbedStream
    either (UNIMPLEMENTED): the scheduler falls back to EmbedBatch for it; nor
    AbortEngineCalls (UNIMPLEMENTED: its batches on a lost node time out)."""

    EmbedStream = embedding_pb2_grpc.EmbeddingServiceServicer.EmbedStream  # UNIMPLEMENTED
    AbortEngineCalls = embedding_pb2_grpc.EmbeddingServiceServicer.AbortEngineCalls

    def __init__(self, vectors: list[list[float]]) -> None:
        self.vectors = vectors

    async def EmbedBatch(
        self, request: embedding_pb2.EmbedBatchRequest, context: Any
    ) -> embedding_pb2.EmbedBatchResponse:
        return embedding_pb2.EmbedBatchResponse(
            vectors=[embedding_pb2.Vector(values=v) for v in self.vectors[: len(request.inputs)]],
            usage=common_pb2.Usage(prompt_tokens=3, total_tokens=3),
            engine_ids=["emb-old"] * len(request.inputs),
        )


async def test_a_reply_with_repeated_floats_only_is_still_accepted(
    settings: SageSettings,
) -> None:
    """The scheduler reading an old embedding service's reply: callers get the same floats,
    packed or not."""
    vectors = [[1 / 3, -0.0, 1e-45, 0.1], [3.4e38, -2.5e-8, 7.0, -1.0]]
    servicer = EmbeddingServiceBeforePackedVectors(vectors)
    old, old_port = create_server(
        "127.0.0.1:0",
        [
            Registration(
                embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name,
                embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server,
                servicer,
            )
        ],
    )
    await old.start()
    scheduler, port = build_scheduler(
        settings.model_copy(update={"embedding_service_addr": f"127.0.0.1:{old_port}"}),
        "127.0.0.1:0",
    )
    await scheduler.start()
    channel = create_channel(f"127.0.0.1:{port}")
    try:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        engine = common_pb2.Engine(
            engine_id="emb-old",
            model="old-model",
            base_url="http://127.0.0.1:9",  # never called: the old service answers itself
            kind=common_pb2.ENGINE_KIND_EMBEDDING,
        )
        await stub.RegisterEngine(scheduler_pb2.RegisterEngineRequest(engine=engine))
        inputs = ["a", "b"]
        packed = await stub.Embed(
            scheduler_pb2.EmbedRequest(model="old-model", inputs=inputs, packed_vectors=True)
        )
        assert [e.packed_values for e in packed.data] == [pack(v) for v in vectors]
        floats = await stub.Embed(scheduler_pb2.EmbedRequest(model="old-model", inputs=inputs))
        want = [list(struct.unpack("<4f", struct.pack("<4f", *v))) for v in vectors]
        assert [list(e.values) for e in floats.data] == want
    finally:
        await channel.close(None)
        await scheduler.stop(1)
        await old.stop(1)
