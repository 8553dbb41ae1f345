"""Hit finding: Bragg peaks as connected bright pixels (in the manner of peakfinder8).

1. Background and noise: the frame is split into radial bins around ``centre``
   (``bin_width`` pixels wide; ``background: global`` uses one bin). In each bin the
   mean and standard deviation are computed, then again ``iterations`` times
   leaving out pixels above ``mean + min_snr * std`` (the peaks themselves).
2. A pixel is a candidate when ``value - mean > max(min_snr * std, min_adc)``.
3. Candidates touching each other (8-connected: sides and corners) form a peak.
   Peaks of ``min_pix`` to ``max_pix`` pixels are kept; each gives its centroid
   (row, col) weighted by ``value - mean``, its integrated intensity
   ``sum(value - mean)`` and its pixel count.

A frame is a hit when it has at least ``min_peaks`` peaks. Every frame gives the
scalars ``n_peaks`` and ``hit`` (1/0); hits also go to a derived stream
(``hits`` by default): ``hits/peaks`` (N x 4 float32: row, col, intensity, npix)
and, with ``keep_frame``, ``hits/frame``. NaN and masked pixels are ignored.
"""

from __future__ import annotations

from typing import Any, Literal

import numba
import numpy as np

from pipelines.calibration_store import load_mask


