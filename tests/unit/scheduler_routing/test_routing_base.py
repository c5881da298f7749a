from __future__ import annotations

import orjson
import pytest

from sage.common.exceptions import ConfigurationError
from sage.services.scheduler.routing import (
    PREFIX_CHARS,
    ROUTER_NAMES,
    RouteRequest,
    create_router,
    prefix_of,
)

from .helpers import engines


def test_every_registered_router_builds_and_picks_a_given_engine() -> None:
    pool = engines(3)
    for name in ROUTER_NAMES:
        router = create_router(name)
        assert router.name == name
        request = RouteRequest("m", "s", "x" * 200 if router.needs_prefix else "")
        assert router.pick(request, pool) in pool


def test_only_prefix_routers_need_the_prompt() -> None:
    # kv_events needs it for its prefix_aware fallback.
    needs = [n for n in ROUTER_NAMES if create_router(n).needs_prefix]
    assert needs == ["prefix_aware", "kv_events"]


def test_unknown_router_names_the_routing_param() -> None:
    with pytest.raises(ConfigurationError) as info:
        create_router("random_walk")
    assert info.value.param == "routing"
    assert "least_loaded" in str(info.value)


def test_prefix_of_chat_joins_message_texts() -> None:
    body = orjson.dumps(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image"}]},
            ],
        }
    )
    assert prefix_of(body) == "system:be brief\nuser:hi\n"


def test_prefix_of_completion_and_limits() -> None:
    assert prefix_of(orjson.dumps({"prompt": "abc"})) == "abc"
    assert prefix_of(orjson.dumps({"prompt": ["first", "second"]})) == "first"
    assert prefix_of(orjson.dumps({"prompt": [1, 2, 3]})) == "1,2,3"
    assert len(prefix_of(orjson.dumps({"prompt": "y" * 10_000}))) == PREFIX_CHARS
    long_chat = {"messages": [{"role": "user", "content": "z" * 5000}] * 10}
    assert len(prefix_of(orjson.dumps(long_chat))) == PREFIX_CHARS


@pytest.mark.parametrize("body", [b"", b"not json", b"[1]", b'{"prompt": 5}', b"{}"])
def test_prefix_of_unusable_bodies_is_empty(body: bytes) -> None:
    assert prefix_of(body) == ""
