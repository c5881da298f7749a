"""Embedding vectors as packed little-endian float32 bytes, the form they travel in.

Engines send vectors base64-encoded in exactly this layout (OpenAI's `encoding_format:
base64`), so the embedding service keeps the decoded bytes and every hop after it passes
them on untouched (the `packed_values` proto fields); only the HTTP edge turns them into
what the caller asked for. `array('f')` rather than numpy: the base install has no numpy,
and for a few hundred floats it is as fast.
"""

from __future__ import annotations

import binascii
import sys
from array import array
from collections.abc import Iterable, Sequence

_SWAP = sys.byteorder != "little"  # array('f') uses the machine's byte order


def pack(values: Iterable[float]) -> bytes:
    """Floats as little-endian float32 bytes, rounded as protobuf's `float` rounds them.

    TypeError for anything that is not a number."""
    packed = array("f", values)
    if _SWAP:
        packed.byteswap()
    return packed.tobytes()


def unpack(data: bytes) -> list[float]:
    """Little-endian float32 bytes as Python floats (the float32 values, exactly).

    ValueError when `data` is not a whole number of float32 values."""
    values = array("f")
    values.frombytes(data)
    if _SWAP:
        values.byteswap()
    return values.tolist()


def to_base64(data: bytes) -> str:
    """Packed bytes as OpenAI's `encoding_format: base64` string."""
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def packed_or_pack(packed: bytes, values: Iterable[float]) -> bytes:
    """A message's vector as bytes: its `packed_values`, or (a peer of the release before
    packed vectors) its repeated `values`, packed."""
    return packed if packed else pack(values)


def openai_embedding(
    packed: bytes, values: Sequence[float], encoding_format: str
) -> str | list[float]:
    """One vector as the `embedding` of an OpenAI reply: base64 of the float32 bytes for
    `encoding_format` "base64", else floats. Empty `packed` means a peer from before packed
    vectors sent `values`; the reply is the same either way."""
    if encoding_format == "base64":
        return to_base64(packed_or_pack(packed, values))
    return unpack(packed) if packed else list(values)
