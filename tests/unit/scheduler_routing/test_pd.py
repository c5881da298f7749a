"""PD routing's planning: vLLM's proxy wire format, role pools, picking and fallback."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from sage.common.exceptions import DeadlineExceededError, InvalidRequestError, UpstreamError
from sage.services.scheduler.executor import EngineUnreachableError
from sage.services.scheduler.registry import EngineRecord
from sage.services.scheduler.routing import LeastLoadedRouter, RoundRobinRouter, RouteRequest
from sage.services.scheduler.routing.pd import (
    PREFILL_KV_PARAMS,
    PdRouter,
    decode_body,
    kv_params_of,
    prefill_body,
    split_roles,
)

from .helpers import FixedLoad, engines

PARAMS = {
    "do_remote_prefill": True,
    "do_remote_decode": False,
    "remote_block_ids": [0, 1],
    "remote_engine_id": "p-engine",
    "remote_host": "10.0.0.5",
    "remote_port": 8100,
    "tp_size": 1,
}
BODY = orjson.dumps(
    {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 50,
        "max_completion_tokens": 50,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
)


def pool(*roles: str) -> list[EngineRecord]:
    """Engines e0.. with the given roles, in order."""
    return [replace(e, role=r) for e, r in zip(engines(len(roles)), roles, strict=True)]


class Prefill:
    """Records prefill-leg calls; answers from `replies` by engine id (an exception raises)."""

    def __init__(self, replies: dict[str, bytes | Exception]) -> None:
        self.replies = replies
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, engine: EngineRecord, body: bytes) -> bytes:
        self.calls.append((engine.engine_id, orjson.loads(body)))
        reply = self.replies[engine.engine_id]
        if isinstance(reply, Exception):
            raise reply
        return reply


def reply_with(params: dict[str, Any] | None) -> bytes:
    return orjson.dumps({"choices": [{"message": {"content": "x"}}], "kv_transfer_params": params})


def counted(registry: CollectorRegistry, outcome: str) -> float:
    value = registry.get_sample_value(
        "sage:scheduler_pd_requests_total", {"model": "m", "outcome": outcome}
    )
    return value or 0.0


def test_prefill_body_is_vllm_proxy_format() -> None:
    doc = orjson.loads(prefill_body(BODY))
    assert doc["kv_transfer_params"] == {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }
    assert doc["stream"] is False and "stream_options" not in doc
    assert doc["max_tokens"] == 1 and doc["max_completion_tokens"] == 1
    assert doc["messages"] == [{"role": "user", "content": "hi"}]
    # a request without max_completion_tokens does not grow one
    plain = orjson.loads(prefill_body(orjson.dumps({"model": "m", "prompt": "p"})))
    assert "max_completion_tokens" not in plain and plain["max_tokens"] == 1
    assert PREFILL_KV_PARAMS["do_remote_decode"] is True


def test_decode_body_keeps_the_request_and_adds_the_params() -> None:
    doc = orjson.loads(decode_body(BODY, PARAMS))
    assert doc == {**orjson.loads(BODY), "kv_transfer_params": PARAMS}


def test_kv_params_of_reads_only_an_object() -> None:
    assert kv_params_of(reply_with(PARAMS)) == PARAMS
    assert kv_params_of(reply_with(None)) is None
    assert kv_params_of(b"not json") is None
    assert kv_params_of(b"[1]") is None


def test_bad_body_is_a_client_error() -> None:
    with pytest.raises(InvalidRequestError):
        prefill_body(b"[]")
    with pytest.raises(InvalidRequestError):
        prefill_body(b"{oops")


def test_split_roles() -> None:
    pools = split_roles(pool("prefill", "decode", "both", "weird"))
    assert [e.engine_id for e in pools.prefill] == ["e0"]
    assert [e.engine_id for e in pools.decode] == ["e1"]
    assert [e.engine_id for e in pools.both] == ["e2", "e3"]
    assert pools.disaggregated
    assert not split_roles(pool("prefill", "both")).disaggregated
    assert not split_roles(pool("decode", "decode")).disaggregated


async def test_no_pair_means_no_plan_and_no_prefill_call() -> None:
    call = Prefill({})
    router = PdRouter(RoundRobinRouter(), CollectorRegistry())
    assert await router.plan(RouteRequest("m"), BODY, pool("prefill", "both"), call) is None
    assert await router.plan(RouteRequest("m"), BODY, pool("both", "both"), call) is None
    assert call.calls == []


async def test_plan_passes_prefill_params_to_least_loaded_decode() -> None:
    registry = CollectorRegistry()
    engines_ = pool("prefill", "prefill", "decode", "decode", "both")
    load = FixedLoad({"e0": 5, "e1": 0, "e2": 3, "e3": 1})
    call = Prefill({"e1": reply_with(PARAMS)})
    plan = await PdRouter(LeastLoadedRouter(load), registry).plan(
        RouteRequest("m"), BODY, engines_, call
    )
    assert plan is not None
    assert [c[0] for c in call.calls] == ["e1"]  # the idler prefill engine
    assert call.calls[0][1]["kv_transfer_params"] == PREFILL_KV_PARAMS
    assert plan.prefill_engine is not None and plan.prefill_engine.engine_id == "e1"
    # decode: the idler decode engine, then the other, then both-role engines as fallback
    assert [e.engine_id for e in plan.candidates] == ["e3", "e2", "e4"]
    assert orjson.loads(plan.body)["kv_transfer_params"] == PARAMS
    assert orjson.loads(plan.body)["stream"] is True
    assert counted(registry, "kv_transfer") == 1


async def test_unreachable_prefill_tries_the_next_prefill_engine() -> None:
    registry = CollectorRegistry()
    call = Prefill({"e0": EngineUnreachableError("refused"), "e1": reply_with(PARAMS)})
    router = LeastLoadedRouter(FixedLoad({"e1": 1}))  # e0 is picked first
    plan = await PdRouter(router, registry).plan(
        RouteRequest("m"), BODY, pool("prefill", "prefill", "decode"), call
    )
    assert plan is not None and plan.kv_params == PARAMS
    assert [c[0] for c in call.calls] == ["e0", "e1"]


@pytest.mark.parametrize(
    "error", [UpstreamError("HTTP 500"), DeadlineExceededError("slow"), EngineUnreachableError("x")]
)
async def test_failed_prefill_falls_back_to_decode_with_the_original_body(
    error: Exception,
) -> None:
    registry = CollectorRegistry()
    call = Prefill({"e0": error})
    plan = await PdRouter(RoundRobinRouter(), registry).plan(
        RouteRequest("m"), BODY, pool("prefill", "decode", "both"), call
    )
    assert plan is not None
    assert plan.body == BODY and plan.kv_params is None and plan.prefill_engine is None
    assert [e.engine_id for e in plan.candidates] == ["e1", "e2"]
    assert counted(registry, "prefill_failed") == 1


async def test_prefill_without_params_decodes_locally() -> None:
    registry = CollectorRegistry()
    call = Prefill({"e0": reply_with(None)})
    plan = await PdRouter(RoundRobinRouter(), registry).plan(
        RouteRequest("m"), BODY, pool("prefill", "decode"), call
    )
    assert plan is not None and plan.body == BODY
    assert counted(registry, "no_kv_params") == 1


async def test_client_errors_from_prefill_reach_the_client() -> None:
    call = Prefill({"e0": InvalidRequestError("bad temperature", param="temperature")})
    with pytest.raises(InvalidRequestError, match="temperature"):
        await PdRouter(RoundRobinRouter(), CollectorRegistry()).plan(
            RouteRequest("m"), BODY, pool("prefill", "decode"), call
        )


def test_the_prefill_leg_drops_min_tokens_so_one_token_is_valid() -> None:
    """vLLM refuses min_tokens > max_tokens; the client's request was valid."""
    leg = orjson.loads(prefill_body(b'{"model": "m", "max_tokens": 50, "min_tokens": 10}'))
    assert leg["max_tokens"] == 1 and "min_tokens" not in leg


