"""Reading chat/completions bodies for the transformers engine: the shared protocol models
(`sage.protocol.openai`) check types and ranges; this module adds what only this engine
refuses (n > 1, logprobs, tools, echo, suffix, non-text content) and fills in defaults."""

from __future__ import annotations

from dataclasses import dataclass

from sage.common.exceptions import InvalidRequestError
from sage.protocol.openai import (
    ChatMessage,
    EngineChatCompletionRequest,
    EngineCompletionRequest,
    decode,
)

__all__ = [
    "ChatRequest",
    "CompletionRequest",
    "Sampling",
    "parse_chat",
    "parse_completion",
]


@dataclass(frozen=True)
class Sampling:
    """The sampling fields of a request, validated; max_tokens is None when not given."""

    max_tokens: int | None
    max_tokens_field: str  # which field set it, for error messages
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool
    min_tokens: int
    presence_penalty: float
    frequency_penalty: float
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class ChatRequest:
    """A validated POST /v1/chat/completions body."""

    model: str | None
    messages: tuple[dict[str, str], ...]  # content flattened to text
    sampling: Sampling


@dataclass(frozen=True)
class CompletionRequest:
    """A validated POST /v1/completions body; a prompt is text or token ids."""

    model: str | None
    prompts: tuple[str | tuple[int, ...], ...]
    sampling: Sampling


def _refuse(field: str, what: str) -> InvalidRequestError:
    return InvalidRequestError(f"{what} by this engine", param=field)


def _sampling(req: EngineChatCompletionRequest | EngineCompletionRequest) -> Sampling:
    if req.n not in (None, 1):
        raise InvalidRequestError("this engine supports only n=1", param="n")
    max_tokens, field = req.token_limit
    stop = req.stop_strings
    if any(not s for s in stop):
        raise InvalidRequestError("stop strings must not be empty", param="stop")
    min_tokens = req.min_tokens or 0
    if max_tokens is not None and min_tokens > max_tokens:
        raise InvalidRequestError(
            f"min_tokens ({min_tokens}) must not exceed {field} ({max_tokens})",
            param="min_tokens",
        )
    return Sampling(
        max_tokens=max_tokens,
        max_tokens_field=field,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if req.top_k in (None, -1) else int(req.top_k or 0),
        seed=req.seed,
        stop=stop,
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=bool(req.ignore_eos),
        min_tokens=min_tokens,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        stream=req.streaming,
        include_usage=req.include_usage,
    )


def _message_text(message: ChatMessage, where: str) -> str:
    if not isinstance(message.content, list):
        return message.content or ""
    for j, part in enumerate(message.content):
        if part.type != "text":
            raise InvalidRequestError(
                f"{where}.content[{j}].type must be 'text' (this engine reads text only)",
                param=f"{where}.content[{j}].type",
            )
    return message.text()


def parse_chat(body: bytes) -> ChatRequest:
    """A chat completions body, or InvalidRequestError naming the field."""
    req = decode(body, EngineChatCompletionRequest)
    if req.logprobs or req.top_logprobs:
        raise _refuse("logprobs", "logprobs are not supported")
    if req.tools:
        raise _refuse("tools", "tools are not supported")
    messages = tuple(
        {"role": m.role, "content": _message_text(m, f"messages[{i}]")}
        for i, m in enumerate(req.messages)
    )
    return ChatRequest(req.model, messages, _sampling(req))


def _prompts(prompt: str | list[object] | None) -> tuple[str | tuple[int, ...], ...]:
    if prompt is None:
        raise InvalidRequestError("prompt is required", param="prompt")
    if isinstance(prompt, str):
        return (prompt,)
    if prompt:
        if all(isinstance(p, str) for p in prompt):
            return tuple(p for p in prompt if isinstance(p, str))
        if all(_is_id(t) for t in prompt):
            return (tuple(t for t in prompt if isinstance(t, int)),)
        if all(isinstance(p, list) and p and all(_is_id(t) for t in p) for p in prompt):
            return tuple(tuple(p) for p in prompt if isinstance(p, list))
    raise InvalidRequestError(
        "prompt must be a string, a list of strings, or token ids", param="prompt"
    )


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_completion(body: bytes) -> CompletionRequest:
    """A completions body, or InvalidRequestError naming the field."""
    req = decode(body, EngineCompletionRequest)
    if req.best_of not in (None, 1):
        raise InvalidRequestError("this engine supports only best_of=1", param="best_of")
    if req.logprobs:
        raise _refuse("logprobs", "logprobs are not supported")
    if req.echo:
        raise _refuse("echo", "echo is not supported")
    if req.suffix:
        raise _refuse("suffix", "suffix is not supported")
    return CompletionRequest(req.model, _prompts(req.prompt), _sampling(req))
