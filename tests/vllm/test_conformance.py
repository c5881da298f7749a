"""Conformance: the simulator against the real engine, live, on the same requests.

Everything the project claims about engines is mostly exercised against the sim; these
checks keep it honest: for each request, the reply of `python -m sage.engines.sim` and of
real vLLM (reached directly with its per-engine key) must have the same schema: keys,
JSON types and which values are null, for chat, completions, their streamed chunks (role
chunk, content chunks, finishing chunk, usage chunk), /v1/models, error bodies and the
vllm:* metric names and labels. Values (the text, ids, timestamps) are free to differ.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sage.engines.vllm_metrics import (
    KV_CACHE_USAGE,
    LOAD_METRICS_PATH,
    RUNNING,
    WAITING,
    read_load,
)
from tests.conftest import SimFactory
from tests.vllm.conftest import MAX_MODEL_LEN, MESSAGES, VllmStack, sse

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(420)]

SIM_KEY = "sk-sim-conformance"


def shape(value: Any) -> Any:
    """The schema of a JSON value: objects keep their keys, lists the distinct shapes of
    their items (in first-seen order), scalars become their JSON type name."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        shapes: list[Any] = []
        for item in value:
            if shape(item) not in shapes:
                shapes.append(shape(item))
        return shapes
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    return type(value).__name__


def stream_shape(body: str) -> list[Any]:
    """The shapes of a stream's chunks, runs of equal shapes collapsed to one."""
    shapes: list[Any] = []
    for event in sse(body):
        current = shape(event)
        if not shapes or shapes[-1] != current:
            shapes.append(current)
    return shapes


def split_middle(shapes: list[Any]) -> tuple[list[Any], list[Any]]:
    """(content chunks: with choices and no finish_reason, the first chunk included; the
    others: finish, usage, [DONE])."""

    def middle(chunk: Any) -> bool:
        choices: list[Any] = chunk.get("choices") or [] if isinstance(chunk, dict) else []
        return bool(choices) and all(c.get("finish_reason") == "null" for c in choices)

    return [s for s in shapes if middle(s)], [s for s in shapes if not middle(s)]


@dataclass
class Pair:
    """The same engine API twice: the sim and real vLLM, each with its key."""

    sim: httpx.Client
    real: httpx.Client
    model: str

    def both(self, method: str, path: str, **kwargs: Any) -> tuple[httpx.Response, httpx.Response]:
        """Send one request to each."""
        return (
            self.sim.request(method, path, **kwargs),
            self.real.request(method, path, **kwargs),
        )


@pytest.fixture(scope="module")
def pair(vllm_stack: VllmStack, module_sim_engine: SimFactory) -> Iterator[Pair]:
    """A sim serving the same model name, context length and key scheme as the real one."""
    sim_url = module_sim_engine(
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--api-key",
        SIM_KEY,
        "--ttft-ms",
        "1",
        "--tpot-ms",
        "1",
        model=vllm_stack.model,
    )
    with (
        httpx.Client(
            base_url=sim_url, headers={"Authorization": f"Bearer {SIM_KEY}"}, timeout=60
        ) as sim,
        httpx.Client(
            base_url=vllm_stack.engine_url,
            headers={"Authorization": f"Bearer {vllm_stack.engine_key}"},
            timeout=60,
        ) as real,
    ):
        yield Pair(sim, real, vllm_stack.model)


def assert_same_shape(sim: Any, real: Any, what: str) -> None:
    assert shape(sim) == shape(real), f"{what}: sim {shape(sim)}\nreal {shape(real)}"


def test_models_list(pair: Pair) -> None:
    sim, real = pair.both("GET", "/v1/models")
    assert sim.status_code == real.status_code == 200
    assert_same_shape(sim.json(), real.json(), "/v1/models")
    assert [m["id"] for m in sim.json()["data"]] == [m["id"] for m in real.json()["data"]]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": MESSAGES}),
        ("/v1/completions", {"prompt": "the quick brown fox"}),
        # token ids both ways (what exact mid-stream resume uses): ids in the MiniLM vocab
        ("/v1/chat/completions", {"messages": MESSAGES, "return_token_ids": True}),
        ("/v1/completions", {"prompt": [101, 2054, 2003, 102], "return_token_ids": True}),
    ],
    ids=["chat", "completions", "chat-token-ids", "completions-token-ids"],
)
def test_replies_and_streams(pair: Pair, path: str, body: dict[str, Any]) -> None:
    request = {"model": pair.model, "max_tokens": 5, "temperature": 0, **body}
    sim, real = pair.both("POST", path, json=request)
    assert sim.status_code == real.status_code == 200
    assert_same_shape(sim.json(), real.json(), path)
    for options in (None, {"include_usage": True}):
        streamed = {**request, "stream": True}
        if options is not None:
            streamed["stream_options"] = options
        sim, real = pair.both("POST", path, json=streamed)
        assert sim.status_code == real.status_code == 200
        assert sse(sim.text)[-1] == sse(real.text)[-1] == "[DONE]"
        sim_shapes, real_shapes = stream_shape(sim.text), stream_shape(real.text)
        what = f"{path} stream_options={options}:\nsim  {sim_shapes}\nreal {real_shapes}"
        # On a busy host vLLM sends the tokens ready together as one chunk, so a stream of
        # 5 tokens may have fewer content chunks, or none before the one that finishes it:
        # the closing chunks must match, and the content chunks of one stream must be
        # kinds the other sends too.
        sim_middle, sim_ends = split_middle(sim_shapes)
        real_middle, real_ends = split_middle(real_shapes)
        assert sim_ends == real_ends, what
        sim_kinds, real_kinds = ({repr(c) for c in m} for m in (sim_middle, real_middle))
        assert sim_kinds <= real_kinds or real_kinds <= sim_kinds, what


