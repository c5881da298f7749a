"""Mid-stream failover: continue a streamed reply on another engine where the first stopped.

When an engine dies after some chunks went to the client, the request is sent again to
another engine with the text already sent as a prefix (chat: a final assistant message with
vLLM's `continue_final_message`; completions: appended to the prompt) and `max_tokens`
reduced by the tokens already produced. The new engine's chunks are rewritten to carry the
first stream's id/created/model, and its role chunk is dropped, so the client reads one stream.

On the normal path this costs one parse of the request and of each payload (orjson, a few
microseconds), so only the text sent so far is kept, never the payloads.
"""

from __future__ import annotations

from typing import Any

import orjson

_CHAT_LIMITS = ("max_completion_tokens", "max_tokens")
# Replies that are more than text: a restart would not continue them but begin again (a
# second tool call, repeated reasoning, JSON that restarts under guided decoding).
_NOT_PLAIN_TEXT = (
    "tools",
    "functions",
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structured_outputs",
    "reasoning_effort",
)


def _choice_text(choice: Any, chat: bool) -> str:
    if not isinstance(choice, dict):
        return ""
    if chat:
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else None
    else:
        text = choice.get("text")
    return text if isinstance(text, str) else ""


class StreamResume:
    """What the client has seen of one streamed single-choice reply, and how to ask another
    engine for the rest of it."""

    def __init__(self, path: str, request: dict[str, Any]) -> None:
        self.chat = path.endswith("/chat/completions")
        self.request = request
        self.parts: list[str] = []
        self.tokens = 0  # content chunks sent; one token each, as vLLM streams them
        self.finished = False  # a finish_reason reached the client: nothing is missing
        self.head: dict[str, Any] = {}
        self.prefix_tokens = 0  # tokens the current engine was given as prefix

    @classmethod
    def for_request(cls, path: str, body: bytes) -> StreamResume | None:
        """A tracker for this request; None when it cannot be continued from its text
        (several choices, echo, token-id prompts, tool calls, structured or reasoning
        output)."""
        try:
            doc: Any = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(doc, dict) or doc.get("n") not in (None, 1) or doc.get("echo"):
            return None
        if any(doc.get(key) for key in _NOT_PLAIN_TEXT):
            return None
        if path.endswith("/chat/completions"):
            ok = isinstance(doc.get("messages"), list) and bool(doc["messages"])
        else:
            prompt = doc.get("prompt")
            ok = isinstance(prompt, str) or (
                isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str)
            )
        return cls(path, doc) if ok else None

    def absorb(self, payload: bytes) -> None:
        """Account one payload the client was sent."""
        try:
            doc: Any = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(doc, dict):
            return
        if not self.head:
            self.head = {k: doc[k] for k in ("id", "created", "model") if k in doc}
        for choice in doc.get("choices") or ():
            text = _choice_text(choice, self.chat)
            if text:
                self.parts.append(text)
                self.tokens += 1
            if isinstance(choice, dict) and choice.get("finish_reason"):
                self.finished = True

    @property
    def text(self) -> str:
        """The generated text the client has received so far."""
        return "".join(self.parts)

    def _remaining(self, doc: dict[str, Any]) -> bool:
        """Reduce the token limit by what was produced; False when nothing is left to make."""
        for key in _CHAT_LIMITS if self.chat else ("max_tokens",):
            limit = doc.get(key)
            if isinstance(limit, int) and not isinstance(limit, bool):
                left = limit - self.tokens
                doc[key] = left
                return left > 0
        return True

    def continuation(self) -> bytes | None:
        """The request for the rest of the reply; None when the token limit is used up."""
        doc = dict(self.request)
        # A PD decode leg's KV blocks were single-use: the next engine prefills itself.
        doc.pop("kv_transfer_params", None)
        if not self._remaining(doc):
            return None
        text = self.text
        self.prefix_tokens = self.tokens
        if self.chat:
            messages = list(doc["messages"])
            last = messages[-1]
            if (
                doc.get("continue_final_message")
                and isinstance(last, dict)
                and last.get("role") == "assistant"
                and isinstance(last.get("content"), str)
            ):
                messages[-1] = {**last, "content": last["content"] + text}
            else:
                messages.append({"role": "assistant", "content": text})
            doc["messages"] = messages
            doc["continue_final_message"] = True
            doc["add_generation_prompt"] = False
        else:
            prompt = doc["prompt"]
            doc["prompt"] = prompt + text if isinstance(prompt, str) else [prompt[0] + text]
        return orjson.dumps(doc)

    def rewrite(self, payload: bytes) -> bytes | None:
        """A continuing engine's payload as part of the client's stream (None: drop it)."""
        try:
            doc: Any = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return payload
        if not isinstance(doc, dict):
            return payload
        choices = doc.get("choices") or []
        if self.chat and choices:
            delta = choices[0].get("delta") if isinstance(choices[0], dict) else None
            if (
                isinstance(delta, dict)
                and "role" in delta
                and not delta.get("content")
                and not choices[0].get("finish_reason")
            ):
                return None  # the client already had the role chunk
        doc.update(self.head)
        usage = doc.get("usage")
        if isinstance(usage, dict):
            # The sent text was prompt to this engine; count it as completion, as the client saw.
            produced = self.prefix_tokens
            usage["completion_tokens"] = int(usage.get("completion_tokens") or 0) + produced
            usage["prompt_tokens"] = max(0, int(usage.get("prompt_tokens") or 0) - produced)
        out = orjson.dumps(doc)
        self.absorb(out)
        return out

    def closing_chunk(self) -> bytes:
        """A last chunk saying the reply reached its token limit."""
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": "length"}
        if self.chat:
            choice["delta"] = {}
        else:
            choice["text"] = ""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        self.finished = True
        return orjson.dumps({**self.head, "object": obj, "choices": [choice]})
