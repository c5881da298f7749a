"""Scheduler (core.py) driven directly, with a fake at the engine boundary: queueing while
engines are full, failover of a request to another engine, a stream cut mid-way continued
elsewhere, slots given back by callers who leave, per-model lanes and aliases, and the
SageErrors a caller gets.

FakeEngines answers like a greedy vLLM engine (same chunk shapes, token ids when asked, a
token-id prompt continued where it ends) and fails the ways HttpExecutionCoordinator
reports it: EngineUnreachableError for a refused connection, EngineDisconnectedError for a
dropped one, the mapped SageError for an error reply.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from sage.common.exceptions import (
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    SageError,
    UpstreamError,
)
from sage.services.scheduler.admission import AdmissionController
from sage.services.scheduler.core import Scheduler
from sage.services.scheduler.executor import EngineDisconnectedError, EngineUnreachableError
from sage.services.scheduler.load import EngineLoadTracker
from sage.services.scheduler.registry import EngineKind, EngineRecord, EngineRegistry, EngineState
from sage.services.scheduler.routing import create_router

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
PROMPT_IDS = [1, 2, 3]  # the chat prompt as the engine tokenized it
WORDS = ["Hello", " there", ",", " my", " friend", "."]  # the greedy reply, one token each
WORD_IDS = [101, 102, 103, 104, 105, 106]
REPLY = "".join(WORDS)


@dataclass
class Call:
    """One request an engine received."""

    engine_id: str
    path: str
    doc: dict[str, Any]


class FakeEngines:
    """The engines behind the executor interface (core.EngineExecutor)."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.refuse: set[str] = set()  # connection refused
        self.drop: set[str] = set()  # connection dropped before a unary reply
        self.errors: dict[str, SageError] = {}  # an error reply, as the executor maps it
        self.held: dict[str, asyncio.Event] = {}  # replies wait until the event is set
        self.cuts: deque[int] = deque()  # the next stream attempts die after N tokens
        self.closed_early: list[str] = []  # streams their caller stopped reading

    def hold(self, *engine_ids: str) -> None:
        """Make these engines' replies wait until `release`."""
        for engine_id in engine_ids:
            self.held[engine_id] = asyncio.Event()

    def release(self, engine_id: str) -> None:
        """Let the held replies of `engine_id` go."""
        self.held.pop(engine_id).set()

    async def _receive(self, engine: EngineRecord, path: str, body: bytes) -> dict[str, Any]:
        if engine.engine_id in self.refuse:
            raise EngineUnreachableError(f"engine {engine.engine_id} is unreachable")
        doc: dict[str, Any] = orjson.loads(body)
        self.calls.append(Call(engine.engine_id, path, doc))
        gate = self.held.get(engine.engine_id)
        if gate is not None:
            await gate.wait()
        error = self.errors.get(engine.engine_id)
        if error is not None:
            raise error
        return doc

    def abort(self, engine: EngineRecord, reason: str) -> int:
        """No connections here to cut (the HTTP executor's abort is tested over sockets)."""
        return 0

    async def post_json(self, engine: EngineRecord, path: str, body: bytes) -> bytes:
        """A whole chat reply from where the request's prompt leaves off."""
        doc = await self._receive(engine, path, body)
        if engine.engine_id in self.drop:
            raise EngineDisconnectedError(f"engine {engine.engine_id} dropped the connection")
        start, end, _ = _span(path, doc)
        n = end - start
        return orjson.dumps(
            {
                "id": f"chatcmpl-{engine.engine_id}",
                "object": "chat.completion",
                "model": doc["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(WORDS[start:end])},
                        "finish_reason": "stop" if end == len(WORDS) else "length",
                    }
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n},
            }
        )

    def stream_sse(self, engine: EngineRecord, path: str, body: bytes) -> AsyncIterator[bytes]:
        """vLLM's chunks for the rest of the reply (chat or completion shape)."""
        return self._stream(engine, path, body, self.cuts.popleft() if self.cuts else None)

    async def _stream(
        self, engine: EngineRecord, path: str, body: bytes, cut: int | None
    ) -> AsyncIterator[bytes]:
        doc = await self._receive(engine, path, body)
        start, end, with_ids = _span(path, doc)
        chat = path == CHAT
        head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{engine.engine_id}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": len(self.calls),
            "model": doc["model"],
        }
        finished = False
        try:
            if chat:
                role = {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "finish_reason": None,
                }
                yield _chunk(head, role, prompt_token_ids=PROMPT_IDS if with_ids else None)
            for i in range(start, end + 1):
                if cut is not None and i - start == cut:
                    raise EngineDisconnectedError(f"engine {engine.engine_id} closed the stream")
                if i == end:
                    break
                ids = [WORD_IDS[i]] if with_ids else None
                finish = ("stop" if end == len(WORDS) else "length") if i == end - 1 else None
                choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "token_ids": ids}
                if chat:
                    choice["delta"] = {"content": WORDS[i]}
                else:
                    choice["text"] = WORDS[i]
                yield _chunk(head, choice)
            finished = True
        finally:
            if not finished and cut is None:
                self.closed_early.append(engine.engine_id)


