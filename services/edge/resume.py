"""Continuing a streamed reply on another scheduler replica when the one serving it dies.

The scheduler already continues a stream whose engine dies on another engine, from what the
client was sent (services/scheduler/resume.py); this is the same rule one hop out, for a
stream whose scheduler dies. The edge holds only what the client was sent, so it continues
from the text: chat sends it back as a final assistant message with vLLM's
`continue_final_message`, completions append it to the prompt; token limits shrink by the
tokens already sent (one per content chunk, as vLLM streams them). The continuation's chunks
are rewritten into the first stream's (its id/created/model, no second role chunk, usage
counting the sent tokens as completion), so the client reads one stream.

Continued are the replies the scheduler continues: one choice, no echo, plain text (no
tools, structured output or reasoning). The Responses and Messages event streams are not.
"""

from __future__ import annotations

from typing import Any

import orjson

_CHAT_LIMITS = ("max_completion_tokens", "max_tokens")
# Replies that are more than text: a restart would not continue them but begin again.
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


class StreamContinuation:
    """What the client was sent of one streamed single-choice reply, and the request that
    asks another replica for the rest."""

    def __init__(self, chat: bool, request: dict[str, Any]) -> None:
        self.chat = chat
        self.request = request
        self.parts: list[str] = []
        self.tokens = 0  # content chunks sent
        self.finished = False  # a finish_reason reached the client: nothing is missing
        self.head: dict[str, Any] = {}
        self.prefix_tokens = 0  # tokens the current continuation was given as prefix
        self.text_offset = 0  # completions logprobs: where the continuation's text starts

    @classmethod
    def for_request(cls, chat: bool, body: bytes) -> StreamContinuation | None:
        """A tracker for this request; None when its reply cannot be continued."""
        try:
            doc: Any = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(doc, dict) or doc.get("n") not in (None, 1) or doc.get("echo"):
            return None
        if any(doc.get(key) for key in _NOT_PLAIN_TEXT):
            return None
        if chat:
            ok = isinstance(doc.get("messages"), list) and bool(doc["messages"])
        else:
            prompt = doc.get("prompt")
            ok = isinstance(prompt, str) or (
                isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str)
            )
        return cls(chat, doc) if ok else None

    def _account(self, choice: dict[str, Any]) -> None:
        if self.chat:
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else None
        else:
            text = choice.get("text")
        if isinstance(text, str) and text:
            self.parts.append(text)
            self.tokens += 1
        if choice.get("finish_reason"):
            self.finished = True

    def absorb(self, payload: bytes) -> None:
        """Account one payload the client was sent by the first replica."""
        try:
            doc: Any = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(doc, dict):
            return
        if not self.head:
            self.head = {k: doc[k] for k in ("id", "created", "model") if k in doc}
        for choice in doc.get("choices") or ():
            if isinstance(choice, dict):
                self._account(choice)

    @property
    def text(self) -> str:
        """The generated text the client has received so far."""
        return "".join(self.parts)

    def _limit_key(self) -> str | None:
        for key in _CHAT_LIMITS if self.chat else ("max_tokens",):
            limit = self.request.get(key)
            if isinstance(limit, int) and not isinstance(limit, bool):
                return key
        return None

    @property
    def exhausted(self) -> bool:
        """True when the token limit is used up: nothing is left to ask for."""
        key = self._limit_key()
        return key is not None and self.request[key] - self.tokens <= 0

    def continuation(self) -> bytes:
        """The request body asking for the rest of the reply."""
        produced = self.tokens
        self.prefix_tokens = produced
        text = self.text
        self.text_offset = len(text)
        doc = dict(self.request)
        key = self._limit_key()
        if key is not None:
            doc[key] = doc[key] - produced
        minimum = doc.get("min_tokens")
        if isinstance(minimum, int) and not isinstance(minimum, bool) and minimum:
            doc["min_tokens"] = max(0, minimum - produced)
        # A PD decode leg's KV blocks were single-use: the next engine prefills itself.
        doc.pop("kv_transfer_params", None)
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
        """A continuation's payload as part of the client's stream (None: drop it)."""
        try:
            doc: Any = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return payload
        if not isinstance(doc, dict):
            return payload
        choices = doc.get("choices") or []
        first = choices[0] if choices and isinstance(choices[0], dict) else None
        if first is not None:
            if self.chat:
                delta = first.get("delta")
                if (
                    isinstance(delta, dict)
                    and "role" in delta
                    and not delta.get("content")
                    and not first.get("finish_reason")
                ):
                    return None  # the client already had the role chunk
            else:
                self._shift_offsets(first)
                if "prompt_token_ids" in first:
                    first["prompt_token_ids"] = None  # the client had its prompt's ids
            self._account(first)
        doc.update(self.head)
        usage = doc.get("usage")
        if isinstance(usage, dict):
            # The sent tokens were prompt to this continuation; count them as completion,
            # as the client saw them.
            produced = self.prefix_tokens
            usage["completion_tokens"] = int(usage.get("completion_tokens") or 0) + produced
            usage["prompt_tokens"] = max(0, int(usage.get("prompt_tokens") or 0) - produced)
            if "total_tokens" in usage:
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return orjson.dumps(doc)

    def _shift_offsets(self, choice: dict[str, Any]) -> None:
        """Completions logprobs count text offsets from the continuation's own start."""
        logprobs = choice.get("logprobs")
        if not isinstance(logprobs, dict) or not self.text_offset:
            return
        offsets = logprobs.get("text_offset")
        if isinstance(offsets, list):
            logprobs["text_offset"] = [
                o + self.text_offset if isinstance(o, int) else o for o in offsets
            ]

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
