"""Loading a causal LM with Hugging Face transformers and generating from it, batched.

Nothing here knows about HTTP. `CausalLM.step` runs in the engine's one generation thread:
it prefills newly admitted requests (left-padded, one forward pass), stacks their KV cache
under the running ones and decodes every running sequence in one forward pass, so
concurrent requests share each step (continuous batching). Each request keeps its own
sampling (greedy rows share one argmax; sampled rows use their own seeded generator), stop
checks and incremental text. A cancelled request leaves the batch before the next forward
pass. torch is imported only here.

Why not transformers' own continuous batching (`generate_batch`, ContinuousBatchingManager):
it fixes do_sample and the logits processors for the whole manager (no per-request seed,
top_k, penalties, min_tokens or stop token ids), and its API changed between the 5.17 on the
GPU machines and the 5.25 here. Padding a DynamicCache works on every version we support.

On CUDA the decode pass runs over a preallocated KV cache of slots instead, captured as
CUDA graphs (slots.py): joins and leaves stop copying the batch's cache and a step launches
once. The dynamic cache stays the CPU path (and the fallback for models the slots cannot
hold).
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from sage.common.exceptions import ConfigurationError, InternalError, InvalidRequestError

from .slots import SlotBatch, SlotLayout

__all__ = [
    "FALLBACK_CHAT_TEMPLATE",
    "KV_CACHE_MODES",
    "CausalLM",
    "EngineConfig",
    "Generation",
    "Outcome",
    "PendingText",
    "Prompts",
    "SamplingParams",
    "Step",
    "load_tokenizer",
    "text_decoder",
]

log = logging.getLogger(__name__)

# EngineConfig.kv_cache: auto (slots on CUDA, else dynamic) | slots | dynamic
KV_CACHE_MODES = ("auto", "slots", "dynamic")

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
    max_num_seqs: int = 64  # sequences decoded together; 1 = one request at a time
    kv_budget_tokens: int = 0  # KV cache columns of the whole batch; 0 = max_model_len
    waiting_served_ratio: float = 0.3  # newcomers join a running batch at this share...
    max_waiting_steps: int = 20  # ...or once the oldest has waited this many steps
    kv_cache: str = "auto"  # auto (slots on CUDA, else dynamic) | slots | dynamic
    enforce_eager: bool = False  # no CUDA graphs of the decode pass (vLLM's flag)

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
class PendingText:
    """Generated tokens not yet turned into text, and the detokenizer's state before them.

    A request that streams nothing and has no stop strings needs its text only once it
    ends; the generation process leaves that decoding to the HTTP front (`resolved`), so it
    is not on the critical path of every step.
    """

    context: tuple[int, ...]
    prefix_offset: int
    read_offset: int
    tokens: tuple[int, ...]
    flush: bool  # the answer ran to max_tokens: decode what is still held back

    def text(self, decode: Callable[[list[int]], str]) -> tuple[str, int]:
        """(the text, how much of it the token-by-token decoding had released)."""
        detok = _Detokenizer(decode, list(self.context), self.prefix_offset, self.read_offset)
        return _replay(detok, self.tokens, "", flush=self.flush)


@dataclass(frozen=True)
class Outcome:
    """How one generation ended."""

    text: str  # the whole answer (stop string cut off)
    tail: str  # the part of `text` not yet passed to on_text
    finish_reason: str  # stop | length | abort
    stop_reason: str | int | None  # the stop string or stop token id that ended it
    prompt_tokens: int
    completion_tokens: int
    pending: PendingText | None = None  # tokens still to decode onto `text` (see resolved)

    def resolved(self, decode: Callable[[list[int]], str]) -> Outcome:
        """This outcome with its pending tokens decoded onto its text."""
        if self.pending is None:
            return self
        added, sent = self.pending.text(decode)
        text = self.text + added
        return replace(self, text=text, tail=text[len(self.text) + sent :], pending=None)


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


def _replay(
    detok: _Detokenizer, tokens: Sequence[int], text: str, *, flush: bool
) -> tuple[str, int]:
    """`tokens` decoded one by one onto `text`, as Generation.accept does for a request with
    no stop strings: (the text, its length before the final flush = what was released)."""
    for token in tokens:
        text += detok.add(token)
    released = len(text)
    if flush:
        text += detok.flush()
    return text, released


@dataclass(frozen=True)
class Step:
    """What one engine step did."""

    finished: list[Generation]  # left the batch this step; their outcome() is ready
    decoded: int  # sequences stepped together in the decode pass (0: none ran)
    sampled: int = 0  # tokens generated this step (prefilled rows' first ones included)


@dataclass(eq=False)  # compared by identity: the batch finds its rows by it
class Generation:
    """One request's decoding state in the batch: how its tokens are picked, when it stops,
    and its text (released to on_text once no stop string can still claim it)."""

    prompt_ids: tuple[int, ...]
    params: SamplingParams
    cancelled: threading.Event
    on_text: Callable[[str], None] | None
    on_token: Callable[[int], None] | None
    decode: Callable[[list[int]], str]
    eos_ids: frozenset[int]
    generator: Any = None  # a seeded torch.Generator when sampling; None = greedy
    text: str = ""
    sent: int = 0
    produced: int = 0
    finish_reason: str | None = None  # stop | length | abort once done
    stop_reason: str | int | None = None
    next_token: int = -1  # sampled, not yet fed to the model
    counts: Any = None  # tokens generated so far, per vocabulary id (for penalties)

    def __post_init__(self) -> None:
        params = self.params
        self._stop_ids = frozenset(params.stop_token_ids)
        self._end_ids = frozenset() if params.ignore_eos else self.eos_ids
        self._banned_early = sorted(self._stop_ids | self.eos_ids) if params.min_tokens else []
        self._penalised = bool(params.presence_penalty or params.frequency_penalty)
        self._hold = max((len(s) for s in params.stop), default=1) - 1
        context = list(self.prompt_ids[-_DETOKENIZE_CONTEXT:])
        self._detok = _Detokenizer(self.decode, context, 0, len(context))
        # Nothing reads the text before the end (no streaming, no stop strings): keep the
        # tokens and decode them when the outcome is asked for (see PendingText).
        self._lazy = self.on_text is None and not params.stop
        self._undecoded: list[int] = []

    @property
    def done(self) -> bool:
        """Whether it has finished (its outcome is final)."""
        return self.finish_reason is not None

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing to adjust: its token comes from the batch's one argmax."""
        banning = bool(self._banned_early) and self.produced < self.params.min_tokens
        return self.generator is None and not self._penalised and not banning

    @property
    def reserve(self) -> int:
        """KV cache columns it may come to hold: prompt plus every token it may generate."""
        return len(self.prompt_ids) + self.params.max_tokens

    def check_cancelled(self) -> bool:
        """End it as aborted if its client has gone; True if that happened now."""
        if self.finish_reason is None and self.cancelled.is_set():
            self.finish_reason = "abort"
            return True
        return False

    def adjust(self, scores: Any) -> Any:
        """This row's logits after its penalties and its min_tokens ban."""
        params = self.params
        if self._penalised:
            if self.counts is None:
                self.counts = scores.new_zeros(scores.shape)
            scores = scores - params.frequency_penalty * self.counts
            scores = scores - params.presence_penalty * (self.counts > 0).float()
        if self._banned_early and self.produced < params.min_tokens:
            scores = scores.clone()
            scores[self._banned_early] = float("-inf")
        return scores

    def accept(self, token: int) -> None:
        """Take the sampled token: count it, release text, and see whether it ends here."""
        params = self.params
        self.produced += 1
        if self.counts is not None:
            self.counts[token] += 1
        if self.on_token is not None:
            self.on_token(self.produced)
        if token in self._stop_ids or token in self._end_ids:
            # The ending token counts as generated but is not part of the text.
            self.finish_reason = "stop"
            self.stop_reason = token if token in self._stop_ids else None
            return
        if self._lazy:
            self._undecoded.append(token)
            if self.produced >= params.max_tokens:
                self.finish_reason = "length"
            else:
                self.next_token = token
            return
        self.text += self._detok.add(token)
        if params.stop and (cut := _find_stop(self.text, params.stop, self.sent)) is not None:
            self.text, self.stop_reason = cut
            self.finish_reason = "stop"
            return
        release = len(self.text) - self._hold if params.stop else len(self.text)
        if release > self.sent:
            if self.on_text is not None:
                self.on_text(self.text[self.sent : release])
            self.sent = release
        if self.produced >= params.max_tokens:
            self.text += self._detok.flush()
            cut = _find_stop(self.text, params.stop, self.sent) if params.stop else None
            if cut is not None:
                self.text, self.stop_reason = cut
                self.finish_reason = "stop"
            else:
                self.finish_reason = "length"
            return
        self.next_token = token

    def outcome(self, *, defer_text: bool = False) -> Outcome:
        """How it ended (abort if it has not). `defer_text`: leave tokens not yet decoded to
        the receiver (Outcome.pending) instead of decoding them here."""
        pending = None
        if self._undecoded:
            # Only a finished answer ran to max_tokens: that one flushes what is held back.
            flush = self.finish_reason == "length"
            if defer_text:
                detok = self._detok
                pending = PendingText(
                    tuple(detok.ids),
                    detok.prefix_offset,
                    detok.read_offset,
                    tuple(self._undecoded),
                    flush,
                )
            else:
                tokens, self._undecoded = self._undecoded, []
                self.text, self.sent = _replay(self._detok, tokens, self.text, flush=flush)
        return Outcome(
            text=self.text,
            tail=self.text[self.sent :],
            finish_reason=self.finish_reason or "abort",
            stop_reason=self.stop_reason,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=self.produced,
            pending=pending,
        )


