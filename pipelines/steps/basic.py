"""The first steps: pass-through and ROI statistics with a binned preview image."""

from __future__ import annotations

from typing import Any

import numpy as np


def passthrough(frame: np.ndarray, meta: dict) -> dict[str, Any]:
    """Return the frame unchanged as result ``image`` (for plumbing tests and raw views)."""
    return {"image": frame}


def bin_pixels_reference(frame: np.ndarray, factor: int) -> np.ndarray:
    """Sum ``factor`` x ``factor`` blocks (edges that do not fill a block are cut); float32 out."""
    rows, cols = (frame.shape[0] // factor) * factor, (frame.shape[1] // factor) * factor
    blocks = frame[:rows, :cols].reshape(rows // factor, factor, cols // factor, factor)
    return blocks.sum(axis=(1, 3), dtype=np.float64).astype(np.float32)


def _check_roi(name: str, roi: Any, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    if not (isinstance(roi, list | tuple) and len(roi) == 4 and all(isinstance(v, int) for v in roi)):
        raise ValueError(f"roi {name!r} must be [row0, row1, col0, col1], got {roi!r}")
    r0, r1, c0, c1 = roi
    if not (0 <= r0 < r1 <= shape[0] and 0 <= c0 < c1 <= shape[1]):
        raise ValueError(f"roi {name!r} = {roi} does not fit a frame of shape {shape}")
    return r0, r1, c0, c1


def roi_stats(frame: np.ndarray, meta: dict, *, rois: dict | None = None, bin: int = 4) -> dict[str, Any]:
    """Sum and mean of each rectangular ROI ``name: [row0, row1, col0, col1]``, the
    whole-frame sum, and the frame binned ``bin`` x ``bin`` as result ``binned``."""
    out: dict[str, Any] = {"total_sum": float(frame.sum(dtype=np.float64))}
    for name, roi in (rois or {}).items():
        r0, r1, c0, c1 = _check_roi(name, roi, frame.shape)
        part = frame[r0:r1, c0:c1]
        total = float(part.sum(dtype=np.float64))
        out[f"{name}_sum"] = total
        out[f"{name}_mean"] = total / part.size
    if bin > 1:
        from pipelines.steps.binning import bin_pixels  # numba kernel, same result as bin_pixels_reference

        out["binned"] = bin_pixels(frame, bin)
    return out
