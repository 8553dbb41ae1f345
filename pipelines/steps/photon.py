"""Thresholding and photon counting.

Photon counting turns ADU into whole photons per pixel: with ``e = (value - pedestal) / gain``
(the signal in photon units), a pixel holds 0 photons when ``e < threshold`` and
otherwise ``floor(e + 1 - threshold)``: one photon from ``threshold`` up to
``1 + threshold``, two from there, and so on (``threshold: 0.5`` rounds). NaN pixels
count 0. Outputs the photon image (int32) and the scalar ``total_photons``.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from pipelines.calibration_store import load_array


@numba.njit(parallel=True, cache=True)
def photon_kernel(frame, pedestal, gain, threshold, out):
    """Photon counts into ``out`` (int32); returns their total. Pixels with gain <= 0 count 0."""
    rows, cols = frame.shape
    totals = np.zeros(rows, dtype=np.int64)
    for i in numba.prange(rows):
        row_total = 0
        for j in range(cols):
            n = np.int32(0)
            if gain[i, j] > 0:
                e = (np.float64(frame[i, j]) - pedestal[i, j]) / gain[i, j]
                if e >= threshold:
                    n = np.int32(np.floor(e + 1.0 - threshold))
            out[i, j] = n
            row_total += n
        totals[i] = row_total
    return totals.sum()


def photon_reference(
    frame: np.ndarray, pedestal: np.ndarray, gain: np.ndarray, threshold: float
) -> np.ndarray:
    """Plain numpy photon counts (int32), same rule as :func:`photon_kernel`."""
    gain = np.asarray(gain, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        e = (frame.astype(np.float64) - pedestal) / gain
        counts = np.where((gain > 0) & (e >= threshold), np.floor(e + 1.0 - threshold), 0.0)
    return counts.astype(np.int32)


@numba.njit(parallel=True, cache=True)
def threshold_kernel(frame, low, high, out):
    """Copy of ``frame`` (float32) with values outside [low, high] and NaN set to 0."""
    rows, cols = frame.shape
    for i in numba.prange(rows):
        for j in range(cols):
            v = np.float32(frame[i, j])
            out[i, j] = v if (v >= low and v <= high) else np.float32(0.0)


def threshold_reference(frame: np.ndarray, low: float, high: float) -> np.ndarray:
    values = frame.astype(np.float32)
    with np.errstate(invalid="ignore"):
        return np.where((values >= np.float32(low)) & (values <= np.float32(high)), values, np.float32(0.0))


def _per_pixel(value: Any, name: str) -> np.ndarray | float:
    if isinstance(value, str):
        array = np.asarray(load_array(value), dtype=np.float64)
        if array.ndim != 2:
            raise ValueError(
                f"photon_count: {name} file {value!r} has shape {array.shape}; expected an image"
            )
        return array
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"photon_count: {name} = {value!r}; expected a number or a file name")


class PhotonCount:
    """Count photons per pixel.

    Parameters:
        gain: ADU per photon (a number or a per-pixel file).
        pedestal: ADU of no photon (a number or a file); 0 when the frame is already calibrated.
        threshold: fraction of a photon from which a pixel counts one (0.5 rounds).
        output: name of the photon image; ``frame`` replaces the frame for later steps;
            empty ("") emits only ``total_photons``.
    """

    def __init__(
        self,
        *,
        gain: float | str,
        pedestal: float | str = 0.0,
        threshold: float = 0.5,
        output: str = "photons",
    ):
        self.gain = _per_pixel(gain, "gain")
        if isinstance(self.gain, float) and self.gain <= 0:
            raise ValueError(f"photon_count: gain = {gain!r}; expected ADU per photon > 0")
        self.pedestal = _per_pixel(pedestal, "pedestal")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(
                f"photon_count: threshold = {threshold!r}; expected a fraction of a photon in (0, 1]"
            )
        self.threshold = float(threshold)
        self.output = output
        self._tables: tuple[tuple[int, int], np.ndarray, np.ndarray] | None = None

    def tables(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Per-pixel pedestal and gain (float64) for frames of ``shape``."""
        if self._tables is None or self._tables[0] != shape:
            arrays = []
            for name, value in (("pedestal", self.pedestal), ("gain", self.gain)):
                array = (
                    np.broadcast_to(np.asarray(value, dtype=np.float64), shape)
                    if np.ndim(value) == 0
                    else value
                )
                if array.shape != shape:
                    raise ValueError(f"photon_count: {name} has shape {array.shape}, the frame has {shape}")
                arrays.append(np.ascontiguousarray(array))
            self._tables = (shape, arrays[0], arrays[1])
        return self._tables[1], self._tables[2]

    def __call__(self, frame: np.ndarray, meta: dict) -> dict[str, Any]:
        if frame.ndim != 2:
            raise ValueError(f"photon_count: expected a 2D frame, got shape {frame.shape}")
        pedestal, gain = self.tables(frame.shape)
        counts = np.empty(frame.shape, dtype=np.int32)
        total = photon_kernel(frame, pedestal, gain, self.threshold, counts)
        out: dict[str, Any] = {"total_photons": int(total)}
        if self.output:
            out[self.output] = counts
        return out


class Threshold:
    """Keep pixels with ``low <= value <= high`` and set the others (and NaN) to 0.

    Parameters:
        low: lowest value kept.
        high: highest value kept (default: no upper limit; set it to drop zingers).
        output: result name; ``frame`` (the default) replaces the frame for later steps.
    """

    def __init__(self, *, low: float, high: float | None = None, output: str = "frame"):
        if high is not None and high < low:
            raise ValueError(f"threshold: high = {high!r} is below low = {low!r}")
        self.low = np.float32(low)
        self.high = np.float32(np.inf if high is None else high)
        self.output = output

    def __call__(self, frame: np.ndarray, meta: dict) -> dict[str, Any]:
        if frame.ndim != 2:
            raise ValueError(f"threshold: expected a 2D frame, got shape {frame.shape}")
        out = np.empty(frame.shape, dtype=np.float32)
        threshold_kernel(frame, self.low, self.high, out)
        return {self.output: out}
