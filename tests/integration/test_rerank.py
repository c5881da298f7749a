"""POST /v1/rerank (and /rerank) and /score (and /v1/score) through the real edge and
scheduler to embedding-kind sim engines (the sim's cross-encoder scores shared words high),
and the clients' rerank/score over them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from sage.common.config.settings import SageSettings
from sage.common.exceptions import ModelNotFoundError
from sage.common.http.testing import RecordingEngine
from sage.llm import AsyncUnifiedInferenceClient, RerankResult, UnifiedInferenceClient

KEY = "sk-rerank"
AUTH = {"authorization": f"Bearer {KEY}"}
MODEL = "sim-rerank"
QUERY = "giant panda bear"
DOCS = [
    "the stock market fell today",
    "the giant panda is a bear of China",
    "a panda eats bamboo",
]


@pytest.fixture
def settings(settings: SageSettings) -> SageSettings:
    """One API key, so the routes' auth is tested as embeddings' is."""
    return settings.model_copy(update={"api_keys": KEY})


@pytest.fixture
async def edge(control_plane: Any, sim_engine: Callable[..., str]) -> httpx.AsyncClient:
    """The edge with one embedding-kind sim engine of MODEL (alias `rr-alias`), and one
    chat sim of `sim` (a chat model is no cross-encoder)."""
    base = sim_engine("--embedding-dim", "32", model=MODEL)
    await control_plane.register("rr-a", MODEL, base, kind="embedding", aliases=["rr-alias"])
    await control_plane.register("chat-a", "sim", sim_engine())
    client: httpx.AsyncClient = control_plane.client
    return client


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank"])
async def test_rerank_orders_by_relevance_and_keeps_top_n(
    edge: httpx.AsyncClient, path: str
) -> None:
    body = {"model": MODEL, "query": QUERY, "documents": DOCS}
    reply = await edge.post(path, json=body, headers=AUTH)
    assert reply.status_code == 200, reply.text
    results = reply.json()["results"]
    # the document sharing three words first, the unrelated one last
    assert [r["index"] for r in results] == [1, 2, 0]
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert results[0]["document"]["text"] == DOCS[1]
    assert reply.json()["usage"]["total_tokens"] > 0

    top = await edge.post(path, json={**body, "model": "rr-alias", "top_n": 1}, headers=AUTH)
    assert top.status_code == 200, top.text
    assert [r["index"] for r in top.json()["results"]] == [1]


@pytest.mark.parametrize("path", ["/score", "/v1/score"])
async def test_score_one_against_many_and_pairs(edge: httpx.AsyncClient, path: str) -> None:
    many = await edge.post(
        path, json={"model": MODEL, "text_1": QUERY, "text_2": DOCS}, headers=AUTH
    )
    assert many.status_code == 200, many.text
    data = many.json()["data"]
    assert [d["index"] for d in data] == [0, 1, 2]
    scores = [d["score"] for d in data]
    assert scores[1] > scores[2] > scores[0]

    pairs = await edge.post(
        path,
        json={"model": MODEL, "text_1": [QUERY, DOCS[0]], "text_2": [DOCS[0], DOCS[0]]},
        headers=AUTH,
    )
    assert pairs.status_code == 200, pairs.text
    same, different = pairs.json()["data"][1]["score"], pairs.json()["data"][0]["score"]
    assert same == pytest.approx(1.0) and different < same


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/rerank", {"model": "nope", "query": "q", "documents": ["d"]}, 404, "model"),
        ("/score", {"model": "nope", "text_1": "a", "text_2": "b"}, 404, "model"),
        ("/v1/rerank", {"model": MODEL, "documents": ["d"]}, 400, "query"),
        ("/v1/rerank", {"model": MODEL, "query": "q", "documents": []}, 400, "documents"),
        (
            "/v1/rerank",
            {"model": MODEL, "query": "q", "documents": ["d"], "top_n": -1},
            400,
            "top_n",
        ),
        ("/score", {"model": MODEL, "text_1": "a"}, 400, "text_2"),
        ("/v1/score", {"text_1": "a", "text_2": "b"}, 400, "model"),
    ],
)
async def test_errors_name_the_model_or_field(
    edge: httpx.AsyncClient, path: str, body: dict[str, Any], status: int, param: str
) -> None:
    reply = await edge.post(path, json=body, headers=AUTH)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param, error
    assert param in error["message"]


async def test_a_chat_model_is_no_cross_encoder(edge: httpx.AsyncClient) -> None:
    """Rerank runs on embedding-kind engines only: a chat model's name is a 404."""
    reply = await edge.post(
        "/v1/rerank", json={"model": "sim", "query": "q", "documents": ["d"]}, headers=AUTH
    )
    assert reply.status_code == 404, reply.text
    assert reply.json()["error"]["param"] == "model"


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/score", "/v1/score"])
async def test_unauthenticated_is_401(edge: httpx.AsyncClient, path: str) -> None:
    reply = await edge.post(
        path, json={"model": MODEL, "query": "q", "documents": ["d"], "text_1": "a", "text_2": "b"}
    )
    assert reply.status_code == 401
    assert reply.json()["error"]["code"] == "invalid_api_key"


async def test_engine_without_the_route_is_404_naming_it(control_plane: Any) -> None:
    async with RecordingEngine() as recorder:
        await control_plane.register("rec-e", "rec", recorder.base_url, kind="embedding")
        reply = await control_plane.client.post(
            "/v1/rerank", json={"model": "rec", "query": "q", "documents": ["d"]}, headers=AUTH
        )
    assert reply.status_code == 404, reply.text
    message = reply.json()["error"]["message"]
    assert "rec-e" in message and "/rerank" in message


async def test_clients_rerank_and_score(edge: httpx.AsyncClient) -> None:
    url = str(edge.base_url)

    def sync_calls() -> tuple[list[RerankResult], list[float]]:
        with UnifiedInferenceClient.create(control_plane_url=url, api_key=KEY) as client:
            return (
                client.rerank(QUERY, DOCS, model=MODEL, top_n=2),
                client.score(QUERY, DOCS, model=MODEL),
            )

    ranked, scores = await asyncio.to_thread(sync_calls)
    assert [r.index for r in ranked] == [1, 2]
    assert ranked[0].document == DOCS[1] and ranked[0].relevance_score == pytest.approx(scores[1])
    assert scores[1] > scores[2] > scores[0]

    async with AsyncUnifiedInferenceClient.create(
        control_plane_url=url, api_key=KEY, default_embedding_model=MODEL
    ) as aclient:
        assert [r.index for r in await aclient.rerank(QUERY, DOCS)] == [1, 2, 0]
        assert await aclient.score([QUERY], [DOCS[1]]) == [pytest.approx(scores[1])]
        with pytest.raises(ModelNotFoundError):
            await aclient.rerank("q", ["d"], model="nope")
