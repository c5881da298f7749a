"""Multiplex: the edge's requests as tagged messages on one call to a real scheduler.

Each request must behave as its own unary call did: right reply to the right caller, the
scheduler's error rebuilt exactly, deadlines, cancels that reach the engine, a clean end at
shutdown, and the unary calls when the scheduler has no Multiplex.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import orjson
import pytest

from sage.common.config.settings import SageSettings
from sage.common.exceptions import (
    DeadlineExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    ServiceUnavailableError,
)
from sage.common.grpc import create_channel, create_server, token_metadata
from sage.common.grpc.server import Registration
from sage.rpc.common.v1 import common_pb2
from sage.rpc.scheduler.v1 import scheduler_pb2 as spb
from sage.rpc.scheduler.v1 import scheduler_pb2_grpc as spb_grpc
from sage.services.edge.mux import SchedulerMux
from sage.services.scheduler.mux import MultiplexSessions, Route
from sage.services.scheduler.server import build_server as build_scheduler

SimFactory = Callable[..., str]


def _chat(max_tokens: int, *, model: str = "sim", stream: bool = False) -> bytes:
    return orjson.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": max_tokens,
            "stream": stream,
        }
    )


class Plane:
    """A real scheduler on port 0, its stub, and a SchedulerMux over its channel."""

    def __init__(self, settings: SageSettings) -> None:
        self.settings = settings
        self.server: Any = None
        self.port = 0

    async def start(self, port: int = 0) -> None:
        self.server, self.port = build_scheduler(self.settings, f"127.0.0.1:{port}")
        await self.server.start()

    async def register(self, base_url: str, engine_id: str = "e1") -> None:
        await self.stub.RegisterEngine(
            spb.RegisterEngineRequest(
                engine=common_pb2.Engine(
                    engine_id=engine_id,
                    model="sim",
                    base_url=base_url,
                    kind=common_pb2.ENGINE_KIND_LLM,
                )
            )
        )

    def connect(self) -> None:
        self.channel = create_channel(f"127.0.0.1:{self.port}", intercept_streams=False)
        self.stub = spb_grpc.SchedulerServiceStub(self.channel)
        self.mux = SchedulerMux(self.stub)

    async def in_flight(self) -> int:
        status = await self.stub.GetStatus(spb.GetStatusRequest())
        return int(status.in_flight)

    async def close(self) -> None:
        await self.mux.aclose()
        await self.channel.close(None)
        if self.server is not None:
            await self.server.stop(0)


@pytest.fixture
async def plane(settings: SageSettings) -> AsyncIterator[Plane]:
    p = Plane(settings)
    await p.start()
    p.connect()
    try:
        yield p
    finally:
        await p.close()


async def _wait_busy(plane: Plane) -> None:
    deadline = time.monotonic() + 10
    while not await plane.in_flight():
        assert time.monotonic() < deadline, "the request never reached the scheduler"
        await asyncio.sleep(0.02)


async def _wait_idle(plane: Plane, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while await plane.in_flight():
        assert time.monotonic() < deadline, "the scheduler still runs the abandoned request"
        await asyncio.sleep(0.05)


async def test_concurrent_requests_get_their_own_replies_over_one_call(
    plane: Plane, sim_engine: SimFactory
) -> None:
    await plane.register(sim_engine("--ttft-ms", "5", "--tpot-ms", "1"))
    sizes = list(range(1, 41))
    replies = await asyncio.gather(
        *(plane.mux.unary("chat", spb.ChatRequest(model="sim", body=_chat(n)), 30) for n in sizes)
    )
    # each caller got the reply to its own request (the sim returns max_tokens tokens)
    assert [orjson.loads(r.body)["usage"]["completion_tokens"] for r in replies] == sizes
    assert all(r.engine_id == "e1" and r.usage.completion_tokens > 0 for r in replies)
    completion = await plane.mux.unary(
        "complete",
        spb.CompleteRequest(
            model="sim", body=orjson.dumps({"model": "sim", "prompt": "a", "max_tokens": 3})
        ),
        30,
    )
    assert orjson.loads(completion.body)["object"] == "text_completion"
    # all of it went over one Multiplex call, not a call per request
    session = plane.mux._session
    assert session is not None and not session.pending


async def test_scheduler_errors_are_rebuilt_exactly(plane: Plane, sim_engine: SimFactory) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        await plane.mux.unary(
            "chat", spb.ChatRequest(model="nope", body=_chat(1, model="nope")), 30
        )
    assert info.value.param == "model" and "nope" in info.value.message
    with pytest.raises(InvalidRequestError) as bad:
        await plane.mux.unary("chat", spb.ChatRequest(model="", body=b"{}"), 30)
    assert bad.value.param == "model"
    # and the call is still usable after errors
    await plane.register(sim_engine())
    reply = await plane.mux.unary("chat", spb.ChatRequest(model="sim", body=_chat(2)), 30)
    assert orjson.loads(reply.body)["usage"]["completion_tokens"] == 2


async def test_streams_arrive_in_order_and_end(plane: Plane, sim_engine: SimFactory) -> None:
    await plane.register(sim_engine("--tpot-ms", "2"))

    async def collect(n: int) -> list[bytes]:
        out: list[bytes] = []
        async for batch in plane.mux.stream(
            "chat_stream",
            spb.ChatStreamRequest(model="sim", body=_chat(n, stream=True)),
            30,
        ):
            assert batch  # never an empty write
            for message in batch:
                out.append(message.data)
                out.extend(message.more)
        return out

    first, second = await asyncio.gather(collect(5), collect(9))
    for chunks, n in ((first, 5), (second, 9)):
        docs = [orjson.loads(c) for c in chunks]
        assert len({d["id"] for d in docs}) == 1  # one stream's chunks, not mixed
        assert docs[-1]["choices"][0]["finish_reason"] == "length"
        text = "".join(d["choices"][0]["delta"].get("content") or "" for d in docs)
        assert text.strip()
        assert sum(1 for d in docs if d["choices"][0]["delta"].get("content")) == n


async def test_a_stream_error_before_the_first_chunk_is_raised(plane: Plane) -> None:
    with pytest.raises(ModelNotFoundError):
        async for _ in plane.mux.stream(
            "chat_stream", spb.ChatStreamRequest(model="ghost", body=_chat(1, model="ghost")), 30
        ):
            pass


async def test_deadline_fails_the_request_and_stops_it_in_the_scheduler(
    plane: Plane, sim_engine: SimFactory
) -> None:
    await plane.register(sim_engine("--ttft-ms", "3000"))
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        await plane.mux.unary("chat", spb.ChatRequest(model="sim", body=_chat(4)), 0.5)
    assert time.monotonic() - started < 2.5
    await _wait_idle(plane)


async def test_a_caller_going_away_cancels_its_request_in_the_scheduler(
    plane: Plane, sim_engine: SimFactory
) -> None:
    await plane.register(sim_engine("--tpot-ms", "50"))
    task = asyncio.create_task(
        plane.mux.unary("chat", spb.ChatRequest(model="sim", body=_chat(200)), 30)
    )
    await _wait_busy(plane)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # the cancel travelled: the scheduler is idle long before the 10 s reply would end
    await _wait_idle(plane, within_s=3)
    # other requests on the same call still work
    reply = await plane.mux.unary("chat", spb.ChatRequest(model="sim", body=_chat(1)), 30)
    assert orjson.loads(reply.body)["usage"]["completion_tokens"] == 1


async def test_shutdown_answers_started_requests_then_refuses_cleanly(
    plane: Plane, sim_engine: SimFactory
) -> None:
    await plane.register(sim_engine("--ttft-ms", "600"))
    running = asyncio.create_task(
        plane.mux.unary("chat", spb.ChatRequest(model="sim", body=_chat(2)), 30)
    )
    await _wait_busy(plane)
    started = time.monotonic()
    await plane.server.stop(5)
    plane.server = None
    # the started request was answered; the call did not hold shutdown for the whole grace
    assert orjson.loads((await running).body)["usage"]["completion_tokens"] == 2
    assert time.monotonic() - started < 3
    with pytest.raises(ServiceUnavailableError):
        await plane.mux.unary("chat", spb.ChatRequest(model="sim", body=_chat(1)), 5)


async def test_a_restarted_scheduler_is_used_again(plane: Plane, sim_engine: SimFactory) -> None:
    url = sim_engine()
    await plane.register(url)
    await plane.mux.unary("chat", spb.ChatRequest(model="sim", body=_chat(1)), 30)
    port = plane.port
    await plane.server.stop(0)
    with pytest.raises(ServiceUnavailableError):
        await plane.mux.unary("chat", spb.ChatRequest(model="sim", body=_chat(1)), 5)
    await plane.start(port)
    deadline = time.monotonic() + 15
    while True:  # the channel reconnects with backoff
        try:
            await plane.register(url)
            reply = await plane.mux.unary("chat", spb.ChatRequest(model="sim", body=_chat(3)), 5)
            break
        except (ServiceUnavailableError, grpc.RpcError):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
    assert orjson.loads(reply.body)["usage"]["completion_tokens"] == 3


class _NoMultiplex(spb_grpc.SchedulerServiceServicer):
    """A scheduler from before Multiplex: unary calls only."""

    async def Chat(self, request: spb.ChatRequest, context: Any) -> spb.ChatResponse:
        return spb.ChatResponse(body=b'{"old": true}', engine_id="old")

    async def ChatStream(
        self, request: spb.ChatStreamRequest, context: Any
    ) -> AsyncIterator[spb.ChatStreamResponse]:
        for i in range(3):
            yield spb.ChatStreamResponse(data=str(i).encode(), engine_id="old")


async def test_a_scheduler_without_multiplex_is_served_with_unary_calls() -> None:
    server, port = create_server(
        "127.0.0.1:0",
        [
            Registration(
                spb.DESCRIPTOR.services_by_name["SchedulerService"].full_name,
                spb_grpc.add_SchedulerServiceServicer_to_server,
                _NoMultiplex(),  # type: ignore[abstract]
            )
        ],
    )
    await server.start()
    channel = create_channel(f"127.0.0.1:{port}", intercept_streams=False)
    mux = SchedulerMux(spb_grpc.SchedulerServiceStub(channel))
    try:
        reply = await mux.unary("chat", spb.ChatRequest(model="m", body=b"{}"), 5)
        assert reply.body == b'{"old": true}' and not mux.supported
        again = await mux.unary("chat", spb.ChatRequest(model="m", body=b"{}"), 5)
        assert again.engine_id == "old"
        data = [
            m.data
            async for batch in mux.stream("chat_stream", spb.ChatStreamRequest(), 5)
            for m in batch
        ]
        assert data == [b"0", b"1", b"2"]
    finally:
        await mux.aclose()
        await channel.close(None)
        await server.stop(0)


async def test_malformed_multiplex_messages_get_errors_not_a_broken_call(
    plane: Plane, sim_engine: SimFactory
) -> None:
    await plane.register(sim_engine("--ttft-ms", "300"))
    call: Any = plane.stub.Multiplex(None, metadata=token_metadata())  # type: ignore[arg-type]

    def one(**fields: Any) -> spb.MultiplexRequest:
        return spb.MultiplexRequest(calls=[spb.MultiplexCall(**fields)])

    async def replies(n: int) -> list[spb.MultiplexReply]:
        got: list[spb.MultiplexReply] = []
        while len(got) < n:
            got.extend((await call.read()).replies)
        return got

    await call.write(one(id=1))  # no call named
    (first,) = await replies(1)
    assert first.id == 1 and first.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert first.error.trailers["sage-error"] == "InvalidRequestError"
    chat = spb.ChatRequest(model="sim", body=_chat(1))
    # two calls in one message, the second reusing the open id
    await call.write(
        spb.MultiplexRequest(
            calls=[spb.MultiplexCall(id=2, chat=chat), spb.MultiplexCall(id=2, chat=chat)]
        )
    )
    duplicate, served = await replies(2)
    assert duplicate.id == 2 and "already open" in duplicate.error.message
    assert served.id == 2 and served.WhichOneof("result") == "chat"
    await call.write(one(id=3, cancel=spb.MultiplexCancel()))  # unknown id: ignored
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF  # type: ignore[attr-defined]
    assert await call.code() == grpc.StatusCode.OK


async def test_calls_ready_together_share_messages(plane: Plane, sim_engine: SimFactory) -> None:
    await plane.register(sim_engine("--ttft-ms", "20"))
    replies = await asyncio.gather(
        *(
            plane.mux.unary("chat", spb.ChatRequest(model="sim", body=_chat(n)), 30)
            for n in range(1, 51)
        )
    )
    assert [orjson.loads(r.body)["usage"]["completion_tokens"] for r in replies] == list(
        range(1, 51)
    )
    session = plane.mux._session
    assert session is not None
    # the first call goes out alone; the 49 queued while it was written share a message
    assert session.messages_written <= 3


async def test_embed_requests_travel_over_multiplex_too(plane: Plane) -> None:
    with pytest.raises(InvalidRequestError) as empty:
        await plane.mux.unary("embed", spb.EmbedRequest(model="minilm"), 30)
    assert empty.value.param == "input"
    with pytest.raises(ModelNotFoundError):
        await plane.mux.unary("embed", spb.EmbedRequest(model="minilm", inputs=["a"]), 30)
    assert plane.mux.supported and plane.mux._session is not None


# --- transport edge cases, with stand-in handlers behind the real Multiplex plumbing ---


class _Handlers(spb_grpc.SchedulerServiceServicer):
    """SchedulerService whose Multiplex runs the given handlers (no engines involved)."""

    def __init__(self, chat: Any, chat_stream: Any = None) -> None:
        routes = {"chat": Route("Chat", "chat", False, chat)}
        if chat_stream is not None:
            routes["chat_stream"] = Route("ChatStream", "chat_chunk", True, chat_stream)
        self.mux = MultiplexSessions(routes, 30.0)

    async def Multiplex(
        self, request_iterator: Any, context: Any
    ) -> AsyncIterator[spb.MultiplexResponse]:
        async for message in self.mux.serve(request_iterator):
            yield message


@contextlib.asynccontextmanager
async def _handlers_plane(chat: Any, chat_stream: Any = None) -> AsyncIterator[SchedulerMux]:
    servicer = _Handlers(chat, chat_stream)  # type: ignore[abstract]
    server, port = create_server(
        "127.0.0.1:0",
        [
            Registration(
                spb.DESCRIPTOR.services_by_name["SchedulerService"].full_name,
                spb_grpc.add_SchedulerServiceServicer_to_server,
                servicer,
            )
        ],
    )
    server.on_drain(servicer.mux.drain)
    await server.start()
    channel = create_channel(f"127.0.0.1:{port}", intercept_streams=False)
    mux = SchedulerMux(spb_grpc.SchedulerServiceStub(channel))
    try:
        yield mux
    finally:
        await mux.aclose()
        await channel.close(None)
        await server.stop(0)


async def test_large_replies_ready_together_do_not_break_the_call() -> None:
    big = 25 << 20  # an embeddings reply of 2048 inputs x 3072 dims
    release = asyncio.Event()

    async def chat(request: spb.ChatRequest, context: Any) -> spb.ChatResponse:
        if request.body == b"small":
            await asyncio.sleep(0.5)
            return spb.ChatResponse(body=b"ok")
        await release.wait()
        return spb.ChatResponse(body=b"x" * big)

    async with _handlers_plane(chat) as mux:
        small = asyncio.create_task(mux.unary("chat", spb.ChatRequest(body=b"small"), 30))
        bigs = [
            asyncio.create_task(mux.unary("chat", spb.ChatRequest(body=b"big"), 30))
            for _ in range(3)
        ]
        await asyncio.sleep(0.2)
        release.set()  # three 25 MiB replies ready at once: more than one gRPC message holds
        assert [len((await t).body) for t in bigs] == [big] * 3
        assert (await small).body == b"ok"


async def test_a_caller_cancelled_while_calls_are_written_leaves_the_others_alone() -> None:
    async def chat(request: spb.ChatRequest, context: Any) -> spb.ChatResponse:
        await asyncio.sleep(0.5)
        return spb.ChatResponse(body=request.body)

    async with _handlers_plane(chat) as mux:
        await mux.unary("chat", spb.ChatRequest(body=b"warm"), 5)
        others = [
            asyncio.create_task(mux.unary("chat", spb.ChatRequest(body=b"u%d" % i), 10))
            for i in range(5)
        ]
        await asyncio.sleep(0.1)
        for _ in range(5):  # callers that go away at every point of the write
            victim = asyncio.create_task(mux.unary("chat", spb.ChatRequest(body=b"v"), 10))
            await asyncio.sleep(0)
            victim.cancel()
        assert [(await t).body for t in others] == [b"u%d" % i for i in range(5)]
        session = mux._session
        assert session is not None and not session.pending


async def test_a_stream_whose_client_stops_reading_is_stopped_not_buffered() -> None:
    produced = 0

    async def chat(request: spb.ChatRequest, context: Any) -> spb.ChatResponse:
        return spb.ChatResponse()

    async def chat_stream(
        request: spb.ChatStreamRequest, context: Any
    ) -> AsyncIterator[spb.ChatStreamResponse]:
        nonlocal produced
        for i in range(100_000):  # 100 MiB if nobody stops it
            produced += 1
            yield spb.ChatStreamResponse(data=b"d" * 1024)
            if i % 100 == 0:
                await asyncio.sleep(0)

    async with _handlers_plane(chat, chat_stream) as mux:
        stream = mux.stream("chat_stream", spb.ChatStreamRequest(body=b"{}"), 60)
        await stream.__anext__()  # the response started; now the HTTP client stalls
        await asyncio.sleep(3)
        # stopped upstream once ~16 MiB were waiting, not run to the end
        assert produced < 40_000
        with pytest.raises(OverloadedError, match="read too slowly"):
            async for _ in stream:
                pass


async def test_a_request_cancelled_in_the_same_message_leaves_no_task_behind() -> None:
    async def chat(request: spb.ChatRequest, context: Any) -> spb.ChatResponse:
        await asyncio.sleep(10)
        return spb.ChatResponse()

    sessions = MultiplexSessions({"chat": Route("Chat", "chat", False, chat)}, 30)
    tasks_seen: list[dict[int, Any]] = []
    start = sessions._start

    def spy(call: Any, tasks: dict[int, Any], out: Any) -> None:
        tasks_seen.append(tasks)
        start(call, tasks, out)

    sessions._start = spy  # type: ignore[method-assign,assignment]
    hold = asyncio.Event()

    async def requests() -> AsyncIterator[spb.MultiplexRequest]:
        for i in range(1, 201):
            yield spb.MultiplexRequest(
                calls=[
                    spb.MultiplexCall(id=i, chat=spb.ChatRequest(model="m")),
                    spb.MultiplexCall(id=i, cancel=spb.MultiplexCancel()),
                ]
            )
        await hold.wait()

    replies: Any = sessions.serve(requests())
    first: asyncio.Task[Any] = asyncio.create_task(replies.__anext__())
    # Until all 400 calls (200 chats, each with its cancel) were read, not a fixed 0.3 s
    # that a loaded machine may not give the reader; then nothing may be left running.
    for _ in range(500):
        if len(tasks_seen) == 400:
            break
        await asyncio.sleep(0.01)
    assert len(tasks_seen) == 400 and not tasks_seen[0], (len(tasks_seen), tasks_seen[:1])
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
        await first
    await replies.aclose()


async def test_deregister_with_drain_answers_once_the_engines_requests_ended(
    plane: Plane, sim_engine: SimFactory
) -> None:
    """A drain-stop's deregister waits for what the scheduler routed to the engine, those
    still on their way to it included (the engine's own gauges cannot count those)."""
    # Both engines start first: starting a process while the first stream runs could
    # outlast it on a loaded machine, and the test needs it still running (in_flight 2).
    first, second_engine = sim_engine("--tpot-ms", "20"), sim_engine("--tpot-ms", "20")
    await plane.register(first)

    async def stream(tokens: int) -> int:
        chunks = 0
        async for batch in plane.mux.stream(
            "chat_stream", spb.ChatStreamRequest(model="sim", body=_chat(tokens, stream=True)), 30
        ):
            chunks += len(batch)
        return chunks

    running = asyncio.create_task(stream(150))  # 3 s: outlives the steps below
    await _wait_busy(plane)
    quick = await plane.stub.DeregisterEngine(
        spb.DeregisterEngineRequest(engine_id="e1", drain_timeout_s=0.05)
    )
    assert quick.engine.engine_id == "e1" and quick.in_flight == 1  # timed out, still going
    assert not running.done()
    await plane.register(second_engine, engine_id="e2")
    second = asyncio.create_task(stream(40))
    deadline = time.monotonic() + 10
    while not (await plane.stub.GetStatus(spb.GetStatusRequest())).in_flight >= 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    drained = await plane.stub.DeregisterEngine(
        spb.DeregisterEngineRequest(engine_id="e2", drain_timeout_s=30)
    )
    assert drained.in_flight == 0  # answered only after the scheduler saw the stream end
    # The stream's last message and the deregister reply race to this client; the stream
    # has ended, so it completes within a loop turn or two (not an engine's 0.8 s).
    assert await asyncio.wait_for(second, 0.5) > 0
    assert await running > 0
