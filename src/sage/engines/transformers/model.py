"""Loading a causal LM with Hugging Face transformers and generating from it.

Nothing here knows about HTTP. `CausalLM.generate` is blocking and runs in the engine's
single generation thread; it checks a cancel flag before every token, so a client that
goes away frees the model within one decode step. torch is imported only here.
"""

from __future__ import annotations

import importlib.util
import inspect
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from sage.common.exceptions import ConfigurationError, InvalidRequestError

__all__ = [
    "FALLBACK_CHAT_TEMPLATE",
    "CausalLM",
    "EngineConfig",
    "Outcome",
    "SamplingParams",
]

# Used when a tokenizer ships no chat template (base models, hand-built tokenizers): each
# message as "Role: content" followed by a blank line, then "Assistant:" to answer.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

# Tokens of the prompt's tail decoded with each new token, so that tokenizers which drop
# a word's leading space at the start of a decode (SentencePiece) keep it.
_DETOKENIZE_CONTEXT = 6


@dataclass(frozen=True)
class EngineConfig:
    """What to load and how to serve it."""

    model: str
    served_names: tuple[str, ...] = ()  # first is the primary name; default: the model
    host: str = "127.0.0.1"
    port: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    max_model_len: int = 0  # 0 = the model's own context length
    max_tokens_default: int = 0  # 0 = up to the context length, as vLLM does
    trust_remote_code: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        """Every model name this engine answers to, primary first."""
        return tuple(dict.fromkeys(self.served_names or (self.model,)))


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop (OpenAI fields plus vLLM's extensions)."""

    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass(frozen=True)
class Outcome:
    """How one generation ended."""

    text: str  # the whole answer (stop string cut off)
    tail: str  # the part of `text` not yet passed to on_text
    finish_reason: str  # stop | length | abort
    stop_reason: str | int | None  # the stop string or stop token id that ended it
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _Detokenizer:
    """Incremental decoding: decode a short window, emit what it adds (vLLM's method)."""

    decode: Callable[[list[int]], str]
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        prefix = self.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.decode(self.ids[self.prefix_offset :])
        # A partial UTF-8 sequence decodes to U+FFFD: wait for the rest of it.
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        prefix = self.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.decode(self.ids[self.prefix_offset :])
        self.read_offset = len(self.ids)
        return full[len(prefix) :] if len(full) > len(prefix) else ""


def _transformers_version() -> tuple[int, int]:
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _resolve_path(model: str) -> str:
    path = Path(model).expanduser()
    if path.exists():
        return str(path)
    return model


class CausalLM:
    """One loaded causal LM and its tokenizer; generate() runs one request at a time."""

    def __init__(self, config: EngineConfig) -> None:
        for module in ("torch", "transformers"):
            if importlib.util.find_spec(module) is None:
                raise ConfigurationError(
                    f"the transformers engine needs {module} (pip install "
                    "'sage-llm-control-plane[engines]')"
                )
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = _resolve_path(config.model)
        self.device = self._pick_device(config.device)
        dtype = self._pick_dtype(config.dtype, self.device)
        # transformers 4.56 renamed torch_dtype to dtype and warns about the old name.
        dtype_key = "dtype" if _transformers_version() >= (4, 56) else "torch_dtype"
        try:
            # Typed as Any: transformers' stubs cover the Auto classes only loosely.
            # A local folder needs no hub: never turn a missing file into a download.
            local = Path(path).exists()
            self.tokenizer: Any = cast(
                Any,
                AutoTokenizer.from_pretrained(
                    path, trust_remote_code=config.trust_remote_code, local_files_only=local
                ),
            )
            self.model: Any = cast(
                Any,
                AutoModelForCausalLM.from_pretrained(
                    path,
                    trust_remote_code=config.trust_remote_code,
                    local_files_only=local,
                    **{dtype_key: dtype},
                ),
            )
        except (OSError, ValueError) as exc:
            raise ConfigurationError(
                f"cannot load model {config.model!r}: {exc}", param="model"
            ) from exc
        self.model.to(self.device)
        self.model.eval()
        self.dtype = str(dtype).removeprefix("torch.")
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.vocab_size = int(self.model.get_input_embeddings().weight.shape[0])
        self.max_model_len = config.max_model_len or self._context_length()
        self.eos_token_ids = self._eos_ids()
        # transformers 5 renamed the cache argument and output from past_key_values.
        params = inspect.signature(self.model.forward).parameters
        self._cache_key = "cache" if "cache" in params else "past_key_values"
        # The prefill needs the last position's logits only; all of them cost prompt length x
        # vocabulary on the GPU (2 GiB for an 8k prompt over a 128k vocabulary in bf16).
        # transformers 4.45-4.49 call the argument num_logits_to_keep.
        keep = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        self._last_logits_only = {keep: 1} if keep else {}
        self._torch = torch

    # ---- loading helpers

    @staticmethod
    def _pick_device(device: str) -> str:
        import torch

        if device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigurationError(
                f"--device {device} asked for, but torch sees no CUDA device", param="device"
            )
        return device

    @staticmethod
    def _pick_dtype(dtype: str, device: str) -> Any:
        import torch

        if dtype == "auto":
            if device == "cpu":
                return torch.float32
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        try:
            value = getattr(torch, dtype)
        except AttributeError:
            value = None
        if not isinstance(value, torch.dtype):
            raise ConfigurationError(f"unknown dtype {dtype!r}", param="dtype")
        return value

    def _context_length(self) -> int:
        config = self.model.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_len"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        limit = getattr(self.tokenizer, "model_max_length", 0)
        return int(limit) if isinstance(limit, int) and 0 < limit < 1_000_000 else 2048

    def _eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        generation_config = getattr(self.model, "generation_config", None)
        for source in (
            getattr(generation_config, "eos_token_id", None),
            getattr(self.tokenizer, "eos_token_id", None),
        ):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, list | tuple):
                ids.update(i for i in source if isinstance(i, int))
        return frozenset(ids)

    # ---- prompts (called from a worker thread, never on the event loop)

    def render_chat(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """The prompt text for `messages`: the tokenizer's chat template, or the fallback."""
        from jinja2 import TemplateError

        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": True}
        if not self.has_chat_template:
            kwargs["chat_template"] = FALLBACK_CHAT_TEMPLATE
        try:
            text = self.tokenizer.apply_chat_template(list(messages), **kwargs)
        except TemplateError as exc:
            raise InvalidRequestError(
                f"the model's chat template rejected the messages: {exc}", param="messages"
            ) from None
        if not isinstance(text, str):
            raise InvalidRequestError("the chat template did not produce text", param="messages")
        return text

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        """Token ids of `text`; chat prompts pass False (the template holds the specials)."""
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return [int(i) for i in ids]

    def _decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        return str(text)

    # ---- generation (blocking; one at a time)

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        cancelled: threading.Event,
        on_text: Callable[[str], None],
        on_token: Callable[[int], None] | None = None,
    ) -> Outcome:
        """Generate up to params.max_tokens tokens after `prompt_ids`.

        `on_text` gets each piece of text as soon as it is certain (text that could still
        turn into a stop string is held back); `on_token(step)` is called after each token.
        The returned Outcome holds the whole text and the part not yet passed on.
        """
        torch = self._torch
        stop_ids = set(params.stop_token_ids)
        eos_ids = set() if params.ignore_eos else set(self.eos_token_ids)
        banned_early = sorted((stop_ids | set(self.eos_token_ids)) if params.min_tokens else ())
        hold = max((len(s) for s in params.stop), default=1) - 1
        detok = _Detokenizer(self._decode)
        context = list(prompt_ids[-_DETOKENIZE_CONTEXT:])
        detok.ids = context
        detok.prefix_offset = 0
        detok.read_offset = len(context)

        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device=self.device)
            seed = params.seed if params.seed is not None else random.getrandbits(63)
            generator.manual_seed(seed)

        text = ""
        sent = 0
        produced = 0
        finish_reason = "length"
        stop_reason: str | int | None = None
        counts = None
        with torch.inference_mode():
            input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)
            output = self.model(input_ids=input_ids, use_cache=True, **self._last_logits_only)
            cache = output.get(self._cache_key)
            logits = output["logits"][0, -1, :]
            while produced < params.max_tokens:
                if cancelled.is_set():
                    finish_reason = "abort"
                    break
                scores = logits.float()
                if params.presence_penalty or params.frequency_penalty:
                    if counts is None:
                        counts = torch.zeros_like(scores)
                    scores = scores - params.frequency_penalty * counts
                    scores = scores - params.presence_penalty * (counts > 0).float()
                if produced < params.min_tokens and banned_early:
                    scores[banned_early] = float("-inf")
                token = self._pick(scores, params, generator)
                produced += 1
                if counts is not None:
                    counts[token] += 1
                if on_token is not None:
                    on_token(produced)
                if token in stop_ids or token in eos_ids:
                    # The ending token counts as generated but is not part of the text.
                    finish_reason = "stop"
                    stop_reason = token if token in stop_ids else None
                    break
                text += detok.add(token)
                if params.stop and (cut := _find_stop(text, params.stop, sent)) is not None:
                    text, stop_reason = cut
                    finish_reason = "stop"
                    break
                release = len(text) - hold if params.stop else len(text)
                if release > sent:
                    on_text(text[sent:release])
                    sent = release
                if produced >= params.max_tokens:
                    break
                step_ids = torch.tensor([[token]], dtype=torch.long, device=self.device)
                output = self.model(input_ids=step_ids, use_cache=True, **{self._cache_key: cache})
                cache = output.get(self._cache_key)
                logits = output["logits"][0, -1, :]
        if finish_reason == "length":
            text += detok.flush()
            if params.stop and (cut := _find_stop(text, params.stop, sent)) is not None:
                text, stop_reason = cut
                finish_reason = "stop"
        return Outcome(
            text=text,
            tail=text[sent:],
            finish_reason=finish_reason,
            stop_reason=stop_reason,
            prompt_tokens=len(prompt_ids),
            completion_tokens=produced,
        )

    def _pick(self, scores: Any, params: SamplingParams, generator: Any) -> int:
        torch = self._torch
        if params.temperature <= 0 or generator is None:
            return int(torch.argmax(scores).item())
        scores = scores / params.temperature
        if 0 < params.top_k < scores.shape[-1]:
            kth = torch.topk(scores, params.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if params.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=True)
            cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
            # Drop tokens once the ones before them already reach top_p (keep at least one).
            drop = cumulative - torch.softmax(ordered, dim=-1) >= params.top_p
            drop[0] = False
            scores = scores.scatter(0, order[drop], float("-inf"))
        probabilities = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probabilities, 1, generator=generator).item())

    def warm_up(self) -> float:
        """One tiny generation so the first request does not pay for lazy init; seconds."""
        started = time.perf_counter()
        ids = self.encode("hello", add_special_tokens=True) or [0]
        self.generate(
            ids, SamplingParams(max_tokens=2, temperature=0.0), threading.Event(), lambda _: None
        )
        return time.perf_counter() - started


def _find_stop(text: str, stops: Sequence[str], sent: int) -> tuple[str, str] | None:
    """(text cut before the earliest stop string, that string), or None.

    Only text after what was already sent can hold a new match: released text never
    contains the start of a stop string (it is held back by the longest stop's length).
    """
    best: tuple[int, str] | None = None
    for stop in stops:
        index = text.find(stop, max(0, sent))
        if index >= 0 and (best is None or index < best[0]):
            best = (index, stop)
    if best is None:
        return None
    return text[: best[0]], best[1]
