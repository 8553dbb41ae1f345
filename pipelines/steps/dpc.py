"""Centre of mass and total intensity of the transmitted beam, for differential phase contrast.

Mapped over a scan, the shift of the centre of mass gives the phase gradient and
the total gives absorption. The centre is ``sum(value * coordinate) / sum(value)``
in full-frame pixel indices (as ``scipy.ndimage.center_of_mass``), over an
optional ROI, counting only pixels ``>= threshold``; NaN pixels are skipped.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np


@numba.njit(parallel=True, cache=True)
def com_kernel(frame, r0, r1, c0, c1, threshold):
    """(total, row, col) of ``frame[r0:r1, c0:c1]``, pixels below ``threshold`` or NaN left out."""
    n = r1 - r0
    totals = np.zeros(n)
    col_moments = np.zeros(n)
    for k in numba.prange(n):
        total, moment = 0.0, 0.0
        for j in range(c0, c1):
            v = np.float64(frame[r0 + k, j])
            if v == v and v >= threshold:
                total += v
                moment += v * j
        totals[k], col_moments[k] = total, moment
    total = totals.sum()
    if total == 0.0:
        return 0.0, np.nan, np.nan
    row_moment = 0.0
    for k in range(n):
        row_moment += totals[k] * (r0 + k)
    return total, row_moment / total, col_moments.sum() / total


def com_reference(
    frame: np.ndarray, roi: tuple[int, int, int, int], threshold: float
) -> tuple[float, float, float]:
    """(total, row, col) with scipy.ndimage.center_of_mass."""
    from scipy import ndimage

    r0, r1, c0, c1 = roi
    part = frame[r0:r1, c0:c1].astype(np.float64)
    part = np.where(np.isnan(part) | (part < threshold), 0.0, part)
    total = part.sum()
    if total == 0:
        return 0.0, np.nan, np.nan
    row, col = ndimage.center_of_mass(part)
    return total, row + r0, col + c0


class CentreOfMass:
    """Centre of mass and total of each frame: scalars ``<prefix>_row``, ``<prefix>_col``,
    ``<prefix>_total`` (NaN centre when the total is 0).

    Parameters:
        roi: [row0, row1, col0, col1] to use (ends excluded); default the whole frame.
        threshold: pixels below this value count 0 (cuts the noise floor).
        prefix: start of the result names (use two steps with two prefixes for two ROIs).
    """

    def __init__(self, *, roi: list | None = None, threshold: float | None = None, prefix: str = "com"):
        if roi is not None and not (
            isinstance(roi, list | tuple)
            and len(roi) == 4
            and all(isinstance(v, int) and v >= 0 for v in roi)
            and roi[0] < roi[1]
            and roi[2] < roi[3]
        ):
            raise ValueError(
                f"centre_of_mass: roi = {roi!r}; expected [row0, row1, col0, col1] with row0 < row1"
            )
        self.roi = tuple(roi) if roi is not None else None
        self.threshold = -np.inf if threshold is None else float(threshold)
        self.prefix = prefix

    def __call__(self, frame: np.ndarray, meta: dict) -> dict[str, Any]:
        if frame.ndim != 2:
            raise ValueError(f"centre_of_mass: expected a 2D frame, got shape {frame.shape}")
        r0, r1, c0, c1 = self.roi or (0, frame.shape[0], 0, frame.shape[1])
        if r1 > frame.shape[0] or c1 > frame.shape[1]:
            raise ValueError(
                f"centre_of_mass: roi {list(self.roi)} does not fit a frame of shape {frame.shape}"
            )
        total, row, col = com_kernel(frame, r0, r1, c0, c1, self.threshold)
        p = self.prefix
        return {f"{p}_row": float(row), f"{p}_col": float(col), f"{p}_total": float(total)}
