"""Continuing a streamed chat or completion reply elsewhere from the text its client was sent.

Two hops continue a stream that broke mid-way: the scheduler, when the engine serving it dies
(services/scheduler/resume.py, which continues from token ids where the engine allows), and
the edge, when the scheduler replica serving it dies (services/edge/resume.py). Both know
what the client was sent; these are the rules they share for continuing from it as text.
Chat sends it back as a final assistant message with vLLM's `continue_final_message`,
completions append it to the prompt; token limits (and `min_tokens`) shrink by the tokens
already sent (one per content chunk, as vLLM streams them). The continuation's chunks are
rewritten into the first stream's (its id/created/model, no second role chunk, usage counting
the sent tokens as completion, completions logprobs offsets from the reply's start), so the
client reads one stream.

Continued are the replies a restart would continue rather than begin again (`continuable`):
one choice, no echo, a text prompt, plain text (no tools, structured output or reasoning).
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


def continuable(chat: bool, doc: Any) -> bool:
    """Whether the request `doc` (its parsed JSON) asks for a reply that can be continued
    from its text (module doc); `doc` is read, never changed."""
    if not isinstance(doc, dict) or doc.get("n") not in (None, 1) or doc.get("echo"):
        return False
    if any(doc.get(key) for key in _NOT_PLAIN_TEXT):
        return False
    if chat:
        return isinstance(doc.get("messages"), list) and bool(doc["messages"])
    prompt = doc.get("prompt")
    return isinstance(prompt, str) or (
        isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str)
    )


def _json_object(payload: bytes) -> dict[str, Any] | None:
    """A payload's JSON object; None for anything else, which passes through untouched."""
    try:
        doc: Any = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


class TextContinuation:
    """What the client was sent of one streamed single-choice reply, and the request that
    asks for the rest of it from that text.

    A subclass that continues another way too (the scheduler's token ids) extends the hooks:
    `produced`, `_absorb`, `_account` and `_rewrite_chunk`.
    """

    def __init__(self, chat: bool, request: dict[str, Any]) -> None:
        self.chat = chat
        self.request = request
        self.parts: list[str] = []
        self.tokens = 0  # content chunks sent; one token each, as vLLM streams them
        self.finished = False  # a finish_reason reached the client: nothing is missing
        self.head: dict[str, Any] = {}
        self.prefix_tokens = 0  # tokens the current continuation was given as prefix
        self.text_offset = 0  # completions logprobs: where the continuation's text starts

    def absorb(self, payload: bytes) -> bytes:
        """Account one payload of the first stream; returns it as the client is to see it."""
        doc = _json_object(payload)
        return payload if doc is None else self._absorb(doc, payload)

    def _absorb(self, doc: dict[str, Any], payload: bytes) -> bytes:
        """absorb for a payload whose JSON object is `doc`."""
        if not self.head:
            self.head = {k: doc[k] for k in ("id", "created", "model") if k in doc}
        for choice in doc.get("choices") or ():
            if isinstance(choice, dict):
                self._account(self._text_of(choice), choice)
        return payload

    def _text_of(self, choice: dict[str, Any]) -> str:
        """The generated text of one choice of this stream's kind."""
        if self.chat:
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else None
        else:
            text = choice.get("text")
        return text if isinstance(text, str) else ""

    def _account(self, text: str, choice: dict[str, Any]) -> None:
        """Count one choice's piece of output (`text`) the client was sent."""
        if text:
            self.parts.append(text)
            self.tokens += 1
        if choice.get("finish_reason"):
            self.finished = True

    @property
    def text(self) -> str:
        """The generated text the client has received so far."""
        return "".join(self.parts)

    @property
    def produced(self) -> int:
        """Tokens generated so far."""
        return self.tokens

    def _limit_key(self, doc: dict[str, Any]) -> str | None:
        for key in _CHAT_LIMITS if self.chat else ("max_tokens",):
            limit = doc.get(key)
            if isinstance(limit, int) and not isinstance(limit, bool):
                return key
        return None

    @property
    def exhausted(self) -> bool:
        """True when the token limit is used up: nothing is left to ask for."""
        key = self._limit_key(self.request)
        return key is not None and self.request[key] - self.produced <= 0

    def _begin_continuation(self) -> int:
        """Note where the next continuation starts; returns the tokens it continues after."""
        produced = self.produced
        self.prefix_tokens = produced
        self.text_offset = len(self.text)
        return produced

    def text_continuation(self) -> bytes:
        """The request body asking for the rest of the reply from the text sent so far."""
        return orjson.dumps(self._from_text(self._begin_continuation()))

    def _reduce_limits(self, doc: dict[str, Any], produced: int) -> None:
        """Token limits in `doc` reduced by the `produced` tokens already sent."""
        key = self._limit_key(doc)
        if key is not None:
            doc[key] = doc[key] - produced
        minimum = doc.get("min_tokens")
        if isinstance(minimum, int) and not isinstance(minimum, bool) and minimum:
            doc["min_tokens"] = max(0, minimum - produced)

    def _from_text(self, produced: int) -> dict[str, Any]:
        doc = dict(self.request)
        self._reduce_limits(doc, produced)
        # A PD decode leg's KV blocks were single-use: the next engine prefills itself.
        doc.pop("kv_transfer_params", None)
        text = self.text
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
        return doc

    def rewrite(self, payload: bytes) -> bytes | None:
        """A continuation's payload as part of the client's stream (None: drop it)."""
        doc = _json_object(payload)
        if doc is None:
            return payload
        choices = doc.get("choices") or []
        first = choices[0] if choices and isinstance(choices[0], dict) else None
        out = self._rewrite_chunk(doc, first)
        if out is None:
            return None
        usage = out.get("usage")
        if isinstance(usage, dict):
            # The sent tokens were prompt to the continuation; count them as completion, as
            # the client saw them.
            produced = self.prefix_tokens
            usage["completion_tokens"] = int(usage.get("completion_tokens") or 0) + produced
            usage["prompt_tokens"] = max(0, int(usage.get("prompt_tokens") or 0) - produced)
            if "total_tokens" in usage:
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return orjson.dumps(out)

    def _rewrite_chunk(
        self, doc: dict[str, Any], first: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        """A continuation's chunk (`first`: its first choice) as the first stream's, its
        output accounted; None to drop it."""
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
            self._account(self._text_of(first), first)
        doc.update(self.head)
        return doc

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
