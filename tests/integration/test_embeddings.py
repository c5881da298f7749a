"""Embeddings end to end: edge → scheduler → embedding service (batcher) → the project's own
sentence-transformers engine running the bundled all-MiniLM-L6-v2, in a real process."""

from __future__ import annotations

import asyncio
import base64
import os
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("numpy")  # the engines extra, as the MiniLM engine under test
import numpy as np

from sage.common.utils.processes import free_port, stop_process, wait_http
from sage.engines.embedding import BUNDLED_MODEL_NAME
from sage.llm import UnifiedInferenceClient

MODEL = BUNDLED_MODEL_NAME


@pytest.fixture(scope="module")
def minilm_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m sage.engines.embedding` with the bundled model, shared by the module."""
    port = free_port()
    log = tmp_path_factory.mktemp("engine") / "engine.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sage.engines.embedding",
                "--port",
                str(port),
                "--device",
                "cpu",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/health", proc, timeout=120)
    except Exception:
        stop_process(proc)
        raise RuntimeError(Path(log).read_text()) from None
    yield base
    stop_process(proc)


@pytest.fixture(scope="module")
def reference() -> Callable[[list[str]], Any]:
    """The same model in this process: what the gateway's vectors must match."""
    from sage.engines.embedding import EmbeddingModel, EngineConfig

    model = EmbeddingModel(EngineConfig(device="cpu"))
    return model.encode


@pytest.fixture
async def plane(control_plane: Any, minilm_engine: str) -> Any:
    await control_plane.register("minilm-a", MODEL, minilm_engine, kind="embedding")
    return control_plane


def _batches_seen(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith("sage_embedding_batch_size_count"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("batch histogram missing")


async def test_concurrent_callers_are_batched_and_match_in_process_vectors(
    plane: Any, minilm_engine: str, reference: Callable[[list[str]], Any]
) -> None:
    texts = [f"callers share batches, text number {i}" for i in range(64)]
    async with httpx.AsyncClient(trust_env=False) as raw:
        before = _batches_seen((await raw.get(minilm_engine + "/metrics")).text)
        replies = await asyncio.gather(
            *(plane.client.post("/v1/embeddings", json={"model": MODEL, "input": t}) for t in texts)
        )
        after = _batches_seen((await raw.get(minilm_engine + "/metrics")).text)
    assert all(r.status_code == 200 for r in replies), replies[0].text
    got = np.array([r.json()["data"][0]["embedding"] for r in replies], dtype=np.float32)
    want = reference(texts)
    cosine = (got * want).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() >= 0.999
    assert after - before < len(texts) / 2  # batched across callers, not one call each
    usage = replies[0].json()["usage"]
    assert usage["prompt_tokens"] == usage["total_tokens"] > 0


async def test_list_input_keeps_order_and_base64_matches_float(plane: Any) -> None:
    inputs = ["Hello", "World", "写一份日报"]
    floats = (
        await plane.client.post("/v1/embeddings", json={"model": MODEL, "input": inputs})
    ).json()
    assert [d["index"] for d in floats["data"]] == [0, 1, 2]
    b64 = (
        await plane.client.post(
            "/v1/embeddings", json={"model": MODEL, "input": inputs, "encoding_format": "base64"}
        )
    ).json()
    for f, b in zip(floats["data"], b64["data"], strict=True):
        raw = base64.b64decode(b["embedding"])
        decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
        assert np.allclose(decoded, f["embedding"], atol=1e-6)
        assert len(decoded) == 384


async def test_client_embed_and_status(plane: Any) -> None:
    client = UnifiedInferenceClient.create(control_plane_url=str(plane.client.base_url) + "/v1")
    vectors = await asyncio.to_thread(client.embed, ["Hello", "World"])
    assert len(vectors) == 2 and len(vectors[0]) == 384
    client.close()


BAD: list[tuple[dict[str, Any], int, str | None, str]] = [
    ({"model": MODEL, "input": []}, 400, "input", "empty"),
    ({"model": MODEL, "input": ""}, 400, "input", "empty"),
    ({"model": MODEL, "input": ["ok", 7]}, 400, "input[1]", "string"),
    ({"model": MODEL, "input": [[1, 2, 3]]}, 400, "input[0]", "token arrays"),
    ({"model": MODEL, "input": ["x"] * 2049}, 400, "input", "at most 2048"),
    ({"model": MODEL}, 400, "input", "required"),
    ({"model": MODEL, "input": "x", "encoding_format": "hex"}, 400, "encoding_format", "base64"),
    ({"model": MODEL, "input": "x", "dimensions": 12}, 400, "dimensions", "384"),
    ({"model": "no-such-embedder", "input": "x"}, 404, "model", "no-such-embedder"),
]


@pytest.mark.parametrize(("payload", "status", "param", "needle"), BAD)
async def test_bad_embedding_input_is_a_4xx_naming_the_field(
    plane: Any, payload: dict[str, Any], status: int, param: str | None, needle: str
) -> None:
    resp = await plane.client.post("/v1/embeddings", json=payload)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["param"] == param
    assert needle in error["message"]
    ok = await plane.client.post("/v1/embeddings", json={"model": MODEL, "input": "still up"})
    assert ok.status_code == 200


async def test_over_long_input_is_truncated_not_rejected(plane: Any) -> None:
    long_text = "word " * 5000  # far past the model's 256-token window
    resp = await plane.client.post("/v1/embeddings", json={"model": MODEL, "input": long_text})
    assert resp.status_code == 200
    assert resp.json()["usage"]["prompt_tokens"] == 256
