"""OpenAI's Responses API (POST /v1/responses) through the gateway to real vLLM, with the
official openai SDK and our client's responses(): a reply with text and usage, the named
event stream, and the gateway's own refusals (previous_response_id, unknown model) in
OpenAI's error shape."""

from __future__ import annotations

import httpx
import openai
import pytest

from sage.llm import UnifiedInferenceClient
from tests.vllm.conftest import VllmStack

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]


def _client(stack: VllmStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.gateway + "/v1", api_key="unused", max_retries=0)


def test_reply_and_event_stream(vllm_stack: VllmStack) -> None:
    sdk = _client(vllm_stack)
    reply = sdk.responses.create(
        model=vllm_stack.model,
        instructions="You are terse.",
        input="say something about batching",
        max_output_tokens=8,
        temperature=0,
    )
    assert reply.object == "response"
    assert reply.output and reply.output[-1].type == "message"
    assert reply.usage is not None and 0 < reply.usage.output_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.input_tokens + reply.usage.output_tokens

    kinds: list[str] = []
    deltas = ""
    final = None
    for event in sdk.responses.create(
        model=vllm_stack.model,
        input=[{"role": "user", "content": "say something about batching"}],
        max_output_tokens=8,
        temperature=0,
        stream=True,
    ):
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            deltas += event.delta
        if event.type == "response.completed":
            final = event.response
    assert kinds[0] == "response.created"
    assert kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds
    assert final is not None and final.output_text == deltas


def test_events_named_as_the_engine_names_them(vllm_stack: VllmStack) -> None:
    body = {"model": vllm_stack.model, "input": "hi", "max_output_tokens": 4, "stream": True}
    with httpx.stream("POST", vllm_stack.gateway + "/v1/responses", json=body, timeout=60) as r:
        assert r.status_code == 200
        text = r.read().decode()
    blocks = [b for b in text.split("\n\n") if b.strip()]
    for block in blocks:
        name, data = block.split("\n", 1)
        assert name.startswith("event: ") and data.startswith("data: ")
        assert f'"type":"{name[len("event: ") :]}"' in data.replace(" ", "")
    assert "[DONE]" not in text


def test_refusals_in_openai_shape(vllm_stack: VllmStack) -> None:
    sdk = _client(vllm_stack)
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.responses.create(model=vllm_stack.model, input="x", previous_response_id="resp_1")
    assert bad.value.param == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        sdk.responses.create(model="no-such-model", input="x")


def test_clients_responses_read_vllms_reply_and_events(vllm_stack: VllmStack) -> None:
    question = "say something about batching"
    sdk_reply = _client(vllm_stack).responses.create(
        model=vllm_stack.model, input=question, max_output_tokens=8, temperature=0
    )
    with UnifiedInferenceClient.create(control_plane_url=vllm_stack.gateway) as client:
        reply = client.responses(
            question, model=vllm_stack.model, max_output_tokens=8, temperature=0
        )
        with client.responses(
            [{"role": "user", "content": question}],
            model=vllm_stack.model,
            max_output_tokens=8,
            temperature=0,
            stream=True,
        ) as stream:
            events = list(stream)
    # Greedy decoding of the same request: the SDK's reading and ours agree.
    assert reply.output_text == sdk_reply.output_text and reply.output_text
    assert reply.status == sdk_reply.status and reply.id.startswith("resp")
    assert reply.usage is not None and sdk_reply.usage is not None
    assert reply.usage.output_tokens == sdk_reply.usage.output_tokens
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    final = stream.response
    assert final is not None and final is events[-1].response
    assert final.output_text == "".join(e.delta or "" for e in events) == stream.output_text
