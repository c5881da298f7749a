"""PD (prefill/decode) routing end to end: the real edge and scheduler in front of sim engine
processes playing vLLM's NixlConnector roles, exchanging real `kv_transfer_params`, and
ExampleConnector's, which exchange none."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families

from sage.common.grpc import process_token
from sage.common.security import engine_api_key
from sage.engines.sim import chat_prompt_text, count_tokens, expected_text
from sage.rpc.common.v1 import common_pb2

MESSAGES = [{"role": "user", "content": "explain disaggregated prefill in one line"}]
PROMPT = chat_prompt_text(MESSAGES)
RECEIVED = "sage_sim:kv_transfer_params_received_total"


def metric(text: str, sample: str, **labels: str) -> float:
    """The sum of the samples named `sample` whose labels include `labels` (0 if none)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                total += float(s.value)
    return total


async def scrape(client: Any, base_url: str, engine_id: str = "") -> str:
    """An engine's /metrics; `engine_id` for one lifecycle started (it requires its key)."""
    headers = {}
    if engine_id:
        headers["Authorization"] = f"Bearer {engine_api_key(process_token(), engine_id)}"
    reply = await client.get(f"{base_url}/metrics", headers=headers)
    assert reply.status_code == 200
    text: str = reply.text
    return text


def streamed_text(body: str) -> tuple[str, dict[str, Any] | None]:
    """The content of a chat SSE body and its usage chunk."""
    content, usage = "", None
    for line in body.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = orjson.loads(line[len("data: ") :])
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk["choices"]:
            content += choice["delta"].get("content") or ""
    return content, usage


