"""The simulator's automatic prefix caching (sage.engines.sim.prefix_cache): what routing
benchmarks read from it (vLLM's prefix-cache counters, shorter first tokens on hits)."""

from __future__ import annotations

import time

import httpx
import pytest

from sage.common.exceptions import ConfigurationError
from sage.engines.sim import SimConfig, create_app, main
from sage.engines.sim.prefix_cache import PrefixCache
from tests.unit.engines.test_sim import metric, scrape


def test_a_prompt_that_extends_a_cached_one_hits_its_whole_blocks() -> None:
    cache = PrefixCache(block_size=4, capacity=100)
    first = list(range(10))  # blocks [0..3], [4..7]; 8, 9 are no whole block
    assert cache.admit(first) == 0
    assert cache.admit([*first, 10, 11, 12]) == 8
    # The same prompt again: its last token is computed, so its last whole block is not
    # counted when the prompt ends exactly on it (vLLM's rule).
    assert cache.admit(list(range(8))) == 4
    assert (cache.queries, cache.hits) == (10 + 13 + 8, 12)
    # A different first block shares nothing, even where later tokens agree.
    assert cache.admit([99, 1, 2, 3, 4, 5, 6, 7, 8]) == 0


def test_least_recently_used_blocks_are_evicted_first() -> None:
    cache = PrefixCache(block_size=2, capacity=4)
    a, b = [1, 2, 3, 4, 0], [5, 6, 7, 8, 0]
    cache.admit(a)
    cache.admit(b)  # 4 blocks held: a's two, b's two
    cache.admit(a)  # a is now the most recent
    cache.admit([9, 10, 11, 12, 0])  # two more blocks: b's go
    assert len(cache) == 4
    assert cache.admit(a) == 4
    assert cache.admit(b) == 0
    cache.clear()
    assert cache.admit(a) == 0


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ConfigurationError):
        PrefixCache(block_size=0, capacity=1)
    with pytest.raises(ConfigurationError):
        SimConfig(prefix_cache_blocks=-1)
    with pytest.raises(SystemExit) as exc:
        main(["--prefill-ms-per-token", "-1"])
    assert exc.value.code == 2


async def test_engine_counts_hits_and_skips_prefill_of_cached_tokens() -> None:
    """A repeated long prompt is a prefix-cache hit on /metrics and its first token comes
    sooner: cached tokens cost no prefill time."""
    config = SimConfig(kv_block_size=32, prefix_cache_blocks=64, prefill_ms_per_token=1.0)
    app = create_app(config)
    words = " ".join(f"w{i}" for i in range(320))  # 320 tokens: 320 ms of prefill cold
    body = {"messages": [{"role": "user", "content": words}], "max_tokens": 1}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://sim"
    ) as client:
        took = []
        for _ in range(2):
            began = time.perf_counter()
            reply = await client.post("/v1/chat/completions", json=body)
            took.append(time.perf_counter() - began)
            assert reply.status_code == 200, reply.text
        text = await scrape(client)
    assert metric(text, "vllm:prefix_cache_queries_total") == 640
    assert metric(text, "vllm:prefix_cache_hits_total") == 288  # 9 of 10 blocks
    assert took[1] < took[0] / 2  # 32 ms of prefill left of 320


async def test_without_prefix_caching_nothing_is_counted_and_ttft_is_flat() -> None:
    app = create_app(SimConfig())
    body = {"messages": [{"role": "user", "content": "a b c " * 40}], "max_tokens": 1}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://sim"
    ) as client:
        for _ in range(2):
            assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
        text = await scrape(client)
    assert metric(text, "vllm:prefix_cache_queries_total") == 0
    assert metric(text, "vllm:prefix_cache_hits_total") == 0
