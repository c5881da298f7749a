"""The simulator's PD (disaggregated prefill) side: vLLM's kv_transfer_params exchange.

The prefill engine runs on a real socket because the decode engine pulls KV blocks from
its side channel (a port of its own, not the HTTP one), as a vLLM decoder pulls them over
NIXL from the address the prefill returned.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import uvicorn

from sage.common.exceptions import ConfigurationError, InvalidRequestError
from sage.common.http.testing import quiet_server, serve_in_task
from sage.engines.sim import SimConfig, chat_prompt_text, count_tokens, create_app, expected_text
from sage.engines.sim.kv import (
    BlockStore,
    PullOutcome,
    SharedStorage,
    parse_kv_transfer_params,
    prefill_reply_params,
    pull_blocks,
)
from tests.unit.engines.test_sim import MESSAGES, PROMPT, metric, scrape, sse_payloads

# What vLLM's toy_proxy_server sends to the prefill engine.
TO_PREFILL = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


class FakeClock:
    """A settable monotonic clock for the block store."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_block_store_holds_ceil_blocks_and_frees_on_pull() -> None:
    store = BlockStore(block_size=16, hold_s=10, clock=FakeClock())
    blocks = store.hold(33)
    assert len(blocks) == 3 and store.held == 3
    assert len(store.hold(0)) == 1  # an empty prompt still has a block
    assert store.pull(blocks) is PullOutcome.OK
    assert store.held == 1 and store.pulled_total == 3
    # pulled blocks are gone: a second decoder with the same ids gets nothing
    assert store.pull(blocks) is PullOutcome.UNKNOWN_BLOCKS
    assert store.pull((999,)) is PullOutcome.UNKNOWN_BLOCKS


def test_block_store_expires_blocks_no_decoder_pulled() -> None:
    clock = FakeClock()
    store = BlockStore(block_size=4, hold_s=5, clock=clock)
    old = store.hold(8)
    clock.now += 3
    young = store.hold(4)
    clock.now += 3  # old is past its hold time, young is not
    assert store.held == 1 and store.expired_total == 2
    assert store.pull(old) is PullOutcome.EXPIRED_BLOCKS
    assert store.pull(young) is PullOutcome.OK


def test_block_store_rejects_bad_config() -> None:
    with pytest.raises(ConfigurationError):
        BlockStore(0, 1)
    with pytest.raises(ConfigurationError):
        BlockStore(16, 0)
    with pytest.raises(ConfigurationError, match="role"):
        SimConfig(role="middle")


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ([1], "kv_transfer_params"),
        ({"do_remote_decode": "yes"}, "kv_transfer_params.do_remote_decode"),
        ({"do_remote_decode": True, "do_remote_prefill": True}, "kv_transfer_params"),
        ({"do_remote_prefill": True}, "kv_transfer_params.remote_engine_id"),
        (
            {"do_remote_prefill": True, "remote_engine_id": "e", "remote_block_ids": []},
            "kv_transfer_params.remote_block_ids",
        ),
        (
            {"do_remote_prefill": True, "remote_engine_id": "e", "remote_block_ids": [1]},
            "kv_transfer_params.remote_host",
        ),
        (
            {
                "do_remote_prefill": True,
                "remote_engine_id": "e",
                "remote_block_ids": [1],
                "remote_host": "h",
                "remote_port": 70000,
            },
            "kv_transfer_params.remote_port",
        ),
    ],
)
def test_bad_kv_transfer_params_name_the_field(params: Any, field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_kv_transfer_params(params)
    assert info.value.param == field


def test_toy_proxy_prefill_params_parse_as_remote_decode() -> None:
    kv = parse_kv_transfer_params(TO_PREFILL)
    assert kv is not None and kv.do_remote_decode and not kv.do_remote_prefill


async def serve(config: SimConfig, port: int) -> tuple[uvicorn.Server, asyncio.Task[None]]:
    server = quiet_server(create_app(config), port)
    return server, await serve_in_task(server)


@pytest.fixture
async def prefill(port_factory: Callable[[], int]) -> AsyncIterator[httpx.AsyncClient]:
    """A prefill-role sim on a real socket (decoders pull from it)."""
    port = port_factory()
    config = SimConfig(role="prefill", kv_engine_id="prefill-A", ttft_ms=150, kv_hold_s=30)
    server, task = await serve(config, port)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        yield client
    server.should_exit = True
    await task


def decode_client(**overrides: Any) -> httpx.AsyncClient:
    """A decode-role sim; KV that cannot be loaded is prefilled locally (recompute) unless
    the test picks vLLM's default policy, fail."""
    config = SimConfig(
        **{
            "role": "decode",
            "ttft_ms": 150,
            "tpot_ms": 2,
            "kv_load_failure_policy": "recompute",
            **overrides,
        }
    )
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(config)), base_url="http://decode"
    )


