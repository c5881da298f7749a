"""CPU per vector of the embedding path's conversions: repeated floats vs packed float32.

One process replays what the three hops do with one engine vector (base64 from the engine →
embedding service → EmbedBatchResponse → scheduler → EmbedResponse → edge → JSON), once as
before packed vectors (unpacked to floats, repeated float fields, packed again for base64)
and once as now (the decoded bytes in `packed_values`, converted once at the edge). Both
must give the same JSON bytes; the script checks that before timing.

Usage: python bench/embedding_vectors.py [--dim 384] [--number 20000]
"""

from __future__ import annotations

import argparse
import base64
import binascii
import random
import struct
import timeit
from collections.abc import Callable

import orjson

from sage.common.float32 import openai_embedding, packed_or_pack
from sage.rpc.embedding.v1 import embedding_pb2 as epb
from sage.rpc.scheduler.v1 import scheduler_pb2 as spb


def repeated_floats(b64: str, encoding: str) -> bytes:
    """The path before packed vectors."""
    raw = binascii.a2b_base64(b64)
    floats = list(struct.unpack(f"<{len(raw) // 4}f", raw))  # embedding service
    wire = epb.EmbedBatchResponse(vectors=[epb.Vector(values=floats)]).SerializeToString()
    vectors = [list(v.values) for v in epb.EmbedBatchResponse.FromString(wire).vectors]
    wire = spb.EmbedResponse(  # scheduler
        data=[spb.Embedding(index=i, values=v) for i, v in enumerate(vectors)]
    ).SerializeToString()
    out: list[str | list[float]] = []
    for item in spb.EmbedResponse.FromString(wire).data:  # edge
        if encoding == "base64":
            packed = struct.pack(f"<{len(item.values)}f", *item.values)
            out.append(base64.b64encode(packed).decode())
        else:
            out.append(list(item.values))
    return orjson.dumps(out)


def packed_values(b64: str, encoding: str) -> bytes:
    """The path with packed vectors."""
    raw = binascii.a2b_base64(b64)  # embedding service
    wire = epb.EmbedBatchResponse(vectors=[epb.Vector(packed_values=raw)]).SerializeToString()
    vectors = [
        packed_or_pack(v.packed_values, v.values)
        for v in epb.EmbedBatchResponse.FromString(wire).vectors
    ]
    wire = spb.EmbedResponse(  # scheduler
        data=[spb.Embedding(index=i, packed_values=v) for i, v in enumerate(vectors)]
    ).SerializeToString()
    return orjson.dumps(  # edge
        [
            openai_embedding(item.packed_values, item.values, encoding)
            for item in spb.EmbedResponse.FromString(wire).data
        ]
    )


def per_call_us(path: Callable[[str, str], bytes], b64: str, encoding: str, number: int) -> float:
    """Best of three timings, microseconds per call."""
    return min(timeit.repeat(lambda: path(b64, encoding), number=number, repeat=3)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--number", type=int, default=20000)
    args = parser.parse_args()
    rng = random.Random(7)
    vector = [rng.gauss(0, 1) for _ in range(args.dim)]
    b64 = base64.b64encode(struct.pack(f"<{args.dim}f", *vector)).decode()
    print(
        "| encoding_format | repeated floats (us) | packed bytes (us) | ratio |\n|---|---|---|---|"
    )
    for encoding in ("float", "base64"):
        assert repeated_floats(b64, encoding) == packed_values(b64, encoding)
        old = per_call_us(repeated_floats, b64, encoding, args.number)
        new = per_call_us(packed_values, b64, encoding, args.number)
        print(f"| {encoding} | {old:.1f} | {new:.1f} | {new / old:.2f} |")


if __name__ == "__main__":
    main()