@numba.njit(parallel=True, cache=True)
def background_kernel(frame, bins, n_bins, min_snr, iterations):
    """Per-bin (mean, std) of ``frame`` with iterative clipping of pixels above mean + min_snr * std."""
    rows, cols = frame.shape
    n_chunks = min(rows, 64)
    mean = np.zeros(n_bins)
    std = np.full(n_bins, np.inf)
    for _ in range(iterations + 1):
        count = np.zeros((n_chunks, n_bins))
        total = np.zeros((n_chunks, n_bins))
        squares = np.zeros((n_chunks, n_bins))
        for k in numba.prange(n_chunks):
            for i in range(k * rows // n_chunks, (k + 1) * rows // n_chunks):
                for j in range(cols):
                    b = bins[i, j]
                    v = np.float64(frame[i, j])
                    if b >= 0 and v == v and not (v > mean[b] + min_snr * std[b]):
                        count[k, b] += 1.0
                        total[k, b] += v
                        squares[k, b] += v * v
        n = count.sum(axis=0)
        for b in range(n_bins):
            if n[b] > 0:
                mean[b] = total[:, b].sum() / n[b]
                std[b] = np.sqrt(max(squares[:, b].sum() / n[b] - mean[b] * mean[b], 0.0))
            else:
                mean[b] = 0.0
                std[b] = np.inf  # an empty bin never yields a candidate
    return mean, std


@numba.njit(parallel=True, cache=True)
def candidate_kernel(frame, bins, mean, std, min_snr, min_adc, candidates):
    """Mark pixels with value - mean > max(min_snr * std, min_adc); returns candidates per row."""
    rows, cols = frame.shape
    per_row = np.zeros(rows, dtype=np.int64)
    for i in numba.prange(rows):
        count = 0
        for j in range(cols):
            b = bins[i, j]
            v = np.float64(frame[i, j])
            above = b >= 0 and v == v and v - mean[b] > max(min_snr * std[b], min_adc)
            candidates[i, j] = above
            count += above
        per_row[i] = count
    return per_row


@numba.njit(cache=True)
def label_kernel(frame, bins, mean, candidates, per_row, min_pix, max_pix, max_peaks):
    """Group 8-connected candidates (cleared as visited) into peaks, in raster order of their
    first pixel. Returns (number of peaks kept, peaks[max_peaks, 4]: row, col, intensity, npix)."""
    rows, cols = frame.shape
    peaks = np.zeros((max_peaks, 4), dtype=np.float32)
    stack = np.empty((1024, 2), dtype=np.int64)
    n_peaks = 0
    for i0 in range(rows):
        if per_row[i0] == 0:
            continue
        for j0 in range(cols):
            if not candidates[i0, j0]:
                continue
            candidates[i0, j0] = False
            stack[0, 0], stack[0, 1] = i0, j0
            top, npix = 1, 0
            weight = weighted_row = weighted_col = 0.0
            while top > 0:
                top -= 1
                i, j = stack[top, 0], stack[top, 1]
                w = np.float64(frame[i, j]) - mean[bins[i, j]]
                npix += 1
                weight += w
                weighted_row += w * i
                weighted_col += w * j
                for di in range(-1, 2):
                    for dj in range(-1, 2):
                        ni, nj = i + di, j + dj
                        if 0 <= ni < rows and 0 <= nj < cols and candidates[ni, nj]:
                            candidates[ni, nj] = False
                            if top == stack.shape[0]:
                                bigger = np.empty((2 * top, 2), dtype=np.int64)
                                bigger[:top] = stack
                                stack = bigger
                            stack[top, 0], stack[top, 1] = ni, nj
                            top += 1
            if min_pix <= npix <= max_pix:
                if n_peaks < max_peaks:
                    peaks[n_peaks, 0] = weighted_row / weight
                    peaks[n_peaks, 1] = weighted_col / weight
                    peaks[n_peaks, 2] = weight
                    peaks[n_peaks, 3] = npix
                n_peaks += 1
    return n_peaks, peaks


def radial_bins(
    shape: tuple[int, int], centre: tuple[float, float], bin_width: float, mask: np.ndarray | None
):
    """Radial bin of each pixel (int32; -1 where masked) and the number of bins."""
    rows, cols = shape
    r = np.hypot(np.arange(rows)[:, None] - centre[0], np.arange(cols)[None, :] - centre[1])
    bins = (r / bin_width).astype(np.int32)
    if mask is not None:
        bins[mask] = -1
    return bins, int(bins.max()) + 1


def find_peaks_reference(
    frame: np.ndarray,
    bins: np.ndarray,
    n_bins: int,
    *,
    min_snr: float,
    min_adc: float,
    min_pix: int,
    max_pix: int,
    iterations: int,
) -> np.ndarray:
    """Plain numpy/scipy peak finding with the same rules: peaks (N x 4: row, col, intensity, npix)."""
    from scipy import ndimage

    values = frame.astype(np.float64)
    valid = (bins >= 0) & ~np.isnan(values)
    b, v = bins[valid], values[valid]
    mean, std = np.zeros(n_bins), np.full(n_bins, np.inf)
    for _ in range(iterations + 1):
        keep = ~(v > mean[b] + min_snr * std[b])
        n = np.bincount(b[keep], minlength=n_bins).astype(np.float64)
        total = np.bincount(b[keep], v[keep], minlength=n_bins)
        squares = np.bincount(b[keep], v[keep] ** 2, minlength=n_bins)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n > 0, total / n, 0.0)
            std = np.where(n > 0, np.sqrt(np.maximum(squares / n - mean**2, 0.0)), np.inf)
    excess = np.zeros_like(values)
    excess[valid] = v - mean[b]
    limit = np.full_like(values, np.inf)
    limit[valid] = np.maximum(min_snr * std[b], min_adc)
    labels, n_labels = ndimage.label(excess > limit, structure=np.ones((3, 3)))
    index = np.arange(1, n_labels + 1)
    npix = ndimage.sum_labels(np.ones_like(values), labels, index)
    weight = ndimage.sum_labels(excess, labels, index)
    rows, cols = np.indices(values.shape)
    row = ndimage.sum_labels(excess * rows, labels, index) / weight
    col = ndimage.sum_labels(excess * cols, labels, index) / weight
    keep = (npix >= min_pix) & (npix <= max_pix)
    return np.stack([row[keep], col[keep], weight[keep], npix[keep]], axis=1).astype(np.float32)


