"""The simulator's automatic prefix caching (sage.engines.sim.prefix_cache): what routing
benchmarks read from it (vLLM's prefix-cache counters, shorter first tokens on hits)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import zmq

from sage.common.exceptions import ConfigurationError
from sage.common.utils.processes import free_port, stop_process, wait_http
from sage.engines.sim import SimConfig, create_app, main
from sage.engines.sim.prefix_cache import PrefixCache
from sage.services.scheduler.routing.kv_index import KvBlockIndex, chain_hashes
from tests.unit.engines.test_sim import REPO_ROOT, metric, scrape


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


def test_stored_evicted_and_cleared_blocks_become_vllm_events() -> None:
    cache = PrefixCache(block_size=2, capacity=2, events=True)
    cache.admit([1, 2, 3, 4, 5])
    stored = cache.drain_events()
    assert [e["type"] for e in stored] == ["BlockStored", "BlockStored"]
    first, second = stored
    assert first["parent_block_hash"] is None and first["token_ids"] == [1, 2]
    assert second["parent_block_hash"] == first["block_hashes"][0]
    assert second["token_ids"] == [3, 4] and second["block_size"] == 2
    assert cache.drain_events() == []
    cache.admit([1, 2, 3, 4])  # held already: nothing new
    assert cache.drain_events() == []
    cache.admit([7, 8, 0])  # one block more: the least recently used one goes
    kinds = [(e["type"], e["block_hashes"]) for e in cache.drain_events()]
    assert kinds[1] == ("BlockRemoved", first["block_hashes"])
    cache.clear()
    assert cache.drain_events() == [{"type": "AllBlocksCleared"}]
    assert PrefixCache(2, 2).admit([1, 2, 3]) == 0  # events off: none kept
    assert PrefixCache(2, 2).drain_events() == []


def _chat(client: httpx.Client, text: str) -> None:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 1}
    assert client.post("/v1/chat/completions", json=body).status_code == 200


def _receive(sub: zmq.Socket[bytes], index: KvBlockIndex, wait_ms: int = 300) -> int:
    got = 0
    while sub.poll(wait_ms):
        index.apply_message("sim", sub.recv_multipart())
        got += 1
    return got


def test_published_events_feed_the_schedulers_kv_index(tmp_path: Path) -> None:
    """A sim started with --kv-events-endpoint publishes what its prefix cache stores and
    evicts in vLLM's wire format: the scheduler's kv_events index, fed by a real ZMQ
    subscription, finds a chat's blocks by the token ids the sim's /tokenize gives, and
    loses them once they are evicted."""
    endpoint = f"ipc://{tmp_path / 'kv.sock'}"
    port = free_port()
    argv = [sys.executable, "-m", "sage.engines.sim", "--port", str(port), "--log-level"]
    argv += ["warning", "--kv-block-size", "4", "--prefix-cache-blocks", "3"]
    env = dict(os.environ)  # the sim from this checkout, as test_sim's CLI test runs it
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT / "src"), env.get("PYTHONPATH")) if p
    )
    proc = subprocess.Popen([*argv, "--kv-events-endpoint", endpoint], env=env)
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.LINGER, 0)
    index = KvBlockIndex()
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/health", proc, timeout=30)
        sub.connect(endpoint)
        with httpx.Client(base_url=base, timeout=10) as client:
            # PUB drops what it sends before the subscription is in place: warm up first.
            for i in range(50):
                _chat(client, f"warm up prompt number {i}")
                if _receive(sub, index, 100):
                    break
            else:
                pytest.fail("no KV event reached the subscriber")
            chat = "one two three four five six seven eight nine ten eleven twelve"
            _chat(client, chat)
            assert _receive(sub, index)
            reply = client.post(
                "/tokenize", json={"messages": [{"role": "user", "content": chat}]}
            ).json()
            hashes = chain_hashes(reply["tokens"], 4)
            assert reply["count"] == 12 and len(hashes) == 3
            # The sim's chat template adds nothing: the prompt gives the same ids.
            assert (
                client.post("/tokenize", json={"prompt": chat}).json()["tokens"]
                == (reply["tokens"])
            )
            for bad, field in (({"messages": "hi"}, "messages"), ({"prompt": 5}, "prompt")):
                refused = client.post("/tokenize", json=bad)
                assert refused.status_code == 400 and field in refused.text, refused.text
            assert index.longest_prefix(hashes, ["sim"]) == {"sim": 3}
            _chat(client, "a b c d e f g h")  # two blocks more: the chat's first two go
            assert _receive(sub, index)
            assert index.longest_prefix(hashes, ["sim"]) == {}
    finally:
        sub.close()
        context.term()
        stop_process(proc)
