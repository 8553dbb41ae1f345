"""Detector calibration: dark/pedestal, gain or flat field, bad pixels, common mode.

The corrected frame is ``(raw - dark - common_mode) / (gain * flat / mean(flat))``
as float32, and it replaces the frame for the steps after this one.

Masked pixels (mask files, the detector's own ``meta["pixel_mask"]``, and pixels
whose gain or flat is zero, negative or not finite) become NaN by default
(``masked: zero`` writes 0 instead). NaN is the package's one way of saying
"no data here": ROI statistics, binning, photon counting, hit finding and centre
of mass all skip NaN pixels, so no separate mask travels with the frame.

Constants come from parameters (a file or a number) or from a calibration
folder (see :mod:`pipelines.calibration_store`) picked by ``meta["scan"]``;
a parameter given explicitly wins over the folder for its kind.
"""

from __future__ import annotations

from typing import Any, Literal

import numba
import numpy as np

from pipelines.calibration_store import CalibrationStore, load_array, load_mask


@numba.njit(parallel=True, cache=True)
def correct_kernel(raw, dark, scale, bad, fill, out):
    """out = (raw - dark) * scale, ``fill`` where ``bad`` or NaN."""
    rows, cols = raw.shape
    for i in numba.prange(rows):
        for j in range(cols):
            v = (np.float32(raw[i, j]) - dark[i, j]) * scale[i, j]
            out[i, j] = fill if bad[i, j] or v != v else v


@numba.njit(parallel=True, cache=True)
def common_mode_kernel(frame, segments, max_value, scale, fill):
    """Subtract from each segment [r0, r1, c0, c1] the median of its finite pixels below
    ``max_value``, then multiply by ``scale`` and put ``fill`` where the frame is NaN (in place)."""
    for s in numba.prange(segments.shape[0]):
        r0, r1, c0, c1 = segments[s, 0], segments[s, 1], segments[s, 2], segments[s, 3]
        values = np.empty((r1 - r0) * (c1 - c0), dtype=np.float32)
        n = 0
        for i in range(r0, r1):
            for j in range(c0, c1):
                v = frame[i, j]
                if v == v and v < max_value:
                    values[n] = v
                    n += 1
        offset = np.float32(np.median(values[:n])) if n > 0 else np.float32(0.0)
        for i in range(r0, r1):
            for j in range(c0, c1):
                v = frame[i, j]
                frame[i, j] = (v - offset) * scale[i, j] if v == v else fill


def correct_reference(
    raw: np.ndarray,
    dark: np.ndarray,
    scale: np.ndarray,
    bad: np.ndarray,
    fill: float,
    segments: np.ndarray | None = None,
    max_value: float = np.inf,
) -> np.ndarray:
    """Plain numpy version of the correction, for tests and benchmarks."""
    out = raw.astype(np.float32) - dark
    out[bad] = np.nan
    for r0, r1, c0, c1 in segments if segments is not None else []:
        block = out[r0:r1, c0:c1]
        use = block[np.isfinite(block) & (block < max_value)]
        if use.size:
            block -= np.median(use)
    out *= scale
    out[bad | np.isnan(out)] = fill
    return out.astype(np.float32)


def common_mode_segments(shape: tuple[int, int], panel_shape: tuple[int, int], per_row: bool) -> np.ndarray:
    """The blocks [r0, r1, c0, c1] that share one common-mode offset: panels tiling the
    frame (the last ones may be partial), or each row of each panel."""
    rows, cols = shape
    pr, pc = panel_shape
    out = []
    for r0 in range(0, rows, pr):
        for c0 in range(0, cols, pc):
            r1, c1 = min(r0 + pr, rows), min(c0 + pc, cols)
            if per_row:
                out.extend([r, r + 1, c0, c1] for r in range(r0, r1))
            else:
                out.append([r0, r1, c0, c1])
    return np.asarray(out, dtype=np.int64).reshape(-1, 4)


def _constant(value: Any, name: str) -> np.ndarray | float | None:
    if value is None or isinstance(value, int | float):
        return value
    if isinstance(value, str):
        return np.asarray(load_array(value))
    raise ValueError(f"calibration: {name} = {value!r} must be a file name or a number")