def text_decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """How the engine turns token ids into text with `tokenizer` (special tokens skipped,
    no clean-up)."""
    # A fast tokenizer's decode without clean-up is its Rust backend's decode; called
    # directly it skips ~10 us of Python per call, and every token costs two calls.
    backend = getattr(tokenizer, "_tokenizer", None)
    if getattr(tokenizer, "is_fast", False) and backend is not None:
        backend_decode = backend.decode

        def decode(ids: list[int]) -> str:
            return str(backend_decode(ids, skip_special_tokens=True))

        return decode

    def slow_decode(ids: list[int]) -> str:
        text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return str(text)

    return slow_decode


def _transformers_version() -> tuple[int, int]:
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _resolve_path(model: str) -> str:
    path = Path(model).expanduser()
    if path.exists():
        return str(path)
    return model


def load_tokenizer(config: EngineConfig) -> Any:
    """The model's tokenizer; a local folder never turns a missing file into a download."""
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, config)


def _from_pretrained(auto_class: Any, config: EngineConfig, **kwargs: Any) -> Any:
    """`auto_class.from_pretrained` for the engine's model; a local folder needs no hub (a
    missing file never turns into a download), and a failure is a ConfigurationError."""
    path = _resolve_path(config.model)
    try:
        # Typed as Any: transformers' stubs cover the Auto classes only loosely.
        return cast(
            Any,
            auto_class.from_pretrained(
                path,
                trust_remote_code=config.trust_remote_code,
                local_files_only=Path(path).exists(),
                **kwargs,
            ),
        )
    except (OSError, ValueError) as exc:
        raise ConfigurationError(
            f"cannot load model {config.model!r}: {exc}", param="model"
        ) from exc


