"""Prefill/decode disaggregation on two real vLLM engines started through lifecycle.

A prefill engine (management API, `role`) and a decode engine (`sage llm engine start
--role decode`) for `tiny-pd`, a copy of the stack's model (conftest starts them in the
background while earlier modules run; a model of their own keeps PD routing off the stack's
model), which lifecycle starts with vLLM's ExampleConnector (kv_producer / kv_consumer over a shared
folder; NixlConnector where the `nixl` package is installed, not here). The scheduler runs
the prefill leg (`max_tokens` 1, `kv_transfer_params.do_remote_decode`) on the producer;
ExampleConnector answers with no `kv_transfer_params` (the KV is found by prompt), so the
client's request goes to the consumer as is. The consumer's own
`vllm:external_prefix_cache_hits_total` shows it loaded the producer's KV instead of
prefilling, and the reply equals the same request on the stack's one (role both) engine.

The other connector style, `kv_transfer_params` in the prefill reply (NixlConnector), needs
nixl: tests/unit/scheduler_routing/test_pd.py and tests/integration cover it on the sim,
whose params follow vLLM 0.33's NixlConnector shape (tests/vllm/test_conformance.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.vllm.conftest import VllmStack, engine_counter, sse, stop_engine

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(420)]

# ~300 WordPiece tokens: two whole 128-token blocks for the connector to move, and a prompt
# no other module sends (so no engine has it cached beforehand).
PROMPT = "a stitch in time saves nine when the tide waits for no one " * 24
EXTERNAL_HITS = "vllm:external_prefix_cache_hits_total"


def pd_requests(stack: VllmStack) -> dict[str, float]:
    """The scheduler's sage:scheduler_pd_requests by outcome, from the gateway's /metrics."""
    text = httpx.get(stack.gateway + "/metrics", headers=stack.admin(), timeout=30).text
    return {
        sample.labels["outcome"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "sage:scheduler_pd_requests_total" and "outcome" in sample.labels
    }


@pytest.fixture(scope="module")
def pd_pair(vllm_stack: VllmStack) -> Iterator[dict[str, dict[str, Any]]]:
    """The prefill and decode engines conftest started in the background; stopped at the
    end of the module."""
    engines: dict[str, dict[str, Any]] = vllm_stack.background["pd_pair"].result()
    try:
        yield engines
    finally:
        for engine in engines.values():
            stop_engine(vllm_stack, engine)


def direct(stack: VllmStack, path: str, body: dict[str, Any]) -> httpx.Response:
    """The request straight to the stack's own (role both) engine, with its key."""
    return httpx.post(
        stack.engine_url + path,
        json=body,
        headers={"Authorization": f"Bearer {stack.engine_key}"},
        timeout=120,
    )


def test_lifecycle_starts_the_roles_with_a_connector(
    vllm_stack: VllmStack, pd_pair: dict[str, dict[str, Any]]
) -> None:
    for role, engine in pd_pair.items():
        assert engine["role"] == role and engine["backend"] == "vllm", engine
        log = vllm_stack.home / "llm" / "logs" / f"{engine['engine_id']}.log"
        text = log.read_text(errors="replace")
        # vLLM logs the connector it built; without one it says "no KVConnector found".
        assert "ExampleConnector" in text, text[-2000:]


def test_completion_goes_prefill_then_decode_and_the_kv_moves(
    vllm_stack: VllmStack, pd_pair: dict[str, dict[str, Any]]
) -> None:
    body = {"model": vllm_stack.model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    # The one-engine reference: asked twice, the second from its own prefix cache, which is
    # the decode engine's situation (whole blocks loaded, the rest computed).
    direct(vllm_stack, "/v1/completions", body).raise_for_status()
    reference = direct(vllm_stack, "/v1/completions", body)
    reference.raise_for_status()

    decode_url = str(pd_pair["decode"]["base_url"])
    prefill_url = str(pd_pair["prefill"]["base_url"])
    hits_before = engine_counter(decode_url, EXTERNAL_HITS)
    prefill_before = engine_counter(prefill_url, "vllm:prompt_tokens_total")
    outcomes_before = pd_requests(vllm_stack)
    pd_model = pd_pair["prefill"]["model_id"]
    reply = httpx.post(
        vllm_stack.gateway + "/v1/completions", json={**body, "model": pd_model}, timeout=120
    )
    assert reply.status_code == 200, reply.text
    doc = reply.json()
    assert doc["usage"]["prompt_tokens"] >= 257, doc["usage"]
    assert doc["usage"]["completion_tokens"] == 12
    # The producer prefilled the prompt; the consumer loaded at least its 2 whole blocks.
    assert engine_counter(prefill_url, "vllm:prompt_tokens_total") - prefill_before >= 257
    assert engine_counter(decode_url, EXTERNAL_HITS) - hits_before >= 256
    outcomes = pd_requests(vllm_stack)
    grew = outcomes.get("no_kv_params", 0) - outcomes_before.get("no_kv_params", 0)
    assert grew == 1, (outcomes_before, outcomes)
    assert doc["choices"][0]["text"] == reference.json()["choices"][0]["text"]


def test_streamed_chat_through_pd_equals_one_engine(
    vllm_stack: VllmStack, pd_pair: dict[str, dict[str, Any]]
) -> None:
    messages = [{"role": "user", "content": PROMPT.replace("stitch", "needle")}]
    body = {"model": vllm_stack.model, "messages": messages, "max_tokens": 10, "temperature": 0}
    direct(vllm_stack, "/v1/chat/completions", body).raise_for_status()
    reference = direct(vllm_stack, "/v1/chat/completions", body).json()
    decode_url = str(pd_pair["decode"]["base_url"])
    hits_before = engine_counter(decode_url, EXTERNAL_HITS)
    reply = httpx.post(
        vllm_stack.gateway + "/v1/chat/completions",
        json={
            **body,
            "model": pd_pair["decode"]["model_id"],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    events = sse(reply.text)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events if isinstance(e, dict)]
    assert not [c for c in chunks if "error" in c], chunks
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert chunks[-1]["usage"]["completion_tokens"] == 10
    assert engine_counter(decode_url, EXTERNAL_HITS) - hits_before >= 256
    assert text == reference["choices"][0]["message"]["content"]
