"""Pixel binning: sum or mean of blocks of pixels (smaller frames for views and maps).

Edges that do not fill a whole block are cut. NaN pixels (masked by
calibration) are skipped: a block's sum counts its valid pixels only and its
mean divides by their number (a block with none is NaN in mean mode, 0 in sum
mode). Sums are accumulated in float64, so integer frames bin exactly; the
result is float32.
"""

from __future__ import annotations

from typing import Any, Literal

import numba
import numpy as np


@numba.njit(parallel=True, cache=True)
def bin_kernel(frame, fr, fc, mean, out):
    """out[i, j] = sum (or mean) of the non-NaN pixels of block (i, j) of size fr x fc."""
    n_rows, n_cols = out.shape
    for i in numba.prange(n_rows):
        total = np.zeros(n_cols, dtype=np.float64)
        count = np.zeros(n_cols, dtype=np.int64)
        for r in range(i * fr, (i + 1) * fr):
            for j in range(n_cols):
                block_total, block_count = 0.0, 0
                for c in range(j * fc, (j + 1) * fc):
                    v = np.float64(frame[r, c])
                    if v == v:
                        block_total += v
                        block_count += 1
                total[j] += block_total
                count[j] += block_count
        for j in range(n_cols):
            if mean:
                out[i, j] = total[j] / count[j] if count[j] > 0 else np.nan
            else:
                out[i, j] = total[j]


def bin_reference(frame: np.ndarray, factor: int | tuple[int, int], mean: bool = False) -> np.ndarray:
    """Plain numpy binning with the same rules as :func:`bin_kernel`."""
    fr, fc = (factor, factor) if isinstance(factor, int) else factor
    rows, cols = (frame.shape[0] // fr) * fr, (frame.shape[1] // fc) * fc
    blocks = frame[:rows, :cols].reshape(rows // fr, fr, cols // fc, fc)
    total = np.nansum(blocks, axis=(1, 3), dtype=np.float64)
    if not mean:
        return total.astype(np.float32)
    count = (~np.isnan(blocks)).sum(axis=(1, 3)) if frame.dtype.kind == "f" else fr * fc
    with np.errstate(invalid="ignore", divide="ignore"):
        return (total / count).astype(np.float32)


def _factors(factor: Any) -> tuple[int, int]:
    if isinstance(factor, int) and not isinstance(factor, bool) and factor > 0:
        return factor, factor
    if (
        isinstance(factor, list | tuple)
        and len(factor) == 2
        and all(isinstance(f, int) and not isinstance(f, bool) and f > 0 for f in factor)
    ):
        return int(factor[0]), int(factor[1])
    raise ValueError(f"binning: factor = {factor!r}; expected a positive int or [rows, cols]")


def bin_pixels(frame: np.ndarray, factor: int | tuple[int, int], mean: bool = False) -> np.ndarray:
    """Bin a 2D frame by ``factor`` (int or (rows, cols)) with the numba kernel; float32 out."""
    fr, fc = _factors(factor)
    if frame.ndim != 2:
        raise ValueError(f"binning: expected a 2D frame, got shape {frame.shape}")
    out = np.empty((frame.shape[0] // fr, frame.shape[1] // fc), dtype=np.float32)
    if out.size:
        bin_kernel(frame, fr, fc, mean, out)
    return out


class Binning:
    """Bin the frame ``factor`` x ``factor`` (or [rows, cols] factors) by ``mode`` (sum or mean).

    The result is named ``output``; ``output: frame`` replaces the frame for the
    steps after this one (e.g. bin first, then integrate or find peaks).
    """

    def __init__(
        self, *, factor: int | list = 2, mode: Literal["sum", "mean"] = "sum", output: str = "binned"
    ):
        if mode not in ("sum", "mean"):
            raise ValueError(f"binning: mode = {mode!r}; expected sum or mean")
        self.factor = _factors(factor)
        self.mean = mode == "mean"
        self.output = output

    def __call__(self, frame: np.ndarray, meta: dict) -> dict[str, Any]:
        return {self.output: bin_pixels(frame, self.factor, mean=self.mean)}
