"""`siliconcloud`: SiliconFlow's OpenAI-like POST /v1/embeddings."""

from __future__ import annotations

from sage.common.components.sage_embedding import EmbeddingFactory, SiliconCloudEmbedding

from .fakes import FakeFactory, Recorded, Reply, expect, fake_vector, openai_style_reply

KEY = "sk-siliconflow-test"


def siliconflow_handler(request: Recorded) -> Reply:
    expect(request.path == "/v1/embeddings", f"path {request.path}")
    expect(request.headers.get("authorization") == f"Bearer {KEY}", "missing Bearer key")
    body = request.json()
    expect(set(body) <= {"model", "input", "encoding_format", "dimensions"}, str(body))
    expect(body.get("encoding_format") == "float", "encoding_format")
    texts = body["input"]
    expect(isinstance(texts, list) and len(texts) <= 32, "at most 32 inputs")
    return openai_style_reply(texts, body["model"])


def test_request_and_response_format(fake_provider: FakeFactory) -> None:
    server = fake_provider(siliconflow_handler)
    embedder = EmbeddingFactory.create("siliconcloud", api_key=KEY, base_url=server.url + "/v1")
    texts = ["第一段", "第二段"]

    assert embedder.embed_batch(texts) == [fake_vector(t) for t in texts]
    assert server.failures == []
    assert server.requests[0].json() == {
        "model": "BAAI/bge-large-zh-v1.5",
        "input": texts,
        "encoding_format": "float",
    }


def test_alias_and_batch_limit(fake_provider: FakeFactory) -> None:
    server = fake_provider(siliconflow_handler)
    embedder = EmbeddingFactory.create(
        "siliconflow", api_key=KEY, base_url=server.url + "/v1", model="BAAI/bge-m3"
    )
    assert isinstance(embedder, SiliconCloudEmbedding)
    texts = [str(i) for i in range(40)]
    assert embedder.embed_batch(texts) == [fake_vector(t) for t in texts]
    assert [len(r.json()["input"]) for r in server.requests] == [32, 8]