async def prefill_params(prefill: httpx.AsyncClient, path: str = "chat") -> dict[str, Any]:
    body: dict[str, Any] = {"max_tokens": 1, "stream": False, "kv_transfer_params": TO_PREFILL}
    if path == "chat":
        body["messages"] = MESSAGES
    else:
        body["prompt"] = PROMPT
    reply = await prefill.post(f"/v1/{'chat/' if path == 'chat' else ''}completions", json=body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 1
    params: dict[str, Any] = reply.json()["kv_transfer_params"]
    return params


def ttft_sum(text: str) -> float:
    return metric(text, "vllm:time_to_first_token_seconds_sum")


async def test_prefill_returns_nixl_params_and_decode_skips_prefill(
    prefill: httpx.AsyncClient,
) -> None:
    params = await prefill_params(prefill)
    http_port = int(str(prefill.base_url).rsplit(":", 1)[1].rstrip("/"))
    blocks = math.ceil(count_tokens(PROMPT) / 16)
    # vLLM 0.33 NixlConnector's shape, key for key (pull_scheduler.request_finished)
    assert params == {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_block_ids": [list(range(blocks))],  # one list per KV-cache group
        "remote_engine_id": "prefill-A",
        "remote_request_id": params["remote_request_id"],
        "remote_host": "127.0.0.1",
        "remote_port": params["remote_port"],
        "tp_size": 1,
        "dcp_size": 1,
        "pp_size": 1,
        "remote_num_tokens": count_tokens(PROMPT),
        "remote_blocks_expiry_time": None,
        "remote_registration_generation": 0,
        "transfer_mode": "pull",
    }
    assert params["remote_request_id"].startswith("chatcmpl-")
    # the side channel is a port of its own, not the HTTP one
    assert isinstance(params["remote_port"], int) and params["remote_port"] != http_port
    text = await scrape(prefill)
    assert metric(text, "sage_sim:kv_transfer_params_sent_total") == 1
    assert metric(text, "sage_sim:kv_blocks_held") == blocks
    assert metric(text, "sage_sim:engine_info", role="prefill", kv_role="kv_producer") == 1

    async with decode_client() as decode:
        # the original request, streamed, with the prefill's params (what the proxy sends)
        reply = await decode.post(
            "/v1/chat/completions",
            json={
                "messages": MESSAGES,
                "max_tokens": 8,
                "stream": True,
                "kv_transfer_params": params,
            },
        )
        assert reply.status_code == 200
        events = sse_payloads(reply.text)
        text_out = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
        assert text_out == expected_text(PROMPT, 8)
        remote = await scrape(decode)
        assert (
            metric(
                remote,
                "sage_sim:kv_transfer_params_received_total",
                outcome="ok",
                remote_engine_id="prefill-A",
            )
            == 1
        )
        assert metric(remote, "sage_sim:kv_local_prefill_fallbacks_total") == 0

        # the same params again: the blocks were freed by the first pull → local prefill
        again = await decode.post(
            "/v1/chat/completions",
            json={"messages": MESSAGES, "max_tokens": 8, "kv_transfer_params": params},
        )
        assert again.json()["choices"][0]["message"]["content"] == expected_text(PROMPT, 8)
        assert again.json()["kv_transfer_params"] is None
        local = await scrape(decode)
        assert (
            metric(local, "sage_sim:kv_transfer_params_received_total", outcome="unknown_blocks")
            == 1
        )
        assert metric(local, "sage_sim:kv_local_prefill_fallbacks_total") == 1
        # the remote-prefill request's first token came far sooner than the local prefill's
        remote_ttft = ttft_sum(remote)
        assert remote_ttft < ttft_sum(local) - remote_ttft
    text = await scrape(prefill)
    assert metric(text, "sage_sim:kv_blocks_held") == 0
    assert metric(text, "sage_sim:kv_blocks_pulled") == blocks


async def test_completions_exchange_and_wrong_engine(prefill: httpx.AsyncClient) -> None:
    params = await prefill_params(prefill, "completions")
    async with decode_client(ttft_ms=0, tpot_ms=0) as decode:
        forged = {**params, "remote_engine_id": "someone-else"}
        reply = await decode.post(
            "/v1/completions",
            json={"prompt": PROMPT, "max_tokens": 5, "kv_transfer_params": forged},
        )
        assert reply.json()["choices"][0]["text"] == expected_text(PROMPT, 5)
        reply = await decode.post(
            "/v1/completions",
            json={"prompt": PROMPT, "max_tokens": 5, "kv_transfer_params": params},
        )
        assert reply.json()["choices"][0]["text"] == expected_text(PROMPT, 5)
        text = await scrape(decode)
    received = "sage_sim:kv_transfer_params_received_total"
    assert metric(text, received, outcome="wrong_engine") == 1
    assert metric(text, received, outcome="ok", remote_engine_id="prefill-A") == 1


async def test_expired_and_unreachable_blocks_fall_back_to_local_prefill(
    port_factory: Callable[[], int],
) -> None:
    port = port_factory()
    server, task = await serve(SimConfig(role="prefill", kv_hold_s=0.05), port)
    body: dict[str, Any] = {"messages": MESSAGES, "max_tokens": 3}
    try:
        async with (
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as prefill,
            decode_client(ttft_ms=0, tpot_ms=0) as decode,
        ):
            params = await prefill_params(prefill)
            for _ in range(100):  # bounded wait: the hold is 0.05 s
                if metric(await scrape(prefill), "sage_sim:kv_blocks_held") == 0:
                    break
                await asyncio.sleep(0.02)
            reply = await decode.post(
                "/v1/chat/completions", json={**body, "kv_transfer_params": params}
            )
            assert reply.json()["choices"][0]["message"]["content"] == expected_text(PROMPT, 3)
            server.should_exit = True
            await task
            # now the prefill engine is gone: its address refuses the pull
            reply = await decode.post(
                "/v1/chat/completions", json={**body, "kv_transfer_params": params}
            )
            assert reply.json()["choices"][0]["message"]["content"] == expected_text(PROMPT, 3)
            text = await scrape(decode)
    finally:
        server.should_exit = True
        await task
    received = "sage_sim:kv_transfer_params_received_total"
    assert metric(text, received, outcome="expired_blocks") == 1
    assert metric(text, received, outcome="unreachable") == 1
    assert metric(text, "sage_sim:kv_local_prefill_fallbacks_total") == 2


async def test_roles_honour_only_their_side(prefill: httpx.AsyncClient) -> None:
    async with decode_client(ttft_ms=0, tpot_ms=0) as decode:
        # a consumer never hands KV out: params are null and nothing is held
        reply = await decode.post(
            "/v1/chat/completions",
            json={"messages": MESSAGES, "max_tokens": 1, "kv_transfer_params": TO_PREFILL},
        )
        assert reply.status_code == 200 and reply.json()["kv_transfer_params"] is None
        assert metric(await scrape(decode), "sage_sim:kv_blocks_held") == 0
    params = await prefill_params(prefill)
    # a producer never loads remote KV: it prefills itself and leaves the blocks alone
    reply = await prefill.post(
        "/v1/chat/completions",
        json={"messages": MESSAGES, "max_tokens": 2, "kv_transfer_params": params},
    )
    assert reply.json()["choices"][0]["message"]["content"] == expected_text(PROMPT, 2)
    text = await scrape(prefill)
    assert metric(text, "sage_sim:kv_transfer_params_received_total") == 0
    assert metric(text, "sage_sim:kv_blocks_held") == len(params["remote_block_ids"])
    # a streamed prefill cannot return params: 400 naming the field, engine keeps serving
    bad = await prefill.post(
        "/v1/chat/completions",
        json={"messages": MESSAGES, "stream": True, "kv_transfer_params": TO_PREFILL},
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "kv_transfer_params.do_remote_decode"
    bad = await prefill.post(
        "/v1/completions",
        json={"prompt": PROMPT, "kv_transfer_params": {"do_remote_prefill": True}},
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "kv_transfer_params.remote_engine_id"
    assert (await prefill.get("/health")).status_code == 200


def test_both_nixl_shapes_parse_and_bad_groups_are_refused() -> None:
    new = parse_kv_transfer_params(
        prefill_reply_params("pf", "chatcmpl-1", (3, 4), "10.0.0.2", 5601, 20)
    )
    assert new is not None and new.remote_request_id == "chatcmpl-1"
    assert new.remote_block_ids == (3, 4) and new.remote_port == 5601
    # vLLM before 0.33: one flat list, no request id
    old = parse_kv_transfer_params(
        {
            "do_remote_prefill": True,
            "remote_engine_id": "pf",
            "remote_block_ids": [3, 4],
            "remote_host": "h",
            "remote_port": 5600,
            "tp_size": 1,
        }
    )
    assert old is not None and old.remote_block_ids == (3, 4) and old.remote_request_id is None
    bad_groups: list[Any] = [[[1, "x"]], [[1], 2], [[]]]
    for blocks in bad_groups:
        with pytest.raises(InvalidRequestError) as info:
            parse_kv_transfer_params({**TO_PREFILL, **_decode_fields(blocks)})
        assert info.value.param == "kv_transfer_params.remote_block_ids"


def _decode_fields(blocks: Any) -> dict[str, Any]:
    return {
        "do_remote_decode": False,
        "do_remote_prefill": True,
        "remote_engine_id": "pf",
        "remote_block_ids": blocks,
        "remote_host": "h",
        "remote_port": 5600,
    }


async def test_decode_loads_the_older_flat_shape_too(prefill: httpx.AsyncClient) -> None:
    params = await prefill_params(prefill)
    flat = {k: v for k, v in params.items() if k != "remote_request_id"}
    flat["remote_block_ids"] = params["remote_block_ids"][0]
    async with decode_client(ttft_ms=0, tpot_ms=0, kv_load_failure_policy="fail") as decode:
        reply = await decode.post(
            "/v1/chat/completions",
            json={"messages": MESSAGES, "max_tokens": 4, "kv_transfer_params": flat},
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == expected_text(PROMPT, 4)
        text = await scrape(decode)
    assert metric(text, "sage_sim:kv_transfer_params_received_total", outcome="ok") == 1


async def test_blocks_are_pulled_only_for_their_request(prefill: httpx.AsyncClient) -> None:
    params = await prefill_params(prefill)
    other = {**params, "remote_request_id": "chatcmpl-someone-else"}
    async with decode_client(ttft_ms=0, tpot_ms=0) as decode:
        for attempt in (other, params):
            reply = await decode.post(
                "/v1/chat/completions",
                json={"messages": MESSAGES, "max_tokens": 2, "kv_transfer_params": attempt},
            )
            assert reply.status_code == 200
        text = await scrape(decode)
    received = "sage_sim:kv_transfer_params_received_total"
    assert metric(text, received, outcome="unknown_blocks") == 1
    assert metric(text, received, outcome="ok") == 1  # the blocks were still there for it


async def test_vllms_default_policy_fails_the_request_when_kv_cannot_load(
    prefill: httpx.AsyncClient,
) -> None:
    params = await prefill_params(prefill)
    gone = {**params, "remote_engine_id": "not-this-one"}
    async with decode_client(ttft_ms=0, tpot_ms=0, kv_load_failure_policy="fail") as decode:
        reply = await decode.post(
            "/v1/chat/completions",
            json={"messages": MESSAGES, "max_tokens": 3, "kv_transfer_params": gone},
        )
        # vLLM: finish_reason error → GenerationError → 500, no silent local prefill
        assert reply.status_code == 500
        assert reply.json() == {
            "error": {
                "message": "Internal server error",
                "type": "InternalServerError",
                "param": None,
                "code": 500,
            }
        }
        # streamed, vLLM has answered 200 already: role chunk, the error event, [DONE]
        chat = await decode.post(
            "/v1/chat/completions",
            json={"messages": MESSAGES, "stream": True, "kv_transfer_params": gone},
        )
        events = sse_payloads(chat.text)
        assert chat.status_code == 200 and events[-1] == "[DONE]"
        assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert events[1]["error"]["type"] == "InternalServerError" and len(events) == 3
        completion = await decode.post(
            "/v1/completions",
            json={"prompt": PROMPT, "stream": True, "kv_transfer_params": gone},
        )
        events = sse_payloads(completion.text)
        assert events[0]["error"]["code"] == 500 and events[1:] == ["[DONE]"]
        text = await scrape(decode)
    assert metric(text, "vllm:request_success_total", finished_reason="error") == 3
    assert metric(text, "sage_sim:kv_local_prefill_fallbacks_total") == 0
    assert metric(text, "vllm:generation_tokens_total") == 0


async def test_side_channel_listens_where_configured(port_factory: Callable[[], int]) -> None:
    http_port, side_port = port_factory(), port_factory()
    server, task = await serve(
        SimConfig(role="prefill", kv_side_channel_port=side_port, kv_engine_id="pf-side"),
        http_port,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as prefill:
            params = await prefill_params(prefill)
            # the HTTP port serves no KV: the old HTTP pull route is gone
            assert (await prefill.post("/sim/kv/pull", json={})).status_code == 404
        assert (params["remote_host"], params["remote_port"]) == ("127.0.0.1", side_port)
        kv = parse_kv_transfer_params(params)
        assert kv is not None
        assert await pull_blocks(kv) is PullOutcome.OK
        assert await pull_blocks(kv) is PullOutcome.UNKNOWN_BLOCKS  # freed by the first
    finally:
        server.should_exit = True
        await task
    assert await pull_blocks(kv) is PullOutcome.UNREACHABLE


async def test_example_connector_finds_kv_by_prompt_without_params(tmp_path: Any) -> None:
    shared: dict[str, Any] = {
        "kv_connector": "example",
        "kv_shared_storage_path": str(tmp_path / "kv"),
        "kv_block_size": 4,
    }
    producer = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(SimConfig(role="prefill", **shared))),
        base_url="http://prefill",
    )
    async with producer, decode_client(ttft_ms=300, tpot_ms=2, **shared) as decode:
        # what the scheduler's prefill leg sends; ExampleConnector ignores the params
        leg = {"messages": MESSAGES, "max_tokens": 1, "kv_transfer_params": TO_PREFILL}
        reply = await producer.post("/v1/chat/completions", json=leg)
        assert reply.status_code == 200 and reply.json()["kv_transfer_params"] is None
        # the decode leg is the client's request as is: found by its prompt
        hit = await decode.post(
            "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4}
        )
        assert hit.json()["choices"][0]["message"]["content"] == expected_text(PROMPT, 4)
        other = [{"role": "user", "content": "something never prefilled by anyone before"}]
        miss = await decode.post("/v1/chat/completions", json={"messages": other, "max_tokens": 2})
        assert miss.status_code == 200
        text = await scrape(decode)
    tokens = count_tokens(PROMPT)
    missed = count_tokens(chat_prompt_text(other))
    # vLLM's counters, in tokens: both prompts were looked up; the hit loads whole blocks
    # of the prompt less its last token (ExampleConnector's align_to_block_size(n - 1))
    assert metric(text, "vllm:external_prefix_cache_queries_total") == tokens + missed
    assert metric(text, "vllm:external_prefix_cache_hits_total") == (tokens - 2) // 4 * 4 > 0
    # the hit skipped the 300 ms prefill; the miss paid it
    assert metric(text, "vllm:time_to_first_token_seconds_sum") < 0.3 + 0.25


def test_example_connector_hits_whole_blocks_of_the_prefix(tmp_path: Any) -> None:
    storage = SharedStorage(str(tmp_path), block_size=4)
    assert storage.hit_tokens("a b c d e") == 0  # under a block once the last token is out
    assert storage.hit_tokens("a b c d e f") == 4
    assert storage.hit_tokens(" ".join("w" * 11)) == 8


async def test_example_connector_prefix_match(tmp_path: Any) -> None:
    storage = SharedStorage(str(tmp_path), block_size=4)
    await storage.save("a b c d e f g")  # stores the first 4 tokens' KV
    assert await storage.load("a b c d e f x") == 4  # same first block: a hit, as in vLLM
    assert await storage.load("a b c x e f g") == 0
    await storage.save("a b c")  # too short to store anything
    assert await storage.load("a b c") == 0


def test_example_connector_needs_its_folder() -> None:
    with pytest.raises(ConfigurationError, match="kv_shared_storage_path"):
        SimConfig(kv_connector="example")