def _chunk(head: dict[str, Any], choice: dict[str, Any], **extra: Any) -> bytes:
    return orjson.dumps({**head, "choices": [{"logprobs": None, **choice}], **extra})


def _span(path: str, doc: dict[str, Any]) -> tuple[int, int, bool]:
    """(first word, end word, token ids asked for) of the reply to `doc`: a continuation
    starts where its prompt (ids, or an assistant message continued) leaves off."""
    start = 0
    if path == COMPLETIONS:
        prompt = doc["prompt"]
        assert prompt[: len(PROMPT_IDS)] == PROMPT_IDS, prompt
        start = len(prompt) - len(PROMPT_IDS)
        assert prompt[len(PROMPT_IDS) :] == WORD_IDS[:start], prompt
    elif doc.get("continue_final_message"):
        sent = doc["messages"][-1]["content"]
        start = next(k for k in range(len(WORDS) + 1) if "".join(WORDS[:k]) == sent)
    limit = doc.get("max_tokens") or doc.get("max_completion_tokens") or len(WORDS)
    return start, min(len(WORDS), start + limit), doc.get("return_token_ids") is True


def _engine(engine_id: str, model: str = "m", **fields: Any) -> EngineRecord:
    return EngineRecord(engine_id, model, EngineKind.LLM, f"http://{engine_id}", **fields)


def _scheduler(
    fake: FakeEngines,
    *engines: EngineRecord,
    per_engine: int = -1,
    max_queue: int = 100,
    routing: str = "round_robin",
) -> Scheduler:
    registry = EngineRegistry()
    for engine in engines:
        registry.register(engine)
    load = EngineLoadTracker()
    return Scheduler(
        registry,
        create_router(routing, load),
        fake,
        admission=AdmissionController(per_engine=per_engine, max_queue=max_queue),
        load=load,
    )


def _chat(model: str = "m", **fields: Any) -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], **fields})


