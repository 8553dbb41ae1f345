"""X-ray fluorescence: per-point spectrum, element windows, running sum per scan.

The frame is one MCA spectrum (n_channels,) or one per detector element
(n_detectors, n_channels). Channel ``c`` has energy ``energy_offset + energy_gain * c``;
with the defaults (0, 1) energies are channel numbers. Each element is a window
``[low, high]`` (inclusive) in those units, e.g. ``Fe: [6.25, 6.55]`` in keV, and
gives a scalar with the counts of the selected detector elements in the window:
mapped over the scan (``maps``), these are the element maps.

``RunningSum`` keeps the sum spectrum of each scan. A worker sees only the points
dispatched to it, so the step's ``sum_spectrum`` is that worker's share; the
scan's full sum is a ``RunningSum`` fed with every point's ``spectrum`` downstream.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import numba
import numpy as np


@numba.njit(cache=True)
def xrf_kernel(spectra, detectors, starts, stops):
    """Sum of the rows ``detectors`` of ``spectra`` (float64) and its sums over channel windows."""
    n_channels = spectra.shape[1]
    total = np.zeros(n_channels)
    for d in detectors:
        for c in range(n_channels):
            total[c] += spectra[d, c]
    windows = np.zeros(starts.shape[0])
    for w in range(starts.shape[0]):
        for c in range(starts[w], stops[w]):
            windows[w] += total[c]
    return total, windows


def xrf_reference(
    spectra: np.ndarray, detectors: np.ndarray, windows: list[tuple[int, int]]
) -> tuple[np.ndarray, np.ndarray]:
    """Plain numpy summed spectrum and window sums."""
    total = spectra[detectors].sum(axis=0, dtype=np.float64)
    return total, np.array([total[a:b].sum() for a, b in windows], dtype=np.float64)


def channel_window(low: float, high: float, n_channels: int, offset: float, gain: float) -> tuple[int, int]:
    """Channels [start, stop) whose energy ``offset + gain * c`` lies in [low, high]."""
    energy = offset + gain * np.arange(n_channels, dtype=np.float64)
    slack = 1e-6 * gain  # an edge written as a channel's energy (0.7 keV = 70 x 0.01) includes that channel
    inside = np.nonzero((energy >= low - slack) & (energy <= high + slack))[0]
    return (int(inside[0]), int(inside[-1]) + 1) if inside.size else (0, 0)


class RunningSum:
    """Sum of same-shaped arrays (spectra) per scan, for the last ``max_scans`` scans touched."""

    def __init__(self, max_scans: int = 4):
        if max_scans < 1:
            raise ValueError(f"RunningSum: max_scans = {max_scans!r}; expected >= 1")
        self.max_scans = max_scans
        self._sums: OrderedDict[Hashable, tuple[np.ndarray, int]] = OrderedDict()

    def add(self, scan: Hashable, array: np.ndarray) -> np.ndarray:
        """Add ``array`` to the sum of ``scan`` and return the sum (kept: copy it to keep it unchanged)."""
        array = np.asarray(array)
        if scan in self._sums:
            total, count = self._sums.pop(scan)
            if total.shape != array.shape:
                raise ValueError(f"RunningSum: scan {scan!r} sums shape {total.shape}, got {array.shape}")
            total += array
        else:
            total, count = array.astype(np.float64, copy=True), 0
        self._sums[scan] = (total, count + 1)
        while len(self._sums) > self.max_scans:
            self._sums.popitem(last=False)
        return total

    def total(self, scan: Hashable) -> np.ndarray | None:
        entry = self._sums.get(scan)
        return None if entry is None else entry[0]

    def count(self, scan: Hashable) -> int:
        entry = self._sums.get(scan)
        return 0 if entry is None else entry[1]

    def scans(self) -> list[Hashable]:
        return list(self._sums)

    def drop(self, scan: Hashable) -> None:
        self._sums.pop(scan, None)


class XrfSpectrum:
    """Per-point XRF spectrum and element-window counts.

    Parameters:
        elements: name -> [low, high] energy window (inclusive), e.g. {Fe: [6.25, 6.55]}.
        energy_offset, energy_gain: energy of channel c is offset + gain * c.
        detectors: detector elements to sum (default: all); leave out dead ones.
        spectrum: name of the per-point summed spectrum result ("" to not emit it).
        running_sum: also emit ``sum_spectrum``, this worker's sum over the scan so far.
    """

    def __init__(
        self,
        *,
        elements: dict | None = None,
        energy_offset: float = 0.0,
        energy_gain: float = 1.0,
        detectors: list | None = None,
        spectrum: str = "spectrum",
        running_sum: bool = False,
    ):
        self.elements: dict[str, tuple[float, float]] = {}
        for name, window in (elements or {}).items():
            if not (
                isinstance(window, list | tuple)
                and len(window) == 2
                and all(isinstance(v, int | float) for v in window)
                and window[0] <= window[1]
            ):
                raise ValueError(
                    f"xrf: element {name!r} window {window!r}; expected [low, high] with low <= high"
                )
            self.elements[str(name)] = (float(window[0]), float(window[1]))
        if energy_gain <= 0:
            raise ValueError(f"xrf: energy_gain = {energy_gain!r}; expected energy per channel > 0")
        if detectors is not None and not all(isinstance(d, int) and d >= 0 for d in detectors):
            raise ValueError(f"xrf: detectors = {detectors!r}; expected a list of detector indices")
        self.offset, self.gain = float(energy_offset), float(energy_gain)
        self.detectors = detectors
        self.spectrum = spectrum
        self.running = RunningSum() if running_sum else None
        self._tables: tuple[tuple[int, int], np.ndarray, np.ndarray, np.ndarray] | None = None

    def tables(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Detector indices and window starts/stops for spectra of ``shape``, built once per shape."""
        if self._tables is None or self._tables[0] != shape:
            n_detectors, n_channels = shape
            detectors = np.arange(n_detectors) if self.detectors is None else np.asarray(self.detectors)
            if detectors.size and detectors.max() >= n_detectors:
                raise ValueError(
                    f"xrf: detectors {self.detectors} but the frame has {n_detectors} detector(s)"
                )
            windows = [
                channel_window(lo, hi, n_channels, self.offset, self.gain)
                for lo, hi in self.elements.values()
            ]
            starts = np.array([w[0] for w in windows], dtype=np.int64)
            stops = np.array([w[1] for w in windows], dtype=np.int64)
            self._tables = (shape, detectors.astype(np.int64), starts, stops)
        return self._tables[1:]

    def __call__(self, frame: np.ndarray, meta: dict) -> dict[str, Any]:
        spectra = frame[None, :] if frame.ndim == 1 else frame
        if spectra.ndim != 2:
            raise ValueError(f"xrf: expected a spectrum or (detectors, channels), got shape {frame.shape}")
        detectors, starts, stops = self.tables(spectra.shape)
        total, windows = xrf_kernel(spectra, detectors, starts, stops)
        out: dict[str, Any] = {name: float(v) for name, v in zip(self.elements, windows, strict=True)}
        if self.spectrum:
            out[self.spectrum] = total
        if self.running is not None:
            out["sum_spectrum"] = self.running.add(meta.get("scan"), total).copy()
        return out
