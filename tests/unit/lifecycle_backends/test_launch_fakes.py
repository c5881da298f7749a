"""Start the fake vllm / TEI / infinity programs exactly as their plans say, as lifecycle would:
the plan's argv must be accepted by the real flag names, the health path must answer, and
the API must be where the plan's backend promises it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from sage.common.utils.processes import free_port
from sage.services.lifecycle.backends import BACKENDS
from sage.services.lifecycle.spec import EngineSpec

from .conftest import FakePrograms, launched


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    """Straight to the fake on 127.0.0.1, never through a proxy from the environment."""
    with httpx.Client(trust_env=False, timeout=10.0) as client:
        yield client


def test_vllm_as_planned(fake_programs: FakePrograms, tmp_path: Path, http: httpx.Client) -> None:
    port = free_port()
    spec = EngineSpec(
        model="Qwen/Qwen2.5-7B-Instruct",
        tensor_parallel_size=2,
        gpu_memory_utilization=0.9,
        max_model_len=4096,
        aliases=("qwen",),
        max_concurrent_requests=32,
        extra_args=("--override-generation-config", '{"temperature": 0.2}', "--enforce-eager"),
    )
    plan = BACKENDS["vllm"].plan(spec, port, [2, 3])
    with launched(plan, port, tmp_path / "vllm.log") as base:
        models = http.get(base + "/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["Qwen/Qwen2.5-7B-Instruct", "qwen"]
        assert models["data"][0]["max_model_len"] == 4096
        chat = http.post(
            base + "/v1/chat/completions",
            json={"model": "qwen", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert chat.status_code == 200
        assert chat.json()["choices"][0]["message"]["content"]
        with http.stream(
            "POST",
            base + "/v1/chat/completions",
            json={"model": "qwen", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        ) as stream:
            events = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [orjson.loads(e) for e in events[:-1]]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        missing = http.post(
            base + "/v1/chat/completions",
            json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert missing.status_code == 404
    recorded = fake_programs.recorded()
    assert recorded["program"] == "vllm"
    assert recorded["argv"] == plan.argv[1:]
    assert recorded["argv"][recorded["argv"].index("--override-generation-config") + 1] == (
        '{"temperature": 0.2}'
    )
    assert recorded["env"]["CUDA_VISIBLE_DEVICES"] == "2,3"


def test_tei_as_planned(fake_programs: FakePrograms, tmp_path: Path, http: httpx.Client) -> None:
    port = free_port()
    spec = EngineSpec(model="BAAI/bge-small-en-v1.5", kind="embedding", max_concurrent_requests=64)
    plan = BACKENDS["tei"].plan(spec, port, [])
    with launched(plan, port, tmp_path / "tei.log") as base:
        # The embedding service sends micro-batches far above TEI's default 32 inputs.
        texts = [f"text {i}" for i in range(300)]
        openai = http.post(base + "/v1/embeddings", json={"model": spec.model, "input": texts})
        assert openai.status_code == 200, openai.text
        assert len(openai.json()["data"]) == 300
        native = http.post(base + "/embed", json={"inputs": ["a", "b"]})
        assert native.status_code == 200 and len(native.json()) == 2
        info = http.get(base + "/info").json()
        assert info["model_id"] == spec.model and info["auto_truncate"] is True
        assert info["max_concurrent_requests"] == 64
    recorded = fake_programs.recorded()
    assert recorded["program"] == "text-embeddings-router"
    assert recorded["argv"] == plan.argv[1:]
    assert recorded["env"]["CUDA_VISIBLE_DEVICES"] == ""


def test_infinity_as_planned(
    fake_programs: FakePrograms, tmp_path: Path, http: httpx.Client
) -> None:
    port = free_port()
    spec = EngineSpec(model="BAAI/bge-m3", kind="embedding")
    plan = BACKENDS["infinity"].plan(spec, port, [1])
    with launched(plan, port, tmp_path / "infinity.log") as base:
        assert plan.health_path == "/health"
        models = http.get(base + "/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["BAAI/bge-m3"]
        response = http.post(base + "/v1/embeddings", json={"model": spec.model, "input": "hi"})
        assert response.status_code == 200
        assert response.json()["data"][0]["index"] == 0
        # Without the prefix nothing is served: the plan must have passed --url-prefix /v1.
        assert http.post(base + "/embeddings", json={"input": "hi"}).status_code == 404
    recorded = fake_programs.recorded()
    assert recorded["program"] == "infinity_emb"
    assert recorded["argv"] == plan.argv[1:]
    assert recorded["env"]["CUDA_VISIBLE_DEVICES"] == "1"
