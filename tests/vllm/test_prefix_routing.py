"""prefix_aware routing across two real vLLM engines: a repeated long prompt goes back to the
engine that cached it, so that engine's own `vllm:prefix_cache_hits_total` grows (vLLM
caches whole 128-token blocks; a prompt under 129 tokens never hits). Round-robin would
alternate the repeats between the engines and split the hits; each engine would then
recompute the prompt once."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.vllm.conftest import VllmStack, start_engine, stop_engine

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(420)]

HITS = "vllm:prefix_cache_hits_total"
REPEATS = 4
# ~630 and ~600 WordPiece tokens: 4 whole 128-token blocks each, far apart from the first word.
PROMPTS = {
    "fox": "the quick brown fox jumps over the lazy dog " * 70,
    "jugs": "pack my box with five dozen liquor jugs " * 75,
}


def prefix_hits(base_url: str) -> float:
    """An engine's vllm:prefix_cache_hits_total (tokens), summed over its engine cores."""
    text = httpx.get(base_url + "/metrics", timeout=30).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == HITS
    )


@pytest.fixture
def two_engines(vllm_stack: VllmStack) -> Iterator[list[dict[str, Any]]]:
    """The stack's engine and a second one for the same model, stopped after the test."""
    second = start_engine(vllm_stack)
    try:
        yield [vllm_stack.engine, second]
    finally:
        stop_engine(vllm_stack, second)


def test_repeated_prefix_hits_the_cache_of_one_engine(
    vllm_stack: VllmStack, two_engines: list[dict[str, Any]]
) -> None:
    urls = [str(e["base_url"]) for e in two_engines]
    models = httpx.get(vllm_stack.gateway + "/v1/models", timeout=30).json()["data"]
    assert [m["ready_engines"] for m in models if m["id"] == vllm_stack.model] == [2]
    with httpx.Client(base_url=vllm_stack.gateway + "/v1", timeout=120) as client:
        for name, prompt in PROMPTS.items():
            before = [prefix_hits(url) for url in urls]
            for _ in range(REPEATS):
                reply = client.post(
                    "/completions",
                    json={"model": vllm_stack.model, "prompt": prompt, "max_tokens": 4},
                )
                assert reply.status_code == 200, reply.text
                assert reply.json()["usage"]["prompt_tokens"] >= 512
            grew = [prefix_hits(url) - b for url, b in zip(urls, before, strict=True)]
            # Every repeat after the first went to the engine that computed it first: that
            # one served at least 2 cached blocks each time, the other none.
            assert sorted(grew)[0] == 0, (name, grew)
            assert max(grew) >= (REPEATS - 1) * 256, (name, grew)
