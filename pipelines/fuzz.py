"""Seeded generators of malformed data-plane messages, for the robustness tests.

Every message it yields is one that :func:`pipelines.message.decode_many` rejects:
broken JSON, wrong buffer sizes, absurd shapes and dtypes, negative or huge
indices, unknown kinds, wrong part counts, hostile payloads. Kept in the engine
so anyone can aim it at a port of a running pipeline.
"""

from __future__ import annotations

import json
import pickle
import random
from collections.abc import Iterator

from . import message as m

_VALID = {
    "protocol": m.PROTOCOL,
    "kind": "result",
    "scan": 1,
    "index": 0,
    "stream": "main",
    "buffers": [{"name": "a", "dtype": "<f4", "shape": [4, 4]}],
    "scalars": {"x": 1.0},
    "meta": {},
}
_BUFFER = bytes(64)


def _mutations(rng: random.Random) -> list:
    header = dict(_VALID)
    big = rng.choice([2**63, -(2**63), 10**30, 2**53])
    choice = rng.randrange(22)
    if choice == 0:
        return [rng.randbytes(rng.randrange(0, 300))]
    if choice == 1:
        return [json.dumps(header).encode()[: rng.randrange(1, 60)], _BUFFER]
    if choice == 2:
        return [json.dumps({**header, "index": -rng.randrange(1, 10**9)}).encode(), _BUFFER]
    if choice == 3:
        return [json.dumps({**header, "index": big}).encode(), _BUFFER]
    if choice == 4:
        return [json.dumps({**header, "kind": rng.choice(["", "FRAME", "drop", "exec", "x" * 500])}).encode(), _BUFFER]
    if choice == 5:
        return [json.dumps(header).encode()] + [_BUFFER] * rng.randrange(2, 6)
    if choice == 6:
        return [json.dumps(header).encode()]
    if choice == 7:
        shape = [rng.randrange(2**20, 2**31) for _ in range(rng.randrange(2, 4))]
        return [json.dumps({**header, "buffers": [{"name": "a", "dtype": "<f4", "shape": shape}]}).encode(), _BUFFER]
    if choice == 8:
        dtype = rng.choice(["O", "<U8", "V16", "M8[ns]", "object", "|S4", "<c32", "", "f4f4", "<f4,<i4"])
        return [json.dumps({**header, "buffers": [{"name": "a", "dtype": dtype, "shape": [4, 4]}]}).encode(), _BUFFER]
    if choice == 9:
        return [json.dumps({**header, "buffers": [{"name": "a", "dtype": "<f4", "shape": [4, 5]}]}).encode(), _BUFFER]
    if choice == 10:
        return [json.dumps({**header, "buffers": [{"name": "a", "dtype": "<f4", "shape": [-4, -4]}]}).encode(), _BUFFER]
    if choice == 11:
        return [json.dumps({**header, "protocol": rng.choice(["tangopipe/0", None, 1, "x"])}).encode(), _BUFFER]
    if choice == 12:
        return [pickle.dumps({"kind": "result"}), _BUFFER]
    if choice == 13:
        return [json.dumps([header]).encode(), _BUFFER]
    if choice == 14:
        return [json.dumps({**header, "scan": rng.choice([[1], {"a": 1}, True, 1.5, "s" * 300])}).encode(), _BUFFER]
    if choice == 15:
        return [json.dumps({**header, "scalars": {"x": [1, 2, 3]}}).encode(), _BUFFER]
    if choice == 16:
        return [b"{" * rng.randrange(1000, 5000), _BUFFER]
    if choice == 17:
        return [json.dumps({**header, "extra": "field"}).encode(), _BUFFER]
    if choice == 18:
        buffers = [{"name": "a", "dtype": "<f4", "shape": [4, 4]}] * 2
        return [json.dumps({**header, "buffers": buffers}).encode(), _BUFFER, _BUFFER]
    if choice == 19:
        batch = {"protocol": m.PROTOCOL, "kind": "batch", "body": {"parts": [rng.randrange(1, 9), 5]}}
        return [json.dumps(batch).encode(), json.dumps(header).encode(), _BUFFER]
    if choice == 20:
        return [json.dumps({**header, "index": rng.choice(["7", 1.5, None, True])}).encode(), _BUFFER]
    return [json.dumps({**header, "times": {"acquired": "yesterday"}}).encode(), _BUFFER]


def malformed_messages(count: int, seed: int = 0) -> Iterator[list[bytes]]:
    """``count`` seeded malformed messages, each certain to be rejected by decode_many."""
    rng = random.Random(seed)
    made = 0
    while made < count:
        parts = _mutations(rng)
        try:
            m.decode_many(parts)
        except m.BadMessage:
            made += 1
            yield parts
