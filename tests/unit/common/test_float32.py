"""Packed float32 vectors: the bytes are OpenAI's base64 layout, and a reply rendered from
them equals the one rendered from protobuf's repeated floats (an older peer's message)."""

from __future__ import annotations

import base64
import math
import struct

import orjson
import pytest

from sage.common.float32 import openai_embedding, pack, packed_or_pack, unpack
from sage.rpc.scheduler.v1 import scheduler_pb2 as spb

# Values whose float32 rounding or text is awkward: a third, -0.0, the smallest subnormal,
# the largest finite float32, a double that is not a float32, an int, and infinities.
AWKWARD = [1 / 3, -0.0, 1e-45, 3.4028234663852886e38, 0.1, 7, -math.inf, math.inf, -2.5e-8]


def test_pack_is_little_endian_float32_as_openai_base64_carries_it() -> None:
    assert pack(AWKWARD) == struct.pack(f"<{len(AWKWARD)}f", *AWKWARD)
    assert unpack(pack(AWKWARD)) == list(struct.unpack(f"<{len(AWKWARD)}f", pack(AWKWARD)))
    assert math.copysign(1, unpack(pack([-0.0]))[0]) == -1  # -0.0 survives
    with pytest.raises(ValueError):
        unpack(b"\x00" * 6)
    with pytest.raises(TypeError):
        pack([1.0, "x"])  # type: ignore[list-item]


def test_packing_rounds_exactly_as_protobuf_float_fields_do() -> None:
    """A float-only engine's doubles packed by the embedding service give the same floats a
    `repeated float` field gave before packed vectors."""
    old = spb.Embedding(values=AWKWARD)
    assert unpack(pack(AWKWARD)) == list(old.values)
    assert packed_or_pack(b"", old.values) == pack(AWKWARD)
    assert packed_or_pack(pack([1.0]), old.values) == pack([1.0])


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_old_style_and_packed_messages_give_the_same_reply_bytes(encoding: str) -> None:
    """An edge reading a scheduler from before packed vectors (repeated floats only) answers
    byte for byte what it answers from packed bytes, and what it answered before."""
    old = spb.Embedding(index=0, values=AWKWARD)
    new = spb.Embedding(index=0, packed_values=pack(old.values))
    from_old = orjson.dumps(openai_embedding(old.packed_values, old.values, encoding))
    from_new = orjson.dumps(openai_embedding(new.packed_values, new.values, encoding))
    assert from_old == from_new
    if encoding == "base64":  # what the edge sent before: struct.pack of the floats
        before = base64.b64encode(struct.pack(f"<{len(old.values)}f", *old.values)).decode()
        assert from_new == orjson.dumps(before)
    else:
        assert from_new == orjson.dumps(list(old.values))
