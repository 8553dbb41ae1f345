"""Steps used by the data-plane benchmark (by dotted path, e.g. ``benchmarks.steps:busy``).

``first_pixel`` returns one scalar, so a pass-through run measures frames moving
master -> worker, not 8 MB results moving worker -> sorter -> sink. ``busy``
spends a fixed CPU time per frame on real arithmetic, so the number of workers,
not the data plane, bounds the rate.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np


def first_pixel(frame: np.ndarray, meta: dict) -> dict[str, Any]:
    """The frame's first pixel: touches the frame, returns almost nothing."""
    return {"first_pixel": frame.flat[0].item()}


def busy(frame: np.ndarray, meta: dict, *, ms: float = 40.0) -> dict[str, Any]:
    """Spend ``ms`` milliseconds of this thread's CPU time on numpy work over the frame.

    CPU time, not wall time: on a loaded machine a frame still costs ``ms`` of
    computation, so scaling with workers shows the cores, not the clock.
    """
    if isinstance(ms, bool) or not isinstance(ms, int | float) or not 0 <= ms <= 60_000:
        raise ValueError(f"busy: parameter ms must be a number of milliseconds in [0, 60000], got {ms!r}")
    pixels = np.asarray(frame, dtype=np.float64).ravel()[:65536]
    budget = ms / 1000.0
    start = time.thread_time()
    result = float(np.sqrt(pixels + 1.0).sum())
    shift = 2.0
    while time.thread_time() - start < budget:  # the same arithmetic again until the budget is spent
        np.sqrt(pixels + shift).sum()
        shift += 1.0
    return {"busy_sum": result}
