"""`jina`: POST https://api.jina.ai/v1/embeddings with Jina's own options."""

from __future__ import annotations

from sage.common.components.sage_embedding import EmbeddingFactory, JinaEmbedding

from .fakes import FakeFactory, Recorded, Reply, expect, fake_vector, openai_style_reply

KEY = "jina_test_key"
ALLOWED_FIELDS = {
    "model",
    "input",
    "embedding_type",
    "task",
    "dimensions",
    "normalized",
    "late_chunking",
}


def jina_handler(request: Recorded) -> Reply:
    expect(request.path == "/v1/embeddings", f"path {request.path}")
    expect(request.headers.get("authorization") == f"Bearer {KEY}", "missing Bearer key")
    body = request.json()
    expect(set(body) <= ALLOWED_FIELDS, f"unknown fields {set(body) - ALLOWED_FIELDS}")
    expect(body.get("embedding_type") == "float", "embedding_type must be float")
    texts = body["input"]
    expect(isinstance(texts, list), "input must be a list")
    reply = openai_style_reply(texts, body["model"])
    reply.body["usage"] = {"total_tokens": len(texts)}  # Jina reports only total_tokens
    return reply


def test_request_and_response_format(fake_provider: FakeFactory) -> None:
    server = fake_provider(jina_handler)
    embedder = EmbeddingFactory.create("jina", api_key=KEY, base_url=server.url + "/v1")
    texts = ["你好", "world"]

    assert embedder.embed_batch(texts) == [fake_vector(t) for t in texts]
    assert server.failures == []
    assert server.requests[0].json() == {
        "model": "jina-embeddings-v3",
        "input": texts,
        "embedding_type": "float",
    }
    assert embedder.get_dim() == 4  # measured from the answer, which beats the table


def test_task_dimensions_and_normalized(fake_provider: FakeFactory) -> None:
    server = fake_provider(jina_handler)
    embedder = JinaEmbedding(
        api_key=KEY,
        base_url=server.url + "/v1",
        task="retrieval.passage",
        dimensions=512,
        normalized=True,
    )
    embedder.embed("doc")
    assert server.requests[0].json() == {
        "model": "jina-embeddings-v3",
        "input": ["doc"],
        "embedding_type": "float",
        "task": "retrieval.passage",
        "dimensions": 512,
        "normalized": True,
    }
    assert embedder.get_dim() == 512