# A vLLM 0.33 NixlConnector prefill reply's params (pull_scheduler.request_finished).
NIXL_033 = {
    "do_remote_prefill": True,
    "do_remote_decode": False,
    "remote_block_ids": [[0, 1, 2]],
    "remote_engine_id": "p-engine",
    "remote_request_id": "cmpl-abc-0",
    "remote_host": "10.0.0.5",
    "remote_port": 5601,
    "tp_size": 1,
    "dcp_size": 1,
    "pp_size": 1,
    "remote_num_tokens": 40,
    "remote_blocks_expiry_time": None,
    "remote_registration_generation": 0,
    "transfer_mode": "pull",
}


async def test_nixl_033_params_reach_decode_verbatim() -> None:
    registry = CollectorRegistry()
    call = Prefill({"e0": reply_with(NIXL_033)})
    plan = await PdRouter(RoundRobinRouter(), registry).plan(
        RouteRequest("m"), BODY, pool("prefill", "decode"), call
    )
    assert plan is not None and plan.kv_params == NIXL_033
    decode = orjson.loads(plan.body)
    # grouped block ids, the request id the decoder indexes, the side channel: untouched
    assert decode["kv_transfer_params"] == NIXL_033
    assert {k: v for k, v in decode.items() if k != "kv_transfer_params"} == orjson.loads(BODY)
    assert counted(registry, "kv_transfer") == 1


@pytest.mark.parametrize(
    "reply",
    [
        # vLLM with ExampleConnector (shared storage): the KV is on disk, the reply says null
        orjson.dumps(
            {
                "choices": [{"text": "x", "finish_reason": "length"}],
                "kv_transfer_params": None,
                "ec_transfer_params": None,
            }
        ),
        # an engine without any KV connector field
        orjson.dumps({"choices": [{"text": "x"}]}),
        orjson.dumps({"choices": [{"text": "x"}], "kv_transfer_params": {}}),
    ],
)
async def test_without_params_the_decode_leg_resends_the_request(reply: bytes) -> None:
    registry = CollectorRegistry()
    call = Prefill({"e0": reply})
    plan = await PdRouter(RoundRobinRouter(), registry).plan(
        RouteRequest("m"), BODY, pool("prefill", "decode"), call
    )
    # the prefill still ran (it wrote the KV where the decoder's connector finds it) ...
    assert [c[0] for c in call.calls] == ["e0"]
    # ... and decode gets the client's request byte for byte, to load it by prompt
    assert plan is not None and plan.body == BODY and plan.kv_params is None
    assert plan.prefill_engine is not None and plan.prefill_engine.engine_id == "e0"
    assert counted(registry, "no_kv_params") == 1