async def test_requests_go_prefill_then_decode_with_kv_params(
    no_leaked_children: None, control_plane: Any, sim_engine: Callable[..., str]
) -> None:
    # prefill is expensive (300 ms), a decode step cheap (5 ms): a decode that really got
    # the prefill's KV answers its first token far sooner than a local prefill would.
    prefill = sim_engine("--role", "prefill", "--kv-engine-id", "pf-1", "--ttft-ms", "300")
    decode = sim_engine(
        "--role", "decode", "--kv-engine-id", "dc-1", "--ttft-ms", "300", "--tpot-ms", "5"
    )
    await control_plane.register("pf", "sim", prefill, role=common_pb2.ENGINE_ROLE_PREFILL)
    await control_plane.register("dc", "sim", decode, role=common_pb2.ENGINE_ROLE_DECODE)
    client = control_plane.client

    reply = await client.post(
        "/v1/chat/completions", json={"model": "sim", "messages": MESSAGES, "max_tokens": 12}
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == expected_text(PROMPT, 12)
    # usage is the decode engine's, for the client's whole request (not the 1-token prefill)
    assert reply.json()["usage"]["completion_tokens"] == 12
    assert reply.json()["kv_transfer_params"] is None  # decode answers null, as vLLM does

    streamed = await client.post(
        "/v1/chat/completions",
        json={
            "model": "sim",
            "messages": MESSAGES,
            "max_tokens": 7,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert streamed.status_code == 200
    content, usage = streamed_text(streamed.text)
    assert content == expected_text(PROMPT, 7)
    assert usage is not None and usage["completion_tokens"] == 7

    completion = await client.post(
        "/v1/completions", json={"model": "sim", "prompt": PROMPT, "max_tokens": 5}
    )
    assert completion.status_code == 200
    assert completion.json()["choices"][0]["text"] == expected_text(PROMPT, 5)

    decode_text = await scrape(client, decode)
    prefill_text = await scrape(client, prefill)
    # every request's decode loaded the KV blocks the prefill engine handed out
    assert metric(decode_text, RECEIVED, outcome="ok", remote_engine_id="pf-1") == 3
    assert metric(decode_text, "sage_sim:kv_local_prefill_fallbacks_total") == 0
    assert metric(prefill_text, "sage_sim:kv_transfer_params_sent_total") == 3
    assert metric(prefill_text, "sage_sim:kv_blocks_held") == 0
    assert metric(prefill_text, "sage_sim:kv_blocks_pulled") >= 3
    # the prefill engine produced one token per request; decode produced the answers
    assert metric(prefill_text, "vllm:generation_tokens_total") == 3
    assert metric(decode_text, "vllm:generation_tokens_total") == 12 + 7 + 5
    ttft = "vllm:time_to_first_token_seconds_sum"
    assert metric(decode_text, ttft) < metric(prefill_text, ttft) / 2
    # and the scheduler counted the exchange and the client-facing TTFT of the stream
    edge = (await client.get("/metrics")).text
    assert metric(edge, "sage:scheduler_pd_requests_total", outcome="kv_transfer") == 3
    assert metric(edge, "sage:scheduler_time_to_first_token_seconds_count") == 1


async def test_example_connector_style_decode_leg_resends_the_request(
    no_leaked_children: None, control_plane: Any, sim_engine: Callable[..., str], tmp_path: Any
) -> None:
    # ExampleConnector's style: the prefill reply has no kv_transfer_params; the KV waits
    # in a folder both engines share and the decode engine finds it by the prompt.
    shared = (
        *("--kv-connector", "example", "--kv-block-size", "2"),
        *("--kv-shared-storage-path", str(tmp_path / "kv")),
    )
    prefill = sim_engine("--role", "prefill", "--ttft-ms", "300", *shared)
    decode = sim_engine("--role", "decode", "--ttft-ms", "300", "--tpot-ms", "5", *shared)
    await control_plane.register("pf", "sim", prefill, role=common_pb2.ENGINE_ROLE_PREFILL)
    await control_plane.register("dc", "sim", decode, role=common_pb2.ENGINE_ROLE_DECODE)
    client = control_plane.client

    reply = await client.post(
        "/v1/chat/completions", json={"model": "sim", "messages": MESSAGES, "max_tokens": 9}
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == expected_text(PROMPT, 9)
    streamed = await client.post(
        "/v1/chat/completions",
        json={"model": "sim", "messages": MESSAGES, "max_tokens": 5, "stream": True},
    )
    assert streamed_text(streamed.text)[0] == expected_text(PROMPT, 5)

    decode_text = await scrape(client, decode)
    prefill_text = await scrape(client, prefill)
    # the decode engine's external cache hits prove the KV moved (vLLM's counters, in
    # tokens: whole blocks of each prompt less its last token)
    tokens = count_tokens(PROMPT)
    queried = metric(decode_text, "vllm:external_prefix_cache_queries_total")
    assert queried == 2 * tokens
    per_request = (tokens - 2) // 2 * 2  # --kv-block-size 2
    assert metric(decode_text, "vllm:external_prefix_cache_hits_total") == 2 * per_request > 0
    assert metric(prefill_text, "vllm:generation_tokens_total") == 2  # one token a leg
    assert metric(decode_text, "vllm:generation_tokens_total") == 9 + 5
    ttft = "vllm:time_to_first_token_seconds_sum"
    assert metric(decode_text, ttft) < metric(prefill_text, ttft) / 2
    edge = (await client.get("/metrics")).text
    assert metric(edge, "sage:scheduler_pd_requests_total", outcome="no_kv_params") == 2


async def test_prefill_failure_falls_back_to_decode_doing_the_whole_request(
    no_leaked_children: None,
    control_plane: Any,
    sim_engine: Callable[..., str],
    port_factory: Callable[[], int],
) -> None:
    decode = sim_engine("--role", "decode")
    both = sim_engine("--role", "both")
    dead = f"http://127.0.0.1:{port_factory()}"  # nothing listens there
    await control_plane.register("pf-dead", "sim", dead, role=common_pb2.ENGINE_ROLE_PREFILL)
    await control_plane.register("dc", "sim", decode, role=common_pb2.ENGINE_ROLE_DECODE)
    client = control_plane.client

    for stream in (False, True):
        reply = await client.post(
            "/v1/chat/completions",
            json={"model": "sim", "messages": MESSAGES, "max_tokens": 6, "stream": stream},
        )
        assert reply.status_code == 200, reply.text
        if stream:
            assert streamed_text(reply.text)[0] == expected_text(PROMPT, 6)
        else:
            assert reply.json()["choices"][0]["message"]["content"] == expected_text(PROMPT, 6)
    decode_text = await scrape(client, decode)
    assert metric(decode_text, "vllm:generation_tokens_total") == 12  # decode did both
    assert metric(decode_text, RECEIVED) == 0  # ... without any remote KV
    edge = (await client.get("/metrics")).text
    assert metric(edge, "sage:scheduler_pd_requests_total", outcome="prefill_failed") == 2

    # with the decode engine gone too, a both-role engine serves the whole request
    await control_plane.register("both", "sim", both, role=common_pb2.ENGINE_ROLE_BOTH)
    await control_plane.register(
        "dc", "sim", f"http://127.0.0.1:{port_factory()}", role=common_pb2.ENGINE_ROLE_DECODE
    )
    reply = await client.post(
        "/v1/completions", json={"model": "sim", "prompt": PROMPT, "max_tokens": 4}
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"] == expected_text(PROMPT, 4)
    assert metric(await scrape(client, both), "vllm:generation_tokens_total") == 4


async def test_lifecycle_starts_engines_with_roles(
    no_leaked_children: None, full_plane: Any
) -> None:
    client = full_plane.client
    started: dict[str, dict[str, Any]] = {}
    for role in ("prefill", "decode"):
        reply = await client.post(
            "/v1/management/engines",
            json={"model_id": "sim", "backend": "sim", "role": role, "engine_id": f"sim-{role}"},
        )
        assert reply.status_code == 201, reply.text
        assert reply.json()["role"] == role
        started[role] = reply.json()
    listed = (await client.get("/v1/management/engines")).json()["engines"]
    assert {e["engine_id"]: e["role"] for e in listed} == {
        "sim-prefill": "prefill",
        "sim-decode": "decode",
    }
    bad = await client.post(
        "/v1/management/engines", json={"model_id": "sim", "backend": "sim", "role": "middle"}
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "role"

    reply = await client.post(
        "/v1/chat/completions", json={"model": "sim", "messages": MESSAGES, "max_tokens": 3}
    )
    assert reply.json()["choices"][0]["message"]["content"] == expected_text(PROMPT, 3)
    decode_text = await scrape(client, started["decode"]["base_url"], "sim-decode")
    prefill_text = await scrape(client, started["prefill"]["base_url"], "sim-prefill")
    assert metric(prefill_text, "sage_sim:engine_info", role="prefill", kv_role="kv_producer") == 1
    assert metric(decode_text, RECEIVED, outcome="ok") == 1
