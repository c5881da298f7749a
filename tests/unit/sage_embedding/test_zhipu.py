"""`zhipu`: POST /api/paas/v4/embeddings on open.bigmodel.cn; at most 64 inputs a request."""

from __future__ import annotations

import pytest

from sage.common.components.sage_embedding import EmbeddingFactory, ZhipuEmbedding
from sage.common.exceptions import AuthenticationError

from .fakes import FakeFactory, Recorded, Reply, expect, fake_vector, openai_style_reply

KEY = "zhipu.test-key"


def zhipu_handler(request: Recorded) -> Reply:
    expect(request.path == "/api/paas/v4/embeddings", f"path {request.path}")
    if request.headers.get("authorization") != f"Bearer {KEY}":
        # Zhipu's own error shape: a string code and a Chinese message.
        return Reply(401, {"error": {"code": "1000", "message": "身份验证失败。"}})
    body = request.json()
    expect(set(body) <= {"model", "input", "dimensions", "request_id", "user_id"}, str(body))
    texts = body["input"]
    expect(isinstance(texts, list) and 0 < len(texts) <= 64, f"{len(texts)} inputs")
    reply = openai_style_reply(texts, body["model"])
    reply.body["usage"] = {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1}
    return reply


def test_request_and_response_format(fake_provider: FakeFactory) -> None:
    server = fake_provider(zhipu_handler)
    embedder = EmbeddingFactory.create(
        "zhipu", api_key=KEY, base_url=server.url + "/api/paas/v4", dimensions=512
    )
    assert embedder.embed("今天天气怎么样") == fake_vector("今天天气怎么样")
    assert server.failures == []
    assert server.requests[0].json() == {
        "model": "embedding-3",
        "input": ["今天天气怎么样"],
        "dimensions": 512,
    }


def test_large_batches_respect_the_64_input_limit(fake_provider: FakeFactory) -> None:
    server = fake_provider(zhipu_handler)
    embedder = ZhipuEmbedding(api_key=KEY, base_url=server.url + "/api/paas/v4")
    texts = [f"t{i}" for i in range(130)]

    assert embedder.embed_batch(texts) == [fake_vector(t) for t in texts]
    assert [len(r.json()["input"]) for r in server.requests] == [64, 64, 2]


def test_wrong_key_is_an_authentication_error(fake_provider: FakeFactory) -> None:
    server = fake_provider(zhipu_handler)
    embedder = ZhipuEmbedding(api_key="wrong", base_url=server.url + "/api/paas/v4")
    with pytest.raises(AuthenticationError, match="身份验证失败"):
        embedder.embed("x")
    assert len(server.requests) == 1  # 401 is not retried
