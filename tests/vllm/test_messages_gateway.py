"""Anthropic's Messages API through the gateway to real vLLM (its /v1/messages), with the
official `anthropic` SDK: a reply, the event stream, and an unknown model's 404 in
Anthropic's shape."""

from __future__ import annotations

import anthropic
import pytest

from tests.vllm.conftest import VllmStack

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]

HELLO = [{"role": "user", "content": "Tell me about the sea."}]


def test_sdk_messages_through_the_gateway(vllm_stack: VllmStack) -> None:
    # No API keys on this stack: the SDK still sends one (x-api-key), which is ignored.
    with anthropic.Anthropic(
        base_url=vllm_stack.gateway, api_key="unused", max_retries=0, timeout=120
    ) as client:
        message = client.messages.create(
            model=vllm_stack.model,
            max_tokens=4,
            system="You are terse.",
            messages=HELLO,  # type: ignore[arg-type]
        )
        assert message.type == "message" and message.role == "assistant"
        assert message.content and message.content[0].type == "text"
        assert message.usage.input_tokens > 0 and 0 < message.usage.output_tokens <= 4
        assert message.stop_reason in ("max_tokens", "end_turn")

        with client.messages.stream(
            model=vllm_stack.model,
            max_tokens=4,
            messages=HELLO,  # type: ignore[arg-type]
        ) as stream:
            kinds = [event.type for event in stream]
            final = stream.get_final_message()
        assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
        assert "message_delta" in kinds
        assert 0 < final.usage.output_tokens <= 4 and final.stop_reason is not None

        with pytest.raises(anthropic.NotFoundError) as missing:
            client.messages.create(
                model="no-such-model",
                max_tokens=4,
                messages=HELLO,  # type: ignore[arg-type]
            )
        assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
