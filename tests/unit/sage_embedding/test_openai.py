"""`openai`: POST {base}/embeddings, Bearer key, OpenAI's request and response JSON."""

from __future__ import annotations

import openai
import pytest

from sage.common.components.sage_embedding import EmbeddingFactory, OpenAIEmbedding
from sage.common.exceptions import InvalidRequestError, NotFoundError

from .fakes import FakeFactory, Recorded, Reply, expect, fake_vector, openai_style_reply

KEY = "sk-test-openai"
ALLOWED_FIELDS = {"model", "input", "encoding_format", "dimensions", "user"}


def openai_handler(request: Recorded) -> Reply:
    """Accepts only what OpenAI's /v1/embeddings accepts."""
    expect(request.method == "POST", f"method {request.method}")
    expect(request.path == "/v1/embeddings", f"path {request.path}")
    expect(request.headers.get("authorization") == f"Bearer {KEY}", "missing Bearer key")
    expect(request.headers.get("content-type") == "application/json", "content-type")
    body = request.json()
    expect(set(body) <= ALLOWED_FIELDS, f"unknown fields {set(body) - ALLOWED_FIELDS}")
    expect(isinstance(body.get("model"), str), "model must be a string")
    texts = body.get("input")
    expect(isinstance(texts, list) and all(isinstance(t, str) for t in texts), "input")
    expect(body.get("encoding_format", "float") == "float", "encoding_format")
    return openai_style_reply(texts, body["model"])


def test_request_and_response_format(fake_provider: FakeFactory) -> None:
    server = fake_provider(openai_handler)
    embedder = EmbeddingFactory.create("openai", api_key=KEY, base_url=server.url + "/v1")
    texts = ["alpha", "beta", "gamma"]

    assert embedder.embed_batch(texts) == [fake_vector(t) for t in texts]
    assert server.failures == []
    [request] = server.requests
    assert request.json() == {
        "model": "text-embedding-3-small",
        "input": texts,
        "encoding_format": "float",
    }
    embedder.close()


def test_single_text_and_dimensions(fake_provider: FakeFactory) -> None:
    server = fake_provider(openai_handler)
    embedder = OpenAIEmbedding(
        api_key=KEY, base_url=server.url + "/v1", model="text-embedding-3-large", dimensions=256
    )

    assert embedder.embed("hello") == fake_vector("hello")
    assert embedder.get_dim() == 256
    assert server.requests[0].json() == {
        "model": "text-embedding-3-large",
        "input": ["hello"],
        "encoding_format": "float",
        "dimensions": 256,
    }


def test_known_model_dimension_needs_no_call(fake_provider: FakeFactory) -> None:
    server = fake_provider(openai_handler)
    embedder = OpenAIEmbedding(api_key=KEY, base_url=server.url + "/v1")
    assert embedder.get_dim() == 1536
    assert embedder.model_name == "text-embedding-3-small"
    assert server.requests == []


def test_unknown_model_dimension_is_measured(fake_provider: FakeFactory) -> None:
    server = fake_provider(openai_handler)
    embedder = OpenAIEmbedding(api_key=KEY, base_url=server.url + "/v1", model="my-local-model")
    assert embedder.get_dim() == 4
    assert len(server.requests) == 1


def test_provider_error_message_is_kept(fake_provider: FakeFactory) -> None:
    def handler(request: Recorded) -> Reply:
        error = {"message": "'$.input' is invalid", "type": "invalid_request_error"}
        return Reply(400, {"error": {**error, "param": None, "code": None}})

    server = fake_provider(handler)
    embedder = OpenAIEmbedding(api_key=KEY, base_url=server.url + "/v1")
    with pytest.raises(InvalidRequestError, match=r"HTTP 400: '\$\.input' is invalid"):
        embedder.embed("x")


def test_unknown_model_is_not_found(fake_provider: FakeFactory) -> None:
    def handler(request: Recorded) -> Reply:
        message = "The model `nope` does not exist"
        return Reply(404, {"error": {"message": message, "type": "invalid_request_error"}})

    server = fake_provider(handler)
    embedder = OpenAIEmbedding(api_key=KEY, base_url=server.url + "/v1", model="nope")
    with pytest.raises(NotFoundError, match="does not exist"):
        embedder.embed("x")


def test_fake_accepts_what_the_official_sdk_sends(fake_provider: FakeFactory) -> None:
    """The fake's checks match the real client's requests, so it stands in for OpenAI."""
    server = fake_provider(openai_handler)
    with openai.OpenAI(api_key=KEY, base_url=server.url + "/v1", max_retries=0) as sdk:
        result = sdk.embeddings.create(
            model="text-embedding-3-small", input=["a", "bb"], encoding_format="float"
        )
    assert server.failures == []
    assert [item.embedding for item in sorted(result.data, key=lambda d: d.index)] == [
        fake_vector("a"),
        fake_vector("bb"),
    ]
