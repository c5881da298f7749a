"""Embeddings through vLLM's pooling runner (the CPU build serves BERT models).

Lifecycle starts the bundled all-MiniLM-L6-v2 (copied under $SAGE_HOME/models, an allowed
model root) as an embedding engine with the vllm backend: `--runner pooling --convert
embed`. Requests go through the gateway like any embedding request; the vectors must match
sentence-transformers on the same folder (what our own embedding engine runs) to cosine
>= 0.999. vLLM's own limits reach the client as OpenAI errors: the model's 256-token
window (vLLM refuses longer input; our engine truncates) and `dimensions` (MiniLM is not
a matryoshka model).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.vllm.conftest import VllmStack, stop_engine

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(420)]
np = pytest.importorskip("numpy")  # the engines extra brings it

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "vLLM serves embedding models with its pooling runner.",
    "一个中文句子，用来检查分词。",
    "short",
]


@pytest.fixture(scope="module")
def minilm(vllm_stack: VllmStack) -> Iterator[tuple[str, dict[str, Any]]]:
    """(model id, engine): MiniLM on vLLM's pooling runner (conftest started it in the
    background), stopped at the end of the module."""
    engine: dict[str, Any] = vllm_stack.background["pooling"].result()
    try:
        yield str(engine["model_id"]), engine
    finally:
        stop_engine(vllm_stack, engine)


def embed(stack: VllmStack, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(stack.gateway + "/v1/embeddings", json=body, timeout=120)


def test_vectors_match_sentence_transformers(
    vllm_stack: VllmStack, minilm: tuple[str, dict[str, Any]]
) -> None:
    from sentence_transformers import SentenceTransformer

    model, engine = minilm
    assert engine["engine_kind"] == "embedding" and engine["backend"] == "vllm", engine
    reply = embed(vllm_stack, {"model": model, "input": TEXTS})
    assert reply.status_code == 200, reply.text
    doc = reply.json()
    assert [d["index"] for d in doc["data"]] == list(range(len(TEXTS)))
    assert doc["usage"]["prompt_tokens"] > len(TEXTS)
    got = np.array([d["embedding"] for d in doc["data"]], dtype=np.float64)
    expected = SentenceTransformer(model, device="cpu").encode(TEXTS, convert_to_numpy=True)
    expected = expected.astype(np.float64)
    assert got.shape == expected.shape == (len(TEXTS), 384)
    cosine = (got * expected).sum(axis=1) / (
        np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1)
    )
    assert cosine.min() >= 0.999, cosine


def test_vllm_limits_reach_the_client_as_openai_errors(
    vllm_stack: VllmStack, minilm: tuple[str, dict[str, Any]]
) -> None:
    model, _ = minilm
    too_long = embed(vllm_stack, {"model": model, "input": "word " * 600})
    assert too_long.status_code == 400, too_long.text
    error = too_long.json()["error"]
    assert error["type"] == "invalid_request_error", error
    assert "token" in error["message"].lower(), error
    dims = embed(vllm_stack, {"model": model, "input": "hi", "dimensions": 8})
    assert dims.status_code == 400, dims.text
    assert dims.json()["error"]["type"] == "invalid_request_error"
    # The engine is still serving after refusing both.
    assert embed(vllm_stack, {"model": model, "input": "hi"}).status_code == 200
