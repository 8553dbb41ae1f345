"""Tomography: sinograms of chosen slices, and a quick filtered back-projection preview.

The ``sinogram_rows`` step cuts detector rows out of each projection (one per
slice to preview) and passes on the rotation angle from ``meta["angle"]``
(degrees). A :class:`SinogramAssembler` downstream stacks those rows by angle into
one sinogram per slice and reconstructs it with :func:`fbp`.

Reconstruction geometry: parallel beam, angles in degrees covering 180 degrees.
Image pixel ``[i, j]`` is at x = j - c, y = i - c (c = (size - 1) / 2) and is seen at
detector position ``x cos(angle) + y sin(angle) + centre``, ``centre`` being the
rotation axis in detector pixels (default: the detector's middle). Values are
line integrals per pixel, so a slice of attenuation mu per pixel comes back as mu.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numba
import numpy as np


def ramp_filter(sinogram: np.ndarray) -> np.ndarray:
    """Each projection (row) filtered with the Ram-Lak ramp, built in real space so the
    mean comes out right (Kak & Slaney, eq. 3.29); zero-padded to avoid wrap-around."""
    n_angles, n_det = sinogram.shape
    size = max(64, 1 << int(np.ceil(np.log2(2 * n_det))))
    n = np.concatenate([np.arange(1, size // 2 + 1, 2), np.arange(size // 2 - 1, 0, -2)])
    kernel = np.zeros(size)
    kernel[0] = 0.25
    kernel[1::2] = -1.0 / (np.pi * n) ** 2
    response = 2.0 * np.real(np.fft.fft(kernel))
    padded = np.zeros((n_angles, size))
    padded[:, :n_det] = sinogram
    return np.real(np.fft.ifft(np.fft.fft(padded, axis=1) * response, axis=1))[:, :n_det]


@numba.njit(parallel=True, cache=True)
def backproject_kernel(filtered, cos_a, sin_a, centre, out):
    """Sum over angles of the filtered projections, linearly interpolated, into ``out`` (size x size)."""
    size = out.shape[0]
    n_det = filtered.shape[1]
    c = (size - 1) / 2.0
    for i in numba.prange(size):
        y = i - c
        row = np.zeros(size)
        for a in range(cos_a.shape[0]):  # one projection at a time stays in cache
            for j in range(size):
                t = (j - c) * cos_a[a] + y * sin_a[a] + centre
                if 0.0 <= t <= n_det - 1:
                    k = min(int(t), n_det - 2)
                    frac = t - k
                    row[j] += (1.0 - frac) * filtered[a, k] + frac * filtered[a, k + 1]
        out[i] = row


def backproject_reference(
    filtered: np.ndarray, angles_deg: np.ndarray, centre: float, size: int
) -> np.ndarray:
    """Plain numpy back-projection with ``np.interp`` (same geometry as the kernel)."""
    c = (size - 1) / 2.0
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) - c
    out = np.zeros((size, size))
    detector = np.arange(filtered.shape[1], dtype=np.float64)
    for row, angle in zip(filtered, np.radians(angles_deg), strict=True):
        t = x * np.cos(angle) + y * np.sin(angle) + centre
        out += np.interp(t, detector, row, left=0.0, right=0.0)
    return out


def _prepare(sinogram: np.ndarray, angles_deg: Any, centre: float | None, size: int | None):
    sinogram = np.asarray(sinogram, dtype=np.float64)
    angles = np.asarray(angles_deg, dtype=np.float64)
    if sinogram.ndim != 2 or angles.shape != (sinogram.shape[0],):
        raise ValueError(
            f"fbp: sinogram {sinogram.shape} needs one angle per row, got {angles.shape[0]} angles"
        )
    n_det = sinogram.shape[1]
    centre = (n_det - 1) / 2.0 if centre is None else float(centre)
    return np.nan_to_num(sinogram), angles, centre, n_det if size is None else int(size)


def fbp(
    sinogram: np.ndarray, angles_deg: Any, centre: float | None = None, size: int | None = None
) -> np.ndarray:
    """Filtered back-projection of ``sinogram`` (n_angles, n_det) into a size x size float32 image."""
    sinogram, angles, centre, size = _prepare(sinogram, angles_deg, centre, size)
    out = np.empty((size, size), dtype=np.float64)
    radians = np.radians(angles)
    backproject_kernel(ramp_filter(sinogram), np.cos(radians), np.sin(radians), centre, out)
    return (out * np.pi / (2 * len(angles))).astype(np.float32)


def fbp_reference(
    sinogram: np.ndarray, angles_deg: Any, centre: float | None = None, size: int | None = None
) -> np.ndarray:
    """:func:`fbp` with the numpy back-projector."""
    sinogram, angles, centre, size = _prepare(sinogram, angles_deg, centre, size)
    out = backproject_reference(ramp_filter(sinogram), angles, centre, size)
    return (out * np.pi / (2 * len(angles))).astype(np.float32)


_ROW_KEY = re.compile(r"sino_(\d+)$")


class SinogramAssembler:
    """Detector rows of each projection, by slice row and angle, for the slices of one scan."""

    def __init__(self, rows: list[int] | None = None):
        self.only = set(rows) if rows is not None else None
        self._lines: dict[int, list[tuple[float, np.ndarray]]] = {}

    def add_row(self, row: int, line: np.ndarray, angle: float) -> None:
        if self.only is None or row in self.only:
            self._lines.setdefault(int(row), []).append((float(angle), np.asarray(line, dtype=np.float32)))

    def add(self, projection: np.ndarray, angle: float) -> None:
        """Take the rows of interest (all when none were named) from a whole projection."""
        rows = range(projection.shape[0]) if self.only is None else sorted(self.only)
        for row in rows:
            self.add_row(row, projection[row], angle)

    def add_results(self, results: Mapping[str, Any]) -> None:
        """Take the ``sino_<row>`` arrays and ``angle`` of one ``sinogram_rows`` result."""
        for name, value in results.items():
            match = _ROW_KEY.match(name)
            if match:
                self.add_row(int(match.group(1)), value, results["angle"])

    def rows(self) -> list[int]:
        return sorted(self._lines)

    def sinogram(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(angles sorted ascending, sinogram n_angles x n_det) of slice ``row``."""
        lines = sorted(self._lines.get(row, []), key=lambda item: item[0])
        if not lines:
            raise KeyError(f"no projection rows for slice {row} yet; have {self.rows()}")
        return np.array([a for a, _ in lines]), np.stack([line for _, line in lines])

    def reconstruct(self, row: int, centre: float | None = None) -> np.ndarray:
        """Quick FBP preview of slice ``row`` from the angles received so far."""
        angles, sinogram = self.sinogram(row)
        return fbp(sinogram, angles, centre)


def sinogram_rows(frame: np.ndarray, meta: dict, *, rows: list, log: bool = False) -> dict[str, Any]:
    """Rows ``rows`` of the projection as ``sino_<row>`` (float32) and ``angle`` from ``meta["angle"]``.
    With ``log``, each value becomes -ln(value) (for flat-field-normalised transmission)."""
    if "angle" not in meta:
        raise ValueError(
            "sinogram_rows: meta has no angle; the source must give the rotation angle in degrees"
        )
    out: dict[str, Any] = {"angle": float(meta["angle"])}
    for row in rows:
        if not (isinstance(row, int) and 0 <= row < frame.shape[0]):
            raise ValueError(f"sinogram_rows: row {row!r} is not a row of a frame with {frame.shape[0]} rows")
        line = frame[row].astype(np.float32)
        if log:
            with np.errstate(divide="ignore", invalid="ignore"):
                line = np.where(line > 0, -np.log(line), np.float32(np.nan)).astype(np.float32)
        out[f"sino_{row}"] = line
    return out
