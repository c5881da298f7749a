"""kv_events routing driven by vLLM's wire format: msgpack EventBatches (encoded with the
same msgspec Struct shapes vLLM's distributed/kv_events.py declares) sent as vLLM's ZMQ
publisher sends them, `[topic, seq, payload]` from a bound PUB socket, to the router's real
subscription. The index must follow BlockStored / BlockRemoved / AllBlocksCleared, forget
a lost engine, and the router must pick the longest cached prefix unless its holder is busy.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
from aiohttp import web

from sage.services.scheduler.registry import EngineKind, EngineRecord
from sage.services.scheduler.routing import KvEventsRouter, RouteRequest, create_router
from sage.services.scheduler.routing.kv_events import KV_EVENTS_LABEL

BLOCK = 4
MODEL = "m"


# vLLM's own message shapes (vllm/distributed/kv_events.py, 0.32).
class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):  # type: ignore[call-arg]
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):  # type: ignore[call-arg]
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int]
    medium: str | None


class AllBlocksCleared(KVCacheEvent):
    pass


@dataclass
class Publisher:
    """One engine's publisher: a bound PUB socket sending vLLM's multipart messages, with
    vLLM-style block hashes of its own (random per process, unlike ours)."""

    socket: zmq.Socket[bytes]
    endpoint: str
    seq: int = 0
    hashes: dict[tuple[int, ...], int] = field(default_factory=dict)

    def vllm_hashes(self, tokens: Sequence[int]) -> list[int]:
        """This engine's hash of each whole block of `tokens` (any stable function will do:
        the router must not depend on it)."""
        out = []
        for end in range(BLOCK, len(tokens) + 1, BLOCK):
            key = tuple(tokens[:end])
            out.append(self.hashes.setdefault(key, 10_000 + len(self.hashes) * 7919))
        return out

    def send(self, *events: KVCacheEvent) -> None:
        payload = msgspec.msgpack.encode(EventBatch(ts=time.time(), events=list(events)))
        self.socket.send_multipart([b"kv", self.seq.to_bytes(8, "big"), payload])
        self.seq += 1

    def store(self, tokens: Sequence[int], start_block: int = 0) -> None:
        """BlockStored for blocks start_block.. of `tokens` (parent: the block before)."""
        hashes = self.vllm_hashes(tokens)
        parent = hashes[start_block - 1] if start_block else None
        self.send(
            BlockStored(
                block_hashes=hashes[start_block:],
                parent_block_hash=parent,
                token_ids=list(tokens[start_block * BLOCK : len(hashes) * BLOCK]),
                block_size=BLOCK,
                lora_id=None,
                medium="GPU",
                lora_name=None,
            )
        )

    def remove(self, tokens: Sequence[int], block: int) -> None:
        self.send(BlockRemoved(block_hashes=[self.vllm_hashes(tokens)[block]], medium="GPU"))


class Loads:
    """Engine loads the test sets (the scheduler's tracker stands here)."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def load(self, engine_id: str) -> float:
        return self.values.get(engine_id, 0.0)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Short: a Unix socket path holds at most 107 bytes, pytest's tmp_path can be longer.
    folder = Path(tempfile.mkdtemp(prefix="kv", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def router() -> AsyncIterator[KvEventsRouter]:
    made = KvEventsRouter(Loads(), load_margin=2.0)
    yield made
    await made.aclose()


@pytest.fixture
def publishers(sock_dir: Path) -> Iterator[Callable[[str], Publisher]]:
    context = zmq.Context()
    made: list[zmq.Socket[bytes]] = []

    def make(name: str) -> Publisher:
        socket = context.socket(zmq.PUB)
        endpoint = f"ipc://{sock_dir / name}.sock"
        socket.bind(endpoint)
        made.append(socket)
        return Publisher(socket, endpoint)

    yield make
    for socket in made:
        socket.close(linger=0)
    context.term()


def engine(engine_id: str, publisher: Publisher | None, pid: int = 1) -> EngineRecord:
    labels = {KV_EVENTS_LABEL: publisher.endpoint} if publisher else {}
    return EngineRecord(
        # Port 1 refuses connections: a tokenize call fails at once.
        engine_id,
        MODEL,
        EngineKind.LLM,
        "http://127.0.0.1:1",
        pid=pid,
        labels=labels,
    )


async def until(check: Callable[[], bool], what: str) -> None:
    for _ in range(400):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def connect(
    router: KvEventsRouter, engines: list[EngineRecord], pubs: list[Publisher]
) -> None:
    """Subscribe and wait until each subscription receives (ZMQ drops what a PUB socket
    sends before the subscriber has joined)."""
    router.reconcile(engines)
    for record, pub in zip(engines, pubs, strict=True):
        for _ in range(500):
            if record.engine_id in router.index.engines():
                break
            pub.send()  # an empty batch
            await asyncio.sleep(0.01)
        else:
            raise AssertionError(f"{record.engine_id}: no batch arrived")


def route(tokens: Sequence[int]) -> RouteRequest:
    return RouteRequest(MODEL, prefix="x" * 100, token_ids=tuple(tokens))


PROMPT = list(range(100, 124))  # 6 whole blocks


async def test_longest_cached_prefix_wins(
    router: KvEventsRouter, publishers: Callable[[str], Publisher]
) -> None:
    a, b = publishers("a"), publishers("b")
    engines = [engine("a", a), engine("b", b)]
    await connect(router, engines, [a, b])
    a.store(PROMPT[: 2 * BLOCK])  # blocks 0-1
    b.store(PROMPT[: 2 * BLOCK])
    b.store(PROMPT[: 5 * BLOCK], start_block=2)  # blocks 2-4, chained on block 1
    await until(lambda: router.index.block_count("b") == 5, "b's blocks")
    assert router.index.block_count("a") == 2
    for _ in range(4):
        assert router.pick(route(PROMPT), engines).engine_id == "b"
    # A prompt sharing only the first 2 blocks: a tie, broken by load.
    other = PROMPT[: 2 * BLOCK] + [7] * 16
    router.load.values["b"] = 1.0  # type: ignore[attr-defined]
    assert router.pick(route(other), engines).engine_id == "a"
    assert router.decisions["kv_hit"] == 5


async def test_removed_and_cleared_blocks_stop_attracting(
    router: KvEventsRouter, publishers: Callable[[str], Publisher]
) -> None:
    a, b = publishers("a"), publishers("b")
    engines = [engine("a", a), engine("b", b)]
    await connect(router, engines, [a, b])
    a.store(PROMPT[: 2 * BLOCK])
    b.store(PROMPT)
    await until(lambda: router.index.block_count("b") == 6, "b's blocks")
    assert router.pick(route(PROMPT), engines).engine_id == "b"
    b.remove(PROMPT, 1)  # b keeps block 0 only: a's 2 blocks are longer now
    await until(lambda: router.index.block_count("b") == 5, "b's removal")
    assert router.pick(route(PROMPT), engines).engine_id == "a"
    a.send(AllBlocksCleared())
    b.send(AllBlocksCleared())
    await until(lambda: router.index.block_count("a") == 0, "a's clear")
    await until(lambda: router.index.block_count("b") == 0, "b's clear")
    router.pick(route(PROMPT), engines)
    assert router.decisions["fallback"] == 1  # nothing cached anywhere: prefix_aware decided


async def test_lost_or_restarted_engine_is_forgotten(
    router: KvEventsRouter, publishers: Callable[[str], Publisher]
) -> None:
    a, b = publishers("a"), publishers("b")
    engines = [engine("a", a), engine("b", b)]
    await connect(router, engines, [a, b])
    a.store(PROMPT)
    b.store(PROMPT[:BLOCK])
    await until(lambda: router.index.block_count("a") == 6, "a's blocks")
    await until(lambda: router.index.block_count("b") == 1, "b's blocks")
    router.reconcile(engines[1:])  # a left the registry
    assert router.index.block_count("a") == 0
    assert router.pick(route(PROMPT), engines[1:]).engine_id == "b"
    # b restarted (lifecycle registered a new pid): its old cache is gone with it.
    router.reconcile([engine("b", b, pid=2)])
    assert router.index.block_count("b") == 0
    # A publisher whose sequence starts again is a new process too.
    await connect(router, [engine("b", b, pid=2)], [b])
    b.store(PROMPT)
    await until(lambda: router.index.block_count("b") == 6, "b's blocks again")
    b.seq = 0
    b.send()
    await until(lambda: router.index.block_count("b") == 0, "b's restart")


async def test_a_busy_holder_sheds_to_the_least_loaded(
    router: KvEventsRouter, publishers: Callable[[str], Publisher]
) -> None:
    a, b = publishers("a"), publishers("b")
    silent = engine("c", None)  # publishes nothing: only prefix_aware knows it
    engines = [engine("a", a), engine("b", b), silent]
    await connect(router, engines[:2], [a, b])
    a.store(PROMPT)
    await until(lambda: router.index.block_count("a") == 6, "a's blocks")
    loads: dict[str, float] = router.load.values  # type: ignore[attr-defined]
    loads.update(a=2.0, b=1.0, c=0.0)
    assert router.pick(route(PROMPT), engines).engine_id == "a"  # within the margin
    loads["a"] = 3.0  # 3 more than c: over the margin of 2
    assert router.pick(route(PROMPT), engines).engine_id == "c"
    assert router.decisions["load_guard"] == 1


async def test_blocks_it_cannot_rebuild_are_not_indexed(
    router: KvEventsRouter, publishers: Callable[[str], Publisher]
) -> None:
    a = publishers("a")
    engines = [engine("a", a)]
    await connect(router, engines, [a])
    hashes = a.vllm_hashes(PROMPT)
    # An adapter's blocks, and blocks whose parent's event never arrived.
    a.send(
        BlockStored(hashes[:2], None, PROMPT[:8], BLOCK, None, "GPU", "my-lora"),
        BlockStored(hashes[3:5], hashes[2], PROMPT[12:20], BLOCK, None, "GPU", None),
    )
    a.send()
    await until(lambda: router.index.stats.skipped == 4, "skipped blocks")
    assert router.index.block_count("a") == 0


async def test_annotate_tokenizes_only_when_some_engine_holds_blocks(
    router: KvEventsRouter, publishers: Callable[[str], Publisher]
) -> None:
    a = publishers("a")
    engines = [engine("a", a), engine("c", None)]
    await connect(router, engines[:1], [a])
    bare = RouteRequest(MODEL, prefix="p")
    # Nothing cached yet: the engine is not asked (it would refuse).
    assert await router.annotate(bare, {"prompt": "hello"}, engines) == bare
    a.store(PROMPT)
    await until(lambda: router.index.block_count("a") == 6, "a's blocks")
    # Token ids in the prompt need no tokenizer.
    got = await router.annotate(bare, {"prompt": PROMPT}, engines)
    assert got.token_ids == tuple(PROMPT)
    assert router.pick(got, engines).engine_id == "a"
    # One engine leaves nothing to choose: no work at all.
    assert await router.annotate(bare, {"prompt": PROMPT}, engines[:1]) == bare
    # An unreachable tokenizer leaves the request to prefix_aware.
    assert await router.annotate(bare, {"prompt": "hello"}, engines) == bare


def test_registered_by_name() -> None:
    assert isinstance(create_router("kv_events"), KvEventsRouter)


# -- where the token ids come from: the scheduler's copy of the tokenizer or the engine ----

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ bos_token }}{{ m['role'] }} | {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant |{% endif %}"
)
WORDS = ["[UNK]", "[BOS]", "user", "system", "assistant", "|", "tell", "me", "about", "caches"]


def write_model(folder: Path) -> Path:
    """A model folder as vLLM reads it: tokenizer.json (a word-level tokenizer built with
    `tokenizers`) and tokenizer_config.json naming bos_token and the chat template."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    tokenizer.add_special_tokens(["[BOS]"])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "[BOS]", "eos_token": "[UNK]", "chat_template": CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@dataclass
class FakeTokenize:
    """An engine's POST /tokenize in vLLM's reply shape (the engine's HTTP API is the
    boundary here), answering with `answer(body)`; counts the calls it gets."""

    answer: Callable[[dict[str, Any]], list[int]]
    bodies: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        tokens = self.answer(body)
        return web.json_response({"count": len(tokens), "max_model_len": 4096, "tokens": tokens})


@pytest.fixture
async def fake_engine() -> AsyncIterator[Callable[[Callable[[dict[str, Any]], list[int]]], Any]]:
    runners: list[web.AppRunner] = []

    async def start(answer: Callable[[dict[str, Any]], list[int]]) -> FakeTokenize:
        fake = FakeTokenize(answer)
        app = web.Application()
        app.router.add_post("/tokenize", fake.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        fake.url = f"http://127.0.0.1:{port}"
        return fake

    yield start
    for runner in runners:
        await runner.cleanup()


def chat(question: str) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": "tell me"},
            {"role": "user", "content": [{"type": "text", "text": question}]},
        ]
    }


def engine_ids(folder: Path) -> Callable[[dict[str, Any]], list[int]]:
    """What vLLM answers for `folder`'s model (transformers' rendering, by hand here)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))

    def answer(body: dict[str, Any]) -> list[int]:
        if "prompt" in body:
            return list(tokenizer.encode(body["prompt"]).ids)
        text = ""
        for m in body["messages"]:
            content = m["content"]
            if isinstance(content, list):
                content = "\n".join(part["text"] for part in content)
            text += f"[BOS]{m['role']} | {content}\n"
        return list(tokenizer.encode(text + "assistant |", add_special_tokens=False).ids)

    return answer