class HitFinder:
    """Find peaks in each frame; count them and send hits to a derived stream.

    Parameters:
        min_snr: a pixel is bright when above the background by this many noise sigmas.
        min_adc: ... and by at least this many ADU (or calibrated units).
        min_pix, max_pix: number of connected pixels a peak may have.
        min_peaks: peaks that make a frame a hit.
        max_peaks: most peaks listed per frame (``n_peaks`` still counts all).
        background: ``radial`` bins around ``centre`` or one ``global`` bin.
        centre: [row, col] of the beam (default: the frame's centre).
        bin_width: width of a radial bin in pixels.
        iterations: clipping passes of the background estimate.
        mask: bad-pixel file or list of files (nonzero = bad).
        stream: name of the derived stream for hits.
        keep_frame: also send the frame of each hit (``<stream>/frame``).
    """

    def __init__(
        self,
        *,
        min_snr: float = 6.0,
        min_adc: float = 0.0,
        min_pix: int = 2,
        max_pix: int = 200,
        min_peaks: int = 10,
        max_peaks: int = 2048,
        background: Literal["radial", "global"] = "radial",
        centre: list | None = None,
        bin_width: float = 2.0,
        iterations: int = 5,
        mask: str | list | None = None,
        stream: str = "hits",
        keep_frame: bool = True,
    ):
        checks = {
            "min_snr": (min_snr, min_snr > 0, "a number > 0"),
            "min_pix": (min_pix, min_pix >= 1, "an int >= 1"),
            "max_pix": (max_pix, max_pix >= min_pix, "an int >= min_pix"),
            "min_peaks": (min_peaks, min_peaks >= 1, "an int >= 1"),
            "max_peaks": (max_peaks, max_peaks >= 1, "an int >= 1"),
            "background": (background, background in ("radial", "global"), "radial or global"),
            "bin_width": (bin_width, bin_width > 0, "pixels > 0"),
            "iterations": (iterations, iterations >= 0, "an int >= 0"),
            "stream": (stream, bool(stream) and "/" not in stream, "a stream name without '/'"),
            "centre": (
                centre,
                centre is None or (isinstance(centre, list | tuple) and len(centre) == 2),
                "[row, col]",
            ),
        }
        for name, (value, ok, expected) in checks.items():
            if not ok:
                raise ValueError(f"hit_finder: {name} = {value!r}; expected {expected}")
        self.min_snr, self.min_adc = float(min_snr), float(min_adc)
        self.min_pix, self.max_pix, self.min_peaks, self.max_peaks = min_pix, max_pix, min_peaks, max_peaks
        self.background, self.centre, self.bin_width = background, centre, float(bin_width)
        self.iterations, self.stream, self.keep_frame = iterations, stream, keep_frame
        self.mask = load_mask(mask) if mask is not None else None
        self._shape: tuple[int, int] | None = None
        self._bins: tuple[np.ndarray, int] = (np.empty((0, 0), np.int32), 0)

    def bins(self, shape: tuple[int, int]) -> tuple[np.ndarray, int]:
        """Background bin of each pixel (-1 = masked) and the number of bins, built once per shape."""
        if shape != self._shape:
            if self.mask is not None and self.mask.shape != shape:
                raise ValueError(f"hit_finder: mask has shape {self.mask.shape}, the frame has {shape}")
            if self.background == "global":
                bins = np.zeros(shape, dtype=np.int32)
                if self.mask is not None:
                    bins[self.mask] = -1
                self._bins = (bins, 1)
            else:
                centre = self.centre or ((shape[0] - 1) / 2, (shape[1] - 1) / 2)
                self._bins = radial_bins(
                    shape, (float(centre[0]), float(centre[1])), self.bin_width, self.mask
                )
            self._shape = shape
        return self._bins

    def find_peaks(self, frame: np.ndarray) -> tuple[int, np.ndarray]:
        """(number of peaks, peaks N x 4 float32: row, col, intensity, npix) of one frame."""
        if frame.ndim != 2:
            raise ValueError(f"hit_finder: expected a 2D frame, got shape {frame.shape}")
        bins, n_bins = self.bins(frame.shape)
        mean, std = background_kernel(frame, bins, n_bins, self.min_snr, self.iterations)
        candidates = np.empty(frame.shape, dtype=np.bool_)
        per_row = candidate_kernel(frame, bins, mean, std, self.min_snr, self.min_adc, candidates)
        n, peaks = label_kernel(
            frame, bins, mean, candidates, per_row, self.min_pix, self.max_pix, self.max_peaks
        )
        return int(n), peaks[: min(n, self.max_peaks)]

    def __call__(self, frame: np.ndarray, meta: dict) -> dict[str, Any]:
        n, peaks = self.find_peaks(frame)
        hit = n >= self.min_peaks
        out: dict[str, Any] = {"n_peaks": n, "hit": int(hit)}
        if hit:
            out[f"{self.stream}/peaks"] = peaks
            if self.keep_frame:
                out[f"{self.stream}/frame"] = frame
        return out