ERROR_CASES = [
    pytest.param(
        "/v1/chat/completions",
        {"messages": MESSAGES, "temperature": -1},
        id="temperature -1",
    ),
    pytest.param(
        "/v1/completions",
        {"prompt": "x", "max_tokens": 5000},
        id="max_tokens over the context",
    ),
    pytest.param(
        "/v1/chat/completions",
        {"messages": MESSAGES, "model": "nope"},
        id="unknown model (chat)",
    ),
    pytest.param("/v1/completions", {"prompt": "x", "model": "nope"}, id="unknown model"),
    pytest.param("/v1/chat/completions", {}, id="missing messages"),
    pytest.param("/v1/chat/completions", {"messages": "hi"}, id="messages not a list"),
    pytest.param(
        "/v1/chat/completions", {"messages": MESSAGES, "stream": "maybe"}, id="stream 'maybe'"
    ),
    pytest.param(
        "/v1/chat/completions", {"messages": MESSAGES, "temperature": "hot"}, id="temperature 'hot'"
    ),
    pytest.param("/v1/completions", {"prompt": "x", "max_tokens": 2.5}, id="max_tokens 2.5"),
    pytest.param("/v1/completions", {"prompt": "x", "seed": "x"}, id="seed 'x'"),
    pytest.param("/v1/completions", {"prompt": [101, -2]}, id="token id -2"),
    pytest.param("/v1/completions", {"prompt": [[101], [3, -2]]}, id="nested token id -2"),
    pytest.param(
        "/v1/chat/completions",
        {"messages": MESSAGES, "return_token_ids": "maybe"},
        id="return_token_ids 'maybe'",
    ),
]


@pytest.mark.parametrize(("path", "body"), ERROR_CASES)
def test_error_bodies(pair: Pair, path: str, body: dict[str, Any]) -> None:
    sim, real = pair.both("POST", path, json={"model": pair.model, **body})
    assert sim.status_code == real.status_code
    assert real.status_code in (400, 404)
    assert_same_shape(sim.json(), real.json(), path)
    sim_error, real_error = sim.json()["error"], real.json()["error"]
    for field in ("type", "param", "code"):
        assert sim_error[field] == real_error[field], (field, sim_error, real_error)


def test_unauthorized_body(pair: Pair) -> None:
    sim = pair.sim.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    real = pair.real.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    assert sim.status_code == real.status_code == 401
    assert sim.json() == real.json()


def test_metric_names_and_labels(pair: Pair) -> None:
    def series(text: str) -> dict[str, set[str]]:
        """vllm:* sample name → label names."""
        found: dict[str, set[str]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("vllm:"):
                    found.setdefault(sample.name, set()).update(sample.labels)
        return found

    sim, real = pair.both("GET", "/metrics")
    sim_series, real_series = series(sim.text), series(real.text)
    assert sim_series, "the sim exports no vllm:* series"
    unknown = sorted(set(sim_series) - set(real_series))
    assert not unknown, f"the sim exports series real vLLM does not: {unknown}"
    for name, labels in sim_series.items():
        assert labels == real_series[name], (name, labels, real_series[name])


def test_load_scrape_gets_the_same_short_page(pair: Pair) -> None:
    """The scheduler's load scrape names the series it reads (`name[]`, prometheus_client's
    filter, which vLLM's /metrics mount honours); both engines answer with only those."""

    def names(text: str) -> set[str]:
        return {s.name for family in text_string_to_metric_families(text) for s in family.samples}

    sim, real = pair.both("GET", LOAD_METRICS_PATH, headers={"Accept-Encoding": "identity"})
    assert sim.status_code == real.status_code == 200
    assert names(real.text) == {RUNNING, WAITING, KV_CACHE_USAGE}
    assert names(sim.text) == names(real.text)
    full = pair.real.get("/metrics", headers={"Accept-Encoding": "identity"})
    assert len(real.content) * 10 < len(full.content)
    assert read_load(real.text).queued == read_load(full.text).queued == 0.0