Answer = Callable[[dict[str, Any]], list[int]]
Serve = Callable[[str, Answer], Awaitable[tuple[FakeTokenize, list[EngineRecord]]]]


@pytest.fixture
def serving(
    router: KvEventsRouter, publishers: Callable[[str], Publisher], fake_engine: Any
) -> Serve:
    """serving(model, answer): two engines of `model` behind one fake /tokenize answering
    with `answer`, one of them holding blocks (so annotate looks for token ids)."""

    async def serve(model: str, answer: Answer) -> tuple[FakeTokenize, list[EngineRecord]]:
        fake = await fake_engine(answer)
        a, b = publishers("a"), publishers("b")
        engines = [
            EngineRecord(
                n, model, EngineKind.LLM, fake.url, pid=1, labels={KV_EVENTS_LABEL: p.endpoint}
            )
            for n, p in (("a", a), ("b", b))
        ]
        await connect(router, engines, [a, b])
        a.store(PROMPT)
        await until(lambda: router.index.block_count("a") == 6, "a's blocks")
        return fake, engines

    return serve


def tokenize_counts(router: KvEventsRouter) -> dict[str, float]:
    """sage:kv_tokenize_seconds_count by path, as the scheduler's /metrics exposes it."""
    family = next(f for f in router.collect() if f.name == "sage:kv_tokenize_seconds")
    return {s.labels["path"]: s.value for s in family.samples if s.name.endswith("_count")}


