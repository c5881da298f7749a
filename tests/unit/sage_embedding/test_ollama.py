"""`ollama`: POST /api/embed `{model, input}` -> `{embeddings}`, no API key needed."""

from __future__ import annotations

import pytest

from sage.common.components.sage_embedding import (
    EmbeddingFactory,
    OllamaEmbedding,
    check_model_availability,
)
from sage.common.exceptions import NotFoundError

from .fakes import FakeFactory, Recorded, Reply, expect, fake_vector


def ollama_handler(request: Recorded) -> Reply:
    expect(request.path == "/api/embed", f"path {request.path}")
    body = request.json()
    allowed = {"model", "input", "truncate", "options", "keep_alive", "dimensions"}
    expect(set(body) <= allowed, f"unknown fields {set(body) - allowed}")
    if body["model"] != "nomic-embed-text":
        return Reply(404, {"error": f'model "{body["model"]}" not found, try pulling it first'})
    texts = body["input"]
    expect(isinstance(texts, list), "input must be a list")
    return Reply(
        200,
        {
            "model": body["model"],
            "embeddings": [fake_vector(t) for t in texts],
            "total_duration": 14143917,
            "load_duration": 1019500,
            "prompt_eval_count": 8,
        },
    )


def test_request_and_response_format_without_key(fake_provider: FakeFactory) -> None:
    server = fake_provider(ollama_handler)
    embedder = EmbeddingFactory.create("ollama", base_url=server.url)
    texts = ["why is the sky blue", "rayleigh"]

    assert embedder.embed_batch(texts) == [fake_vector(t) for t in texts]
    assert server.failures == []
    [request] = server.requests
    assert request.json() == {"model": "nomic-embed-text", "input": texts}
    assert "authorization" not in request.headers


def test_ollama_host_env_and_options(
    fake_provider: FakeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = fake_provider(ollama_handler)
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{server.port}")  # bare host:port, as Ollama
    embedder = OllamaEmbedding(truncate=True, keep_alive="5m")
    assert embedder.base_url == server.url
    embedder.embed("x")
    assert server.requests[0].json() == {
        "model": "nomic-embed-text",
        "input": ["x"],
        "truncate": True,
        "keep_alive": "5m",
    }


def test_missing_model_error_names_it(fake_provider: FakeFactory) -> None:
    server = fake_provider(ollama_handler)
    embedder = OllamaEmbedding(base_url=server.url, model="bge-m3")
    with pytest.raises(NotFoundError, match="try pulling it first"):
        embedder.embed("x")


def test_key_is_optional_and_sent_when_given(fake_provider: FakeFactory) -> None:
    server = fake_provider(ollama_handler)
    OllamaEmbedding(base_url=server.url, api_key="proxy-token").embed("x")
    assert server.requests[0].headers["authorization"] == "Bearer proxy-token"
    assert check_model_availability("ollama")["status"] == "available"
