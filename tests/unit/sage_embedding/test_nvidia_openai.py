"""`nvidia_openai`: NVIDIA's OpenAI-like POST /v1/embeddings with input_type and truncate."""

from __future__ import annotations

from sage.common.components.sage_embedding import EmbeddingFactory, NvidiaOpenAIEmbedding

from .fakes import FakeFactory, Recorded, Reply, expect, fake_vector, openai_style_reply

KEY = "nvapi-test"
ALLOWED_FIELDS = {"model", "input", "input_type", "encoding_format", "truncate", "dimensions"}


def nvidia_handler(request: Recorded) -> Reply:
    expect(request.path == "/v1/embeddings", f"path {request.path}")
    expect(request.headers.get("authorization") == f"Bearer {KEY}", "missing Bearer key")
    body = request.json()
    expect(set(body) <= ALLOWED_FIELDS, f"unknown fields {set(body) - ALLOWED_FIELDS}")
    if body.get("input_type") not in {"query", "passage"}:
        detail = "'input_type' parameter is required for asymmetric models"
        return Reply(400, {"object": "error", "message": detail, "type": "invalid_request_error"})
    expect(body.get("truncate") in {"NONE", "START", "END"}, "truncate")
    expect(body.get("encoding_format") == "float", "encoding_format")
    return openai_style_reply(body["input"], body["model"])


def test_request_and_response_format(fake_provider: FakeFactory) -> None:
    server = fake_provider(nvidia_handler)
    embedder = EmbeddingFactory.create("nvidia_openai", api_key=KEY, base_url=server.url + "/v1")
    texts = ["passage one", "passage two"]

    assert embedder.embed_batch(texts) == [fake_vector(t) for t in texts]
    assert server.failures == []
    assert server.requests[0].json() == {
        "model": "nvidia/nv-embedqa-e5-v5",
        "input": texts,
        "encoding_format": "float",
        "input_type": "passage",
        "truncate": "NONE",
    }
    assert embedder.get_dim() == 4


def test_query_side_and_nvidia_api_key_alias(fake_provider: FakeFactory) -> None:
    server = fake_provider(nvidia_handler)
    embedder = NvidiaOpenAIEmbedding(
        base_url=server.url + "/v1",
        input_type="query",
        truncate="END",
        env={"NVIDIA_API_KEY": KEY},
    )
    embedder.embed("what is a GPU?")
    body = server.requests[0].json()
    assert body["input_type"] == "query"
    assert body["truncate"] == "END"
    assert server.failures == []