async def test_token_ids_come_from_the_local_tokenizer_once_the_engine_agrees(
    router: KvEventsRouter, serving: Serve, tmp_path: Path
) -> None:
    folder = write_model(tmp_path / "model")
    fake, engines = await serving(str(folder), engine_ids(folder))
    bare = RouteRequest(str(folder), prefix="p")
    expected = engine_ids(folder)({"messages": chat("about caches")["messages"]})
    for _ in range(3):
        got = await router.annotate(bare, chat("about caches"), engines)
        assert got.token_ids == tuple(expected)
    # The first chat was checked against the engine; the next two needed no call.
    assert len(fake.bodies) == 1 and "messages" in fake.bodies[0]
    for _ in range(2):
        got = await router.annotate(bare, {"prompt": "tell me about caches"}, engines)
        assert got.token_ids == tuple(engine_ids(folder)({"prompt": "tell me about caches"}))
    assert len(fake.bodies) == 2 and fake.bodies[1]["add_special_tokens"] is True
    assert tokenize_counts(router) == {"engine": 2, "local": 3}
    # A request the local copy does not render (tools) goes to the engine.
    await router.annotate(bare, {**chat("me"), "tools": [{"type": "function"}]}, engines)
    assert len(fake.bodies) == 3


async def test_engine_tokenizes_when_the_local_copy_disagrees(
    router: KvEventsRouter, serving: Serve, tmp_path: Path
) -> None:
    folder = write_model(tmp_path / "model")
    # This engine reads the model otherwise (its own template, say): ids differ.
    fake, engines = await serving(str(folder), lambda body: [9, 8, 7, 6, 5])
    bare = RouteRequest(str(folder), prefix="p")
    for _ in range(3):
        got = await router.annotate(bare, chat("about caches"), engines)
        assert got.token_ids == (9, 8, 7, 6, 5)
    assert len(fake.bodies) == 3
    assert tokenize_counts(router) == {"engine": 3}
    mismatches = next(f for f in router.collect() if f.name == "sage:kv_local_tokenizer_mismatches")
    assert mismatches.samples[0].value == 1


async def test_engine_tokenizes_a_model_whose_files_are_elsewhere(
    router: KvEventsRouter, serving: Serve
) -> None:
    # A hub id not in the local cache (the engine runs on another host): no local copy.
    fake, engines = await serving("nobody/not-cached-here", lambda body: [1, 2, 3])
    bare = RouteRequest("nobody/not-cached-here", prefix="p")
    for _ in range(2):
        assert (await router.annotate(bare, chat("me"), engines)).token_ids == (1, 2, 3)
    assert len(fake.bodies) == 2
    assert tokenize_counts(router) == {"engine": 2}
