"""Protocol models A/B: msgspec Structs (sage.protocol.openai) against pydantic v2 models of
the same chat request, by the edge's CPU per request (issue 18, item 1).

Both readers enforce the same contract (strict types, the same bounds, content required
unless the role is assistant, a text part needs text) and are checked to accept and reject
the same bodies first. Two measurements, in one run:

1. In process: CPU microseconds to decode + validate one body (short chat, a 20-turn
   conversation), each reader alternately, best of --repeat.
2. Served: bench/asgi_ab.py's edge app (our App, the edge's guard, request id, span, reply)
   with either reader, alternated A/B for --rounds rounds under wrk; server CPU per request
   from psutil. Bodies: the short chat and the 20-turn one, 1 and 64 connections.

Usage: python bench/protocol_ab.py [--rounds 3] [--duration 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import asgi_ab
import orjson
from _stack import chat_lua, require_wrk
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic import ValidationError as PydanticError

from sage.common.exceptions import InvalidRequestError
from sage.common.http.server import serve_app
from sage.protocol.openai import INT32_MAX, NOT_BLANK, ChatCompletionRequest, decode

IMPLS = ("msgspec", "pydantic")
Role = Literal["system", "user", "assistant", "tool", "function", "developer"]
PosInt = Annotated[int, Field(ge=1, le=INT32_MAX)]
Penalty = Annotated[float, Field(ge=-2, le=2)]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class PStreamOptions(_Open):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class PContentPart(_Open):
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text(self) -> PContentPart:
        if self.type == "text" and self.text is None:
            raise ValueError("text is required in a text part")
        return self


class PChatMessage(_Open):
    role: Role
    content: str | list[PContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _content(self) -> PChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError("content is required")
        return self


class PChatCompletionRequest(_Open):
    """sage.protocol.openai.ChatCompletionRequest, field for field, in pydantic."""

    model: Annotated[str, Field(min_length=1, pattern=NOT_BLANK)]
    messages: Annotated[list[PChatMessage], Field(min_length=1)]
    stream: bool | None = False
    stream_options: PStreamOptions | None = None
    max_tokens: PosInt | None = None
    max_completion_tokens: PosInt | None = None
    n: PosInt | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    top_k: Annotated[int, Field(ge=-1, le=INT32_MAX)] | None = None
    min_tokens: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0, le=INT32_MAX)]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


def read_msgspec(body: bytes) -> tuple[str, bool]:
    parsed = decode(body, ChatCompletionRequest)
    return parsed.model, parsed.streaming


def read_pydantic(body: bytes) -> tuple[str, bool]:
    try:
        parsed = PChatCompletionRequest.model_validate_json(body)
    except PydanticError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise InvalidRequestError(f"{param}: {first['msg']}", param=param) from None
    return parsed.model, bool(parsed.stream)


READERS = {"msgspec": read_msgspec, "pydantic": read_pydantic}
SHORT = {"model": "sim", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
LONG = {
    "model": "sim",
    "max_tokens": 16,
    "temperature": 0.7,
    "messages": [
        {"role": "system", "content": "You are a helpful assistant. " * 4},
        *(
            {"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 40}
            for i in range(20)
        ),
    ],
}
# Bodies both readers must agree on (accept or reject), before anything is timed.
AGREE: list[dict[str, Any]] = [
    SHORT,
    LONG,
    {**SHORT, "stream": True, "stream_options": {"include_usage": True}},
    {**SHORT, "messages": [{"role": "assistant"}]},
    {**SHORT, "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]},
    {**SHORT, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
    {**SHORT, "messages": [{"role": "user"}]},
    {**SHORT, "messages": []},
    {**SHORT, "model": " "},
    {**SHORT, "max_tokens": 0},
    {**SHORT, "max_tokens": "5"},
    {**SHORT, "max_tokens": True},
    {**SHORT, "temperature": 3},
    {**SHORT, "top_p": 0},
    {**SHORT, "stream": "yes"},
    {**SHORT, "stop": ["a", 1]},
    {**SHORT, "top_k": -2},
    {**SHORT, "extra_vendor_field": {"x": 1}},
]


def _accepts(read: Any, body: bytes) -> bool:
    try:
        read(body)
    except InvalidRequestError:
        return False
    return True


def check_agreement() -> None:
    for doc in AGREE:
        body = orjson.dumps(doc)
        got = {name: _accepts(read, body) for name, read in READERS.items()}
        if len(set(got.values())) != 1:
            raise SystemExit(f"readers disagree on {doc}: {got}")


def in_process(repeat: int, n: int = 20000) -> dict[str, dict[str, float]]:
    """CPU us per decode+validate, per body and reader (best of `repeat`, alternated)."""
    best: dict[str, dict[str, float]] = {b: {} for b in ("short", "20 turns")}
    for _ in range(repeat):
        for label, doc in (("short", SHORT), ("20 turns", LONG)):
            body = orjson.dumps(doc)
            for name, read in READERS.items():
                started = time.process_time()
                for _ in range(n):
                    read(body)
                us = 1e6 * (time.process_time() - started) / n
                best[label][name] = min(best[label].get(name, us), us)
    return best


CASES = (
    ("short c1", "/v1/chat/completions", False, 1),
    ("short c64", "/v1/chat/completions", False, 64),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--serve", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        app = asgi_ab.ours_app(READERS[args.serve])
        raise SystemExit(serve_app(app, "127.0.0.1", args.port, what=f"protocol_ab {args.serve}"))
    check_agreement()
    micro = in_process(args.repeat)
    require_wrk()
    tmp = Path(tempfile.mkdtemp(prefix="sage-protocol-ab-"))
    (tmp / "get.lua").write_text('wrk.method = "GET"\n')
    served: dict[str, dict[str, list[dict[str, Any]]]] = {}
    started = time.monotonic()
    for label, doc in (("short", SHORT), ("20 turns", LONG)):
        scripts = {False: tmp / f"{label[:2]}.lua", True: tmp / f"{label[:2]}-s.lua"}
        scripts[False].write_text(chat_lua(json.dumps(doc)))
        scripts[True].write_text(chat_lua(json.dumps({**doc, "stream": True})))
        cases = tuple((f"{label} c{c}", p, s, c) for _, p, s, c in CASES)
        served[label] = {impl: [] for impl in IMPLS}
        for r in range(args.rounds):
            for impl in IMPLS if r % 2 == 0 else reversed(IMPLS):
                figures = asgi_ab.measure(impl, args.duration, scripts, tmp, __file__, cases)
                served[label][impl].append(figures)
            print(f"{label}: round {r + 1} done ({time.monotonic() - started:.0f} s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"in_process_us": micro, "served": served}, indent=1))
    print("\nIn process, CPU us per body (best of --repeat):")
    for label, got in micro.items():
        ratio = got["pydantic"] / got["msgspec"]
        print(
            f"  {label:<9} msgspec {got['msgspec']:6.2f}  pydantic {got['pydantic']:6.2f}  "
            f"pydantic/msgspec {ratio:.2f}"
        )
    print(f"\nServed (our App, edge per-request work), medians of {args.rounds} rounds:")
    print(
        f"{'case':<14} {'msgspec rps':>11} {'pydantic rps':>12} {'ratio':>6} "
        f"{'msgspec us/req':>14} {'pydantic us/req':>15} {'ratio':>6}"
    )
    for runs in served.values():
        for name in runs["msgspec"][0]:
            rps = {i: statistics.median(r[name]["rps"] for r in runs[i]) for i in IMPLS}
            cpu = {i: statistics.median(r[name]["cpu_us_per_req"] for r in runs[i]) for i in IMPLS}
            print(
                f"{name:<14} {rps['msgspec']:>11.0f} {rps['pydantic']:>12.0f} "
                f"{rps['pydantic'] / rps['msgspec']:>6.3f} {cpu['msgspec']:>14.0f} "
                f"{cpu['pydantic']:>15.0f} {cpu['pydantic'] / cpu['msgspec']:>6.3f}"
            )


if __name__ == "__main__":
    main()
