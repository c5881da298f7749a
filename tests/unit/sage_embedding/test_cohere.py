"""`cohere`: POST /v2/embed with texts, input_type and embedding_types, floats under
`embeddings.float`."""

from __future__ import annotations

from sage.common.components.sage_embedding import CohereEmbedding, EmbeddingFactory

from .fakes import FakeFactory, Recorded, Reply, expect, fake_vector

KEY = "co-test-key"
ALLOWED_FIELDS = {
    "model",
    "texts",
    "input_type",
    "embedding_types",
    "output_dimension",
    "truncate",
    "max_tokens",
}
INPUT_TYPES = {"search_document", "search_query", "classification", "clustering", "image"}


def cohere_handler(request: Recorded) -> Reply:
    expect(request.path == "/v2/embed", f"path {request.path}")
    expect(request.headers.get("authorization") == f"Bearer {KEY}", "missing Bearer key")
    body = request.json()
    expect(set(body) <= ALLOWED_FIELDS, f"unknown fields {set(body) - ALLOWED_FIELDS}")
    expect(body.get("input_type") in INPUT_TYPES, "input_type is required by v3+ models")
    expect(body.get("embedding_types") == ["float"], "embedding_types")
    texts = body["texts"]
    expect(isinstance(texts, list) and 0 < len(texts) <= 96, f"{len(texts)} texts")
    return Reply(
        200,
        {
            "id": "da6e531f-54c6-4a73-bf92-f60566d8d753",
            "embeddings": {"float": [fake_vector(t) for t in texts]},
            "texts": texts,
            "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": 3}},
            "response_type": "embeddings_by_type",
        },
    )


def test_request_and_response_format(fake_provider: FakeFactory) -> None:
    server = fake_provider(cohere_handler)
    embedder = EmbeddingFactory.create("cohere", api_key=KEY, base_url=server.url)
    texts = ["hello", "world"]

    assert embedder.embed_batch(texts) == [fake_vector(t) for t in texts]
    assert server.failures == []
    assert server.requests[0].json() == {
        "model": "embed-multilingual-v3.0",
        "texts": texts,
        "input_type": "search_document",
        "embedding_types": ["float"],
    }
    assert EmbeddingFactory.create("cohere", api_key=KEY).get_dim() == 1024


def test_query_input_type_dimension_and_batches_of_96(fake_provider: FakeFactory) -> None:
    server = fake_provider(cohere_handler)
    embedder = CohereEmbedding(
        api_key=KEY,
        base_url=server.url,
        model="embed-v4.0",
        input_type="search_query",
        dimensions=256,
        truncate="END",
    )
    texts = [f"q{i}" for i in range(100)]
    assert embedder.embed_batch(texts) == [fake_vector(t) for t in texts]
    assert [len(r.json()["texts"]) for r in server.requests] == [96, 4]
    first = server.requests[0].json()
    assert first["input_type"] == "search_query"
    assert first["output_dimension"] == 256
    assert first["truncate"] == "END"