class Calibration:
    """Correct each frame with dark, gain/flat, bad-pixel mask and common mode.

    Parameters:
        dark: pedestal in ADU: a number or a file (a stack of dark frames is averaged).
        gain: ADU per output unit (e.g. per photon or per keV): a number or a file.
        flat: flat-field image; divided by its mean over good pixels, so only the
            relative response matters.
        mask: bad-pixel file or list of files; nonzero = bad.
        folder: calibration folder with ``index.yaml``; constants chosen by ``meta["scan"]``.
        detector_mask: also mask the pixels flagged in ``meta["pixel_mask"]`` (nonzero = bad).
        common_mode: ``none``; ``panel``: subtract each panel's median; ``row``: each
            panel row's median (after dark subtraction, in ADU).
        panel_shape: [rows, cols] of a panel; the frame is tiled with panels from the
            top-left corner (default: the whole frame is one panel).
        common_mode_max: only pixels below this many ADU (after dark) enter the median,
            so photons do not bias it.
        masked: what masked pixels become: ``nan`` or ``zero``.
    """

    def __init__(
        self,
        *,
        dark: str | float | None = None,
        gain: str | float | None = None,
        flat: str | None = None,
        mask: str | list | None = None,
        folder: str | None = None,
        detector_mask: bool = True,
        common_mode: Literal["none", "panel", "row"] = "none",
        panel_shape: list | None = None,
        common_mode_max: float | None = None,
        masked: Literal["nan", "zero"] = "nan",
    ):
        if common_mode not in ("none", "panel", "row"):
            raise ValueError(f"calibration: common_mode = {common_mode!r}; expected none, panel or row")
        if masked not in ("nan", "zero"):
            raise ValueError(f"calibration: masked = {masked!r}; expected nan or zero")
        if panel_shape is not None and not (
            isinstance(panel_shape, list | tuple)
            and len(panel_shape) == 2
            and all(isinstance(n, int) and n > 0 for n in panel_shape)
        ):
            raise ValueError(
                f"calibration: panel_shape = {panel_shape!r}; expected [rows, cols] of positive ints"
            )
        if isinstance(gain, int | float) and gain <= 0:
            raise ValueError(f"calibration: gain = {gain!r}; expected a positive number (ADU per unit)")
        self.explicit = {
            "dark": _constant(dark, "dark"),
            "gain": _constant(gain, "gain"),
            "flat": _constant(flat, "flat"),
            "mask": load_mask(mask) if mask is not None else None,
        }
        self.store = CalibrationStore(folder) if folder is not None else None
        self.detector_mask = detector_mask
        self.common_mode = common_mode
        self.panel_shape = tuple(panel_shape) if panel_shape else None
        self.common_mode_max = np.inf if common_mode_max is None else float(common_mode_max)
        self.fill = np.float32(np.nan if masked == "nan" else 0.0)
        self._key: Any = None
        self._tables: tuple = ()
        self._pixel_mask: np.ndarray | None = None
        self._pixel_mask_source: Any = None

    def constants(self, meta: dict) -> tuple[dict[str, Any], tuple]:
        """The constants for this frame's scan and a key that changes when they do."""
        found = dict(self.explicit)
        key: list = []
        if self.store is not None:
            for kind, entry in self.store.constants(meta.get("scan")).items():
                if found[kind] is None:
                    found[kind] = self.store.load(entry)
                    key.append(entry)
        return found, tuple(key)

    def _detector_mask(self, meta: dict) -> np.ndarray | None:
        """``meta["pixel_mask"]`` as bool, the same object as long as its content does not change."""
        given = meta.get("pixel_mask") if self.detector_mask else None
        if given is None:
            self._pixel_mask_source = self._pixel_mask = None
        elif given is not self._pixel_mask_source:
            bad = np.asarray(given) != 0
            if self._pixel_mask is None or not np.array_equal(bad, self._pixel_mask):
                self._pixel_mask = bad
            self._pixel_mask_source = given
        return self._pixel_mask

    def tables(self, shape: tuple[int, int], meta: dict) -> tuple:
        """(dark, scale, bad, segments, ones) for this frame, rebuilt only when an input changes
        (``segments`` and ``ones`` only serve common-mode correction)."""
        found, key = self.constants(meta)
        pixel_mask = self._detector_mask(meta)
        key = (shape, key, id(pixel_mask))
        if key == self._key:
            return self._tables

        def image(kind: str, value: Any, default: float) -> np.ndarray:
            if value is None:
                value = default
            array = np.asarray(value, dtype=np.float64)
            if kind == "dark" and array.ndim == 3:
                array = array.mean(axis=0)
            if array.ndim == 0:
                return np.full(shape, array, dtype=np.float64)
            if array.shape != shape:
                raise ValueError(f"calibration: {kind} has shape {array.shape}, the frame has {shape}")
            return array

        bad = np.zeros(shape, dtype=bool)
        for name, extra in (("mask", found["mask"]), ("pixel_mask", pixel_mask)):
            if extra is not None:
                if extra.shape != shape:
                    raise ValueError(f"calibration: {name} has shape {extra.shape}, the frame has {shape}")
                bad |= extra
        dark = image("dark", found["dark"], 0.0)
        gain = image("gain", found["gain"], 1.0)
        flat = image("flat", found["flat"], 1.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            bad |= ~np.isfinite(dark) | ~np.isfinite(gain) | ~(gain > 0) | ~np.isfinite(flat) | ~(flat > 0)
            if found["flat"] is not None and (~bad).any():
                flat = flat / flat[~bad].mean()
            scale = np.where(bad, 0.0, 1.0 / (gain * flat))
        segments = None
        if self.common_mode != "none":
            segments = common_mode_segments(shape, self.panel_shape or shape, self.common_mode == "row")
        self._tables = (
            np.where(bad, 0.0, dark).astype(np.float32),
            scale.astype(np.float32),
            bad,
            segments,
            np.ones(shape, dtype=np.float32) if segments is not None else None,
        )
        self._key = key
        return self._tables

    def __call__(self, frame: np.ndarray, meta: dict) -> dict[str, Any]:
        if frame.ndim != 2:
            raise ValueError(f"calibration: expected a 2D frame, got shape {frame.shape}")
        dark, scale, bad, segments, ones = self.tables(frame.shape, meta)
        out = np.empty(frame.shape, dtype=np.float32)
        if segments is None:
            correct_kernel(frame, dark, scale, bad, self.fill, out)
        else:  # dark first (bad pixels NaN so the medians skip them), then common mode and gain
            correct_kernel(frame, dark, ones, bad, np.float32(np.nan), out)
            common_mode_kernel(out, segments, np.float32(self.common_mode_max), scale, self.fill)
        return {"frame": out}