class Prompts:
    """Chat rendering and tokenising: what the HTTP front needs of the model, without its
    weights (the front runs apart from the generation process; see core.py)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))

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


class CausalLM:
    """One loaded causal LM and its tokenizer, and the batch of sequences decoding on it."""

    def __init__(self, config: EngineConfig) -> None:
        for module in ("torch", "transformers"):
            if importlib.util.find_spec(module) is None:
                raise ConfigurationError(
                    f"the transformers engine needs {module} (pip install "
                    "'sage-llm-control-plane[engines]')"
                )
        import torch
        from transformers import AutoModelForCausalLM

        self.device = self._pick_device(config.device)
        dtype = self._pick_dtype(config.dtype, self.device)
        # transformers 4.56 renamed torch_dtype to dtype and warns about the old name.
        dtype_key = "dtype" if _transformers_version() >= (4, 56) else "torch_dtype"
        self.tokenizer: Any = load_tokenizer(config)
        self.model: Any = _from_pretrained(AutoModelForCausalLM, config, **{dtype_key: dtype})
        self.model.to(self.device)
        self.model.eval()
        self.dtype = str(dtype).removeprefix("torch.")
        self.prompts = Prompts(self.tokenizer)
        self.has_chat_template = self.prompts.has_chat_template
        self._decode = text_decoder(self.tokenizer)
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
        pad = getattr(self.tokenizer, "pad_token_id", None)
        self._pad_id = pad if isinstance(pad, int) else 0
        # The batch: its rows, their stacked KV cache and the attention mask over its columns
        # (rows are right-aligned; a row's columns before its prompt are padding).
        self._rows: list[Generation] = []
        self._cache: Any = None
        self._mask: Any = None
        # Padding columns before each row's first token, kept here so that no step needs to
        # ask the GPU where padding is (each question is a sync).
        self._pads: list[int] = []
        # With SDPA a decode step passes its mask ready-made (see _decode_step); transformers
        # 5's own models take any 4D mask as it is (remote code may not).
        sdpa = getattr(self.model.config, "_attn_implementation", None) == "sdpa"
        own = type(self.model).__module__.startswith("transformers.")
        self._sdpa = sdpa and own and _transformers_version() >= (5, 0)
        self.can_batch = True  # False once a prefill shows a cache that cannot be stacked
        # The decode pass over a KV cache of slots (slots.py), CUDA graphs on CUDA: made at
        # the first prefill, which shows the cache's layout. It passes SDPA its mask, so it
        # needs the ready-made mask path above.
        if config.kv_cache not in KV_CACHE_MODES:
            raise ConfigurationError(f"unknown kv_cache {config.kv_cache!r}", param="kv_cache")
        wanted = config.kv_cache == "slots" or (
            config.kv_cache == "auto" and self.device.startswith("cuda")
        )
        if wanted and not self._sdpa:
            log.info("KV slots need SDPA attention in transformers >= 5: dynamic cache")
        self._slot_mode = wanted and self._sdpa
        self._slots: SlotBatch | None = None
        self._config = config

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
        """The prompt text for `messages` (see Prompts)."""
        return self.prompts.render_chat(messages)

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        """Token ids of `text` (see Prompts)."""
        return self.prompts.encode(text, add_special_tokens=add_special_tokens)

    # ---- generation (blocking; called from the engine's one generation thread)

    def begin(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        cancelled: threading.Event,
        on_text: Callable[[str], None] | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> Generation:
        """A request's decoding state, ready to be admitted by `step`."""
        generator = None
        if params.temperature > 0:
            generator = self._torch.Generator(device=self.device)
            seed = params.seed if params.seed is not None else random.getrandbits(63)
            generator.manual_seed(seed)
        return Generation(
            tuple(prompt_ids),
            params,
            cancelled,
            on_text,
            on_token,
            decode=self._decode,
            eos_ids=self.eos_token_ids,
            generator=generator,
        )

    @property
    def running(self) -> int:
        """Sequences in the batch now."""
        return len(self._rows)

    def step(self, admitted: Sequence[Generation] = ()) -> Step:
        """Prefill `admitted` into the batch, then one decode step for every sequence in it.

        Cancelled sequences leave before any model work. Returns the sequences that finished
        (their outcome is ready) and how many were decoded together.
        """
        torch = self._torch
        finished = [g for g in self._rows if g.check_cancelled()]
        fresh: list[Generation] = []
        for generation in admitted:
            (finished if generation.check_cancelled() else fresh).append(generation)
        with torch.inference_mode():  # the KV slots are inference tensors
            if finished:
                self._retain()
            if fresh:
                cache, mask, logits = self._prefill(fresh)
                self._sample(fresh, logits)
                if self._slot_mode and self._slots_for(cache):
                    finished += self._join(fresh, cache)
                else:
                    self._merge(fresh, cache, mask, self._prefill_pads(fresh))
                    finished += self._retain()
            rows = len(self._rows)
            if rows:
                if self._slots is not None:
                    logits = self._slots.decode([g.next_token for g in self._rows])
                else:
                    logits = self._decode_step()
                self._sample(self._rows, logits)
                finished += self._retain()
        return Step(finished, rows, rows + len(fresh))

    @property
    def decode_mode(self) -> str:
        """How decode passes run: cuda-graphs, slots (eager) or dynamic (see slots.py)."""
        if self._slots is None:
            return "slots" if self._slot_mode else "dynamic"
        return "cuda-graphs" if self._slots.graphs else "slots"

    def abandon(self) -> list[Generation]:
        """Drop the whole batch (after a failed step); returns what was in it."""
        rows, self._rows = self._rows, []
        self._cache = self._mask = None
        self._pads = []
        return rows

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        cancelled: threading.Event,
        on_text: Callable[[str], None],
        on_token: Callable[[int], None] | None = None,
    ) -> Outcome:
        """One request alone, to the end (warm-up and tests; the engine batches via step)."""
        generation = self.begin(prompt_ids, params, cancelled, on_text, on_token)
        admitted: list[Generation] = [generation]
        try:
            while generation not in self.step(admitted).finished:
                admitted = []
        except BaseException:
            self.abandon()
            raise
        return generation.outcome()

    def _prefill(self, fresh: Sequence[Generation]) -> tuple[Any, Any, Any]:
        """Left-padded prompts in one forward pass: (cache, attention mask, last logits)."""
        torch = self._torch
        width = max(len(g.prompt_ids) for g in fresh)
        ids = torch.full((len(fresh), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(fresh), width), dtype=torch.long)
        for row, generation in enumerate(fresh):
            n = len(generation.prompt_ids)
            ids[row, width - n :] = torch.tensor(generation.prompt_ids, dtype=torch.long)
            mask[row, width - n :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        output = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
            **self._last_logits_only,
        )
        cache = output.get(self._cache_key)
        if not _plain_cache(cache):
            # Sliding-window or quantised caches cannot be padded and stacked row-wise.
            self.can_batch = False
        return cache, mask, output["logits"][:, -1, :]

    @staticmethod
    def _prefill_pads(fresh: Sequence[Generation]) -> list[int]:
        """Left padding of each prefilled row (as `_prefill` lays them out)."""
        width = max(len(g.prompt_ids) for g in fresh)
        return [width - len(g.prompt_ids) for g in fresh]

    def _slots_for(self, cache: Any) -> bool:
        """Whether this prefill's rows go to the KV slots; the first prefill makes them, or
        shows a cache they cannot hold (the dynamic cache is used from then on)."""
        if self._slots is not None:
            return True
        layout = SlotLayout.of(_kv(cache)) if self.can_batch else None
        if layout is None:
            log.info("this model's KV cache does not fit the slots: dynamic cache")
            self._slot_mode = False
            return False
        config = self._config
        self._slots = SlotBatch(
            self.model,
            self._cache_key,
            layout,
            kv_budget_tokens=config.kv_budget_tokens or self.max_model_len,
            max_rows=config.max_num_seqs,
            max_columns=self.max_model_len,
            graphs=not config.enforce_eager,
        )
        return True

    def _join(self, fresh: Sequence[Generation], cache: Any) -> list[Generation]:
        """Copy the prefilled rows that go on into the slots after the running ones; returns
        those that ended with their first token."""
        slots = self._slots
        assert slots is not None
        pads = self._prefill_pads(fresh)
        going = [(i, g) for i, g in enumerate(fresh) if not g.done]
        if going:
            rows = len(self._rows)
            widest = max(g.reserve for g in [*self._rows, *(g for _, g in going)])
            slots.make_room(rows + len(going), widest, rows)
            placements = [
                (rows + k, i, pads[i], len(g.prompt_ids)) for k, (i, g) in enumerate(going)
            ]
            slots.join(placements, _kv(cache))
            self._rows.extend(g for _, g in going)
        return [g for g in fresh if g.done]

    def _decode_step(self) -> Any:
        torch = self._torch
        tokens = torch.tensor(
            [[g.next_token] for g in self._rows], dtype=torch.long, device=self.device
        )
        ones = torch.ones((len(self._rows), 1), dtype=torch.long, device=self.device)
        self._mask = torch.cat([self._mask, ones], dim=1)
        attention: Any = self._mask
        if self._sdpa and self.can_batch:  # full attention only (no sliding window)
            # One new token per row sees every column that is not padding, so the padding
            # mask is the whole attention mask: passed as SDPA's 4D boolean mask, it spares
            # transformers building one each step (a dozen kernels and a GPU sync to learn
            # whether there is padding). No padding: no mask, as transformers does then.
            attention = self._mask.bool()[:, None, None, :] if any(self._pads) else None
        output = self.model(
            input_ids=tokens,
            attention_mask=attention,
            position_ids=self._mask.sum(-1, keepdim=True) - 1,
            use_cache=True,
            **{self._cache_key: self._cache},
        )
        self._cache = output.get(self._cache_key)
        return output["logits"][:, -1, :]

    def _sample(self, rows: Sequence[Generation], logits: Any) -> None:
        """Pick each row's next token: one argmax for the plain greedy rows, the rest one
        by one with their own penalties, bans, temperature and seeded generator."""
        special = [i for i, g in enumerate(rows) if not g.plain_greedy]
        # Upcasting is exact and keeps the order, so plain greedy rows' argmax needs no copy.
        scores = logits.float() if special else logits
        for i in special:
            scores[i] = rows[i].adjust(scores[i])
        greedy = scores.argmax(dim=-1).tolist()
        for i, generation in enumerate(rows):
            if generation.generator is not None:
                token = self._pick(scores[i], generation.params, generation.generator)
            else:
                token = int(greedy[i])
            generation.accept(token)

    def _merge(
        self, fresh: Sequence[Generation], cache: Any, mask: Any, pads: Sequence[int]
    ) -> None:
        """Stack the prefilled rows under the running ones, left-padding the shorter side."""
        if not self._rows:
            self._rows, self._cache, self._mask = list(fresh), cache, mask
            self._pads = list(pads)
            return
        if not self.can_batch:
            raise InternalError("this model's KV cache cannot be batched")
        functional = self._torch.nn.functional
        old_width, new_width = self._mask.shape[1], mask.shape[1]
        width = max(old_width, new_width)
        self._pads = [p + width - old_width for p in self._pads] + [
            p + width - new_width for p in pads
        ]

        def pad(tensor: Any, dim_from_end: int) -> Any:
            missing = width - tensor.shape[-dim_from_end]
            if not missing:
                return tensor
            return functional.pad(tensor, (0, 0) * (dim_from_end - 1) + (missing, 0))

        layers = [
            (
                self._torch.cat([pad(k_old, 2), pad(k_new, 2)], dim=0),
                self._torch.cat([pad(v_old, 2), pad(v_new, 2)], dim=0),
            )
            for (k_old, v_old), (k_new, v_new) in zip(_kv(self._cache), _kv(cache), strict=True)
        ]
        _set_kv(self._cache, layers)
        self._mask = self._torch.cat([pad(self._mask, 1), pad(mask, 1)], dim=0)
        self._rows = [*self._rows, *fresh]

    def _retain(self) -> list[Generation]:
        """Remove finished rows from the batch (and columns that only padded them)."""
        gone = [g for g in self._rows if g.done]
        if not gone:
            return []
        if self._slots is not None:
            self._vacate()
            return gone
        keep = [i for i, g in enumerate(self._rows) if not g.done]
        if not keep:
            self.abandon()
            return gone
        torch = self._torch
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = self._mask.index_select(0, index)
        pads = [self._pads[i] for i in keep]
        if not self.can_batch:  # a cache of another kind: its own row selection, no trim
            self._cache.batch_select_indices(index)
            self._mask, self._pads = mask, pads
            self._rows = [self._rows[i] for i in keep]
            return gone
        # Columns that pad every remaining row go.
        start = min(pads)
        self._mask, self._pads = mask[:, start:], [p - start for p in pads]
        _set_kv(
            self._cache,
            [
                (k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
                for k, v in _kv(self._cache)
            ],
        )
        self._rows = [self._rows[i] for i in keep]
        return gone

    def _vacate(self) -> None:
        """Free the finished rows' slots: rows past the survivors move into the holes, so
        the batch stays in slots 0..n-1 (one copy of each moved row's columns)."""
        assert self._slots is not None
        rows = self._rows
        kept = sum(1 for g in rows if not g.done)
        holes = [i for i in range(kept) if rows[i].done]
        movers = [j for j in range(kept, len(rows)) if not rows[j].done]
        # A row's cached columns: its prompt and every token fed back (all but the last).
        self._slots.move(
            [
                (j, i, len(rows[j].prompt_ids) + rows[j].produced - 1)
                for i, j in zip(holes, movers, strict=True)
            ]
        )
        survivors = rows[:kept]
        for i, j in zip(holes, movers, strict=True):
            survivors[i] = rows[j]
        self._rows = survivors

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
        """One tiny generation so the first request does not pay for lazy init (and the
        decode pass of one row is captured); seconds. A model the KV slots fail on falls
        back to the dynamic cache here, before any request."""
        started = time.perf_counter()
        ids = self.encode("hello", add_special_tokens=True) or [0]
        params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        try:
            self.generate(ids, params, threading.Event(), lambda _: None)
        except Exception as exc:
            if self._slots is None and not self._slot_mode:
                raise
            log.warning("decoding over KV slots failed (%s): dynamic cache", exc)
            self._slot_mode, self._slots = False, None
            self.generate(ids, params, threading.Event(), lambda _: None)
        return time.perf_counter() - started


def _plain_cache(cache: Any) -> bool:
    """Whether `cache` is a DynamicCache of full-attention layers (rows can be stacked)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers >= 4.56
        return type(cache).__name__ == "DynamicCache" and all(
            type(layer).__name__ == "DynamicLayer" for layer in layers
        )
    return type(cache).__name__ == "DynamicCache" and hasattr(cache, "key_cache")


def _kv(cache: Any) -> list[tuple[Any, Any]]:
    """(keys, values) per layer, each [batch, kv heads, columns, head dim]."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


def _set_kv(cache: Any, tensors: Sequence[tuple[Any, Any]]) -> None:
    layers = getattr(cache, "layers", None)
    for i, (keys, values) in enumerate(tensors):
        if layers is not None:
            layers[i].keys, layers[i].values = keys, values
        else:
            cache.key_cache[i], cache.value_cache[i] = keys, values


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
