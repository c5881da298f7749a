"""The routing interface: what a router sees of a request, and how it reads engine load.

A router only picks one engine among the ready ones; failover order, admission and
execution live in the scheduler core.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, overload

import orjson

from ..registry import EngineRecord

# Enough prompt text to tell system prompts and shared few-shot headers apart, small enough
# that hashing it costs microseconds.
PREFIX_CHARS = 2048


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What a router may look at: model, session key, prompt prefix and estimated cost."""

    model: str
    session_key: str = ""
    prefix: str = ""  # empty unless the router declares needs_prefix
    cost_tokens: float = 0.0
    # The prompt's token ids, set only by a router's annotate step (Annotating) when it
    # needs them (kv_events); empty otherwise.
    token_ids: tuple[int, ...] = ()


class LoadView(Protocol):
    """Current load of an engine (in-flight plus engine-reported queue); higher is busier."""

    def load(self, engine_id: str) -> float:
        """Load of `engine_id`; 0 for an engine never seen."""
        ...


class Router(Protocol):
    """Chooses the engine for one request."""

    name: str
    needs_prefix: bool  # when True the scheduler parses the body to fill RouteRequest.prefix

    def pick(self, request: RouteRequest, engines: Sequence[EngineRecord]) -> EngineRecord:
        """Return one of `engines` (never empty)."""
        ...


class Annotating(Protocol):
    """A router that needs more than the prefix (kv_events: the prompt's token ids), found
    by awaiting I/O before pick(); the scheduler calls annotate() when a router has it."""

    async def annotate(
        self, request: RouteRequest, doc: Any, engines: Sequence[EngineRecord]
    ) -> RouteRequest:
        """`request` with whatever pick() will need from the parsed body `doc`."""
        ...


class NoLoad:
    """A LoadView that reports every engine idle (routers built without a tracker)."""

    def load(self, engine_id: str) -> float:
        """Always 0."""
        return 0.0


def least_loaded(
    engines: Sequence[EngineRecord], load: LoadView, start: int = 0
) -> tuple[EngineRecord, float]:
    """The least-loaded engine and its load; ties go to the first one from `start` on, so
    callers rotating `start` spread sequential requests over idle engines."""
    n = len(engines)
    best = engines[start % n]
    best_load = load.load(best.engine_id)
    for i in range(1, n):
        engine = engines[(start + i) % n]
        value = load.load(engine.engine_id)
        if value < best_load:
            best, best_load = engine, value
    return best, best_load


def _text_of(content: Any) -> str:
    """Text of an OpenAI message content: a string, or the text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def failover_order(
    router: Router, request: RouteRequest, engines: Sequence[EngineRecord]
) -> list[EngineRecord]:
    """The routed engine first, then the rest in order: who to try when one fails."""
    first = router.pick(request, engines)
    return [first, *(e for e in engines if e.engine_id != first.engine_id)]


class FailoverOrder(Sequence[EngineRecord]):
    """failover_order's list, built lazily: the routed engine first, then the others in
    their order. A request that succeeds on its first engine (nearly all) reads only
    element 0, so building the rest, O(engines), is paid only by failovers."""

    __slots__ = ("_engines", "_first", "_rest")

    def __init__(self, first: EngineRecord, engines: Sequence[EngineRecord]) -> None:
        self._first = first
        self._engines = engines
        self._rest: list[EngineRecord] | None = None

    def _others(self) -> list[EngineRecord]:
        if self._rest is None:
            first_id = self._first.engine_id
            self._rest = [e for e in self._engines if e.engine_id != first_id]
        return self._rest

    def __len__(self) -> int:
        return 1 + len(self._others()) if self._rest is not None else len(self._engines)

    @overload
    def __getitem__(self, index: int) -> EngineRecord: ...

    @overload
    def __getitem__(self, index: slice) -> list[EngineRecord]: ...

    def __getitem__(self, index: int | slice) -> EngineRecord | list[EngineRecord]:
        if isinstance(index, slice):
            return list(self)[index]
        if index == 0 or index == -len(self):
            return self._first
        return self._others()[index - 1 if index > 0 else index]

    def __iter__(self) -> Iterator[EngineRecord]:
        yield self._first
        yield from self._others()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


def failover_view(
    router: Router, request: RouteRequest, engines: Sequence[EngineRecord]
) -> FailoverOrder:
    """failover_order without building the list up front (see FailoverOrder)."""
    return FailoverOrder(router.pick(request, engines), engines)


def prefix_of(body: bytes, limit: int = PREFIX_CHARS) -> str:
    """The first `limit` characters of the prompt in an OpenAI chat or completion body:
    message texts joined (role-tagged), or the completion prompt; empty when unparsable."""
    try:
        doc: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    return prompt_prefix(doc, limit)


def prompt_prefix(doc: Any, limit: int = PREFIX_CHARS) -> str:
    """prefix_of for a body already parsed (`doc`: its JSON value, None if it was none)."""
    if not isinstance(doc, dict):
        return ""
    messages = doc.get("messages")
    if isinstance(messages, list):
        parts: list[str] = []
        size = 0
        for message in messages:
            if not isinstance(message, dict):
                continue
            text = f"{message.get('role', '')}:{_text_of(message.get('content'))}\n"
            parts.append(text)
            size += len(text)
            if size >= limit:
                break
        return "".join(parts)[:limit]
    prompt = doc.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch: route by its first prompt
    if isinstance(prompt, str):
        return prompt[:limit]
    if isinstance(prompt, list):  # token ids
        return ",".join(str(t) for t in prompt[: limit // 4])[:limit]
    return ""