async def _until(condition: Callable[[], bool]) -> None:
    """Let the scheduler's tasks run until `condition` holds (everything is in this loop,
    so a few hundred turns are plenty)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


async def _read(chunks: AsyncIterator[tuple[bytes, EngineRecord]]) -> list[dict[str, Any]]:
    return [orjson.loads(data) async for data, _ in chunks]


def _text(docs: list[dict[str, Any]]) -> str:
    return "".join(d["choices"][0]["delta"].get("content") or "" for d in docs if d["choices"])


async def test_requests_beyond_the_engines_slots_wait_and_go_to_the_engine_that_frees_one() -> None:
    fake = FakeEngines()
    scheduler = _scheduler(fake, _engine("e0"), _engine("e1"), per_engine=1)
    fake.hold("e0", "e1")
    tasks = [asyncio.create_task(scheduler.generate("m", _chat(), CHAT)) for _ in range(3)]
    await _until(lambda: len(fake.calls) == 2 and scheduler.admission.queued_for("m") == 1)
    assert sorted(c.engine_id for c in fake.calls) == ["e0", "e1"]  # one each, one waits

    fake.release("e1")  # round robin's next turn is e0's, which is still busy
    await _until(lambda: len(fake.calls) == 3)
    assert fake.calls[2].engine_id == "e1"  # not queued behind busy e0
    assert scheduler.admission.queued_for("m") == 0
    fake.release("e0")
    results = await asyncio.gather(*tasks)
    assert sorted(r.engine.engine_id for r in results) == ["e0", "e1", "e1"]
    assert all(orjson.loads(r.body)["choices"][0]["message"]["content"] == REPLY for r in results)
    assert scheduler.counters.in_flight == 0


@pytest.mark.parametrize("fault", ["refuse", "drop"])
async def test_a_request_an_engine_refuses_or_drops_is_answered_by_another(fault: str) -> None:
    fake = FakeEngines()
    getattr(fake, fault).add("e0")
    scheduler = _scheduler(fake, _engine("e0"), _engine("e1"))
    for _ in range(2):  # whichever engine round robin picks first
        result = await scheduler.generate("m", _chat(), CHAT)
        assert result.engine.engine_id == "e1"
        assert orjson.loads(result.body)["choices"][0]["message"]["content"] == REPLY
        assert result.usage.total_tokens == 3 + len(WORDS)
    assert scheduler.counters.requests_failed == 0


@pytest.mark.parametrize("drained", [0, 1])
async def test_failover_passes_by_an_engine_that_left_routing_meanwhile(drained: int) -> None:
    """The engine a request was on drops it; of the two failover candidates one left
    routing since (drained, or its node lost: a new connection there would wait out the
    connect timeout): the other answers, whichever order the router put them in."""
    fake = FakeEngines()
    scheduler = _scheduler(fake, _engine("e0"), _engine("e1"), _engine("e2"))
    fake.hold("e0", "e1", "e2")
    task = asyncio.create_task(scheduler.generate("m", _chat(), CHAT))
    await _until(lambda: len(fake.calls) == 1)
    first = fake.calls[0].engine_id
    others = sorted({"e0", "e1", "e2"} - {first})
    scheduler.registry.set_state(others[drained], EngineState.DRAINING)
    fake.drop.add(first)
    for engine_id in ("e0", "e1", "e2"):
        fake.release(engine_id)
    result = await task
    assert result.engine.engine_id == others[1 - drained]
    assert [c.engine_id for c in fake.calls] == [first, others[1 - drained]]


async def test_every_engine_refusing_is_an_upstream_error() -> None:
    fake = FakeEngines()
    fake.refuse |= {"e0", "e1"}
    scheduler = _scheduler(fake, _engine("e0"), _engine("e1"))
    with pytest.raises(UpstreamError) as caught:
        await scheduler.generate("m", _chat(), CHAT)
    assert caught.value.http_status == 502
    assert scheduler.counters.requests_failed == 1


async def test_an_engines_error_reply_reaches_the_caller_and_is_not_retried_elsewhere() -> None:
    fake = FakeEngines()
    fake.errors["e0"] = fake.errors["e1"] = InvalidRequestError(
        "max_tokens is too large", param="max_tokens"
    )
    scheduler = _scheduler(fake, _engine("e0"), _engine("e1"))
    with pytest.raises(InvalidRequestError, match="max_tokens is too large"):
        await scheduler.generate("m", _chat(max_tokens=10**9), CHAT)
    assert len(fake.calls) == 1  # a bad request is the client's, not the engine's fault


async def test_an_unknown_model_is_model_not_found_and_reaches_no_engine() -> None:
    fake = FakeEngines()
    scheduler = _scheduler(fake, _engine("e0"))
    with pytest.raises(ModelNotFoundError):
        await scheduler.generate("nope", _chat("nope"), CHAT)
    with pytest.raises(ModelNotFoundError):
        await _read(scheduler.generate_stream("nope", _chat("nope"), CHAT))
    assert fake.calls == []


async def test_a_full_queue_refuses_at_once_with_overloaded() -> None:
    fake = FakeEngines()
    scheduler = _scheduler(fake, _engine("e0"), per_engine=1, max_queue=1)
    fake.hold("e0")
    running = asyncio.create_task(scheduler.generate("m", _chat(), CHAT))
    queued = asyncio.create_task(scheduler.generate("m", _chat(), CHAT))
    await _until(lambda: scheduler.admission.queued_for("m") == 1)
    with pytest.raises(OverloadedError) as caught:
        await scheduler.generate("m", _chat(), CHAT)
    assert caught.value.http_status == 429
    fake.release("e0")
    await asyncio.gather(running, queued)


@pytest.mark.parametrize("backend", ["sim", "transformers"])
async def test_a_stream_cut_midway_is_continued_on_another_engine(backend: str) -> None:
    """sim speaks vLLM's token ids (continued from ids as a completion), transformers does
    not (continued from the text as the assistant's message); the client sees one stream."""
    fake = FakeEngines()
    fake.cuts.append(2)  # the first engine dies after two tokens
    scheduler = _scheduler(fake, _engine("e0", backend=backend), _engine("e1", backend=backend))
    docs = await _read(scheduler.generate_stream("m", _chat(max_tokens=50), CHAT))

    assert _text(docs) == REPLY  # every token once, in order
    assert [d["choices"][0]["finish_reason"] for d in docs].count("stop") == 1
    assert sum("role" in d["choices"][0]["delta"] for d in docs) == 1
    first = fake.calls[0].engine_id
    assert {d["id"] for d in docs} == {f"chatcmpl-{first}"}  # one stream's id throughout
    assert all(d["object"] == "chat.completion.chunk" for d in docs)
    assert all(d["choices"][0].get("token_ids") is None for d in docs)  # not asked for
    second = fake.calls[1]
    assert second.engine_id != first
    assert second.doc.get("max_tokens") == 50 - 2
    if backend == "sim":
        assert second.path == COMPLETIONS
        assert second.doc["prompt"] == PROMPT_IDS + WORD_IDS[:2]
    else:
        assert second.path == CHAT
        assert second.doc["messages"][-1] == {"role": "assistant", "content": "".join(WORDS[:2])}
    assert scheduler.counters.requests_failed == 0


@pytest.mark.parametrize("routing", ["round_robin", "prefix_aware"])
async def test_a_stream_to_an_alias_cut_midway_goes_on_under_the_engines_model_name(
    routing: str,
) -> None:
    fake = FakeEngines()
    fake.cuts.append(3)
    scheduler = _scheduler(
        fake,
        _engine("e0", backend="sim", aliases=("latest",)),
        _engine("e1", backend="sim", aliases=("latest",)),
        routing=routing,
    )
    docs = await _read(scheduler.generate_stream("latest", _chat("latest", max_tokens=50), CHAT))
    assert _text(docs) == REPLY
    assert [c.doc["model"] for c in fake.calls] == ["m", "m"]
    assert fake.calls[1].doc["prompt"] == PROMPT_IDS + WORD_IDS[:3]
    assert fake.calls[1].doc["max_tokens"] == 50 - 3


async def test_a_stream_cut_with_no_engine_left_ends_in_an_upstream_error() -> None:
    fake = FakeEngines()
    fake.cuts.append(2)
    scheduler = _scheduler(fake, _engine("e0", backend="sim"))
    seen: list[bytes] = []
    with pytest.raises(UpstreamError, match="mid-stream"):
        async for data, _ in scheduler.generate_stream("m", _chat(max_tokens=50), CHAT):
            seen.append(data)
    assert _text([orjson.loads(d) for d in seen]) == "".join(WORDS[:2])  # what was sent
    assert scheduler.counters.requests_failed == 1


async def test_a_stream_cut_after_its_last_token_is_not_continued() -> None:
    fake = FakeEngines()
    fake.cuts.append(2)  # the engine dies after its finish chunk, before [DONE]
    scheduler = _scheduler(fake, _engine("e0", backend="sim"), _engine("e1", backend="sim"))
    docs = await _read(scheduler.generate_stream("m", _chat(max_tokens=2), CHAT))
    assert _text(docs) == "".join(WORDS[:2])  # the client had the whole reply
    assert docs[-1]["choices"][0]["finish_reason"] == "length"
    assert len(fake.calls) == 1
    assert scheduler.counters.requests_failed == 0


async def test_a_stream_refused_before_its_first_byte_starts_on_another_engine() -> None:
    fake = FakeEngines()
    fake.refuse.add("e0")
    scheduler = _scheduler(fake, _engine("e0"), _engine("e1"))
    for _ in range(2):
        chunks = [
            (orjson.loads(d), e.engine_id)
            async for d, e in scheduler.generate_stream("m", _chat(), CHAT)
        ]
        assert {engine_id for _, engine_id in chunks} == {"e1"}
        assert _text([d for d, _ in chunks]) == REPLY
        assert {d["id"] for d, _ in chunks} == {"chatcmpl-e1"}


async def test_a_cancelled_request_gives_its_slot_to_the_next_in_line() -> None:
    fake = FakeEngines()
    scheduler = _scheduler(fake, _engine("e0"), per_engine=1)
    fake.hold("e0")
    first = asyncio.create_task(scheduler.generate("m", _chat(), CHAT))
    await _until(lambda: len(fake.calls) == 1)
    second = asyncio.create_task(scheduler.generate("m", _chat(), CHAT))
    third = asyncio.create_task(scheduler.generate("m", _chat(), CHAT))
    await _until(lambda: scheduler.admission.queued_for("m") == 2)

    third.cancel()  # a caller gone while queued leaves the queue
    await _until(lambda: scheduler.admission.queued_for("m") == 1)
    first.cancel()  # a caller gone while its engine works frees the engine's slot
    await _until(lambda: len(fake.calls) == 2)
    assert scheduler.load.in_flight("e0") == 1  # only the second's
    fake.release("e0")
    assert (await second).engine.engine_id == "e0"
    for task in (first, third):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert scheduler.counters.in_flight == 0
    assert scheduler.load.in_flight("e0") == 0
    assert scheduler.admission.queued_for("m") == 0


async def test_a_client_leaving_a_stream_closes_the_engine_stream_and_frees_its_slot() -> None:
    fake = FakeEngines()
    scheduler = _scheduler(fake, _engine("e0"), per_engine=1)
    chunks = scheduler.generate_stream("m", _chat(), CHAT)
    assert isinstance(chunks, AsyncGenerator)
    read = 0
    async for _ in chunks:
        read += 1
        if read == 2:
            break
    await chunks.aclose()
    await _until(lambda: fake.closed_early == ["e0"])  # the engine sees the disconnect
    assert scheduler.load.in_flight("e0") == 0
    result = await asyncio.wait_for(scheduler.generate("m", _chat(), CHAT), 30)  # hang guard
    assert result.engine.engine_id == "e0"
    assert scheduler.counters.in_flight == 0


async def test_an_alias_reaches_the_models_engines_and_waits_in_the_models_lane() -> None:
    fake = FakeEngines()
    scheduler = _scheduler(fake, _engine("e0", aliases=("latest",)), per_engine=1)
    fake.hold("e0")
    busy = asyncio.create_task(scheduler.generate("m", _chat(), CHAT))
    await _until(lambda: len(fake.calls) == 1)
    aliased = asyncio.create_task(scheduler.generate("latest", _chat("latest"), CHAT))
    await _until(lambda: scheduler.admission.queued_for("m") == 1)  # same lane, same slots
    fake.release("e0")
    await busy
    result = await aliased
    assert fake.calls[1].doc["model"] == "m"  # the engine is asked for the name it serves
    assert result.engine.engine_id == "e0"


async def test_a_busy_model_does_not_hold_up_another_models_requests() -> None:
    fake = FakeEngines()
    scheduler = _scheduler(fake, _engine("a0", "a"), _engine("b0", "b"), per_engine=1)
    fake.hold("a0")
    running = asyncio.create_task(scheduler.generate("a", _chat("a"), CHAT))
    waiting = asyncio.create_task(scheduler.generate("a", _chat("a"), CHAT))
    await _until(lambda: scheduler.admission.queued_for("a") == 1)
    result = await scheduler.generate("b", _chat("b"), CHAT)  # served while a's queue waits
    assert result.engine.engine_id == "b0"
    assert scheduler.admission.queued_for("a") == 1
    fake.release("a0")
    assert [r.engine.engine_id for r in await asyncio.gather(running, waiting)] == ["a0", "a0"]
