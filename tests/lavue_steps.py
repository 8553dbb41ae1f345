"""A processing step for the live-view tests: one image per dtype, made from the frame.

Workers import it as ``tests.lavue_steps:typed_images`` (the tests put the
repository on PYTHONPATH), so a real pipeline produces every dtype Lavue must
show, with values the test recomputes from the simulated frame.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: result name suffix -> dtype (names avoid ">" so they read well as topics)
DTYPES = {
    "uint8": "uint8",
    "int8": "int8",
    "uint16": "uint16",
    "int16": "int16",
    "uint32": "uint32",
    "int32": "int32",
    "uint64": "uint64",
    "int64": "int64",
    "float32": "float32",
    "float64": "float64",
    "bool": "bool",
    "be_uint16": ">u2",
    "be_int32": ">i4",
    "be_float64": ">f8",
}


def typed_image(frame: np.ndarray, dtype: str) -> np.ndarray:
    """The frame turned into ``dtype`` with values that use the type's range (and sign)."""
    dt = np.dtype(dtype)
    wide = frame.astype(np.int64)
    if dt.kind == "b":
        return (wide % 3) == 0
    if dt.kind in "iu":
        mixed = wide * np.int64(2654435761) - np.int64(1 << 40)  # wraps: high bits and negatives
        return mixed.astype(dt)
    return (frame.astype(np.float64) * 0.37 - 1000.0).astype(dt)


def typed_images(frame: np.ndarray, meta: dict, *, dtypes: list | None = None) -> dict[str, Any]:
    """Results ``img_<name>`` for each name of :data:`DTYPES` in ``dtypes`` (default: all),
    plus the scalar ``total`` (the frame's sum)."""
    names = list(DTYPES) if dtypes is None else dtypes
    out: dict[str, Any] = {"total": float(frame.sum(dtype=np.float64))}
    for name in names:
        if name not in DTYPES:
            raise ValueError(f"dtypes: {name!r} is not one of {', '.join(DTYPES)}")
        out[f"img_{name}"] = typed_image(frame, DTYPES[name])
    return out
