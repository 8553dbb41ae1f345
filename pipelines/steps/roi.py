"""ROI statistics: sum, mean, std, min, max (and pixel count) over rectangles and arcs.

An ROI is given by name in the pipeline definition::

    rois:
      direct: [100, 140, 200, 260]              # rectangle [row0, row1, col0, col1], ends excluded
      ring1: {centre: [1065, 962], radius: [170, 190]}                 # full ring
      arc1:  {centre: [1065, 962], radius: [300, 320], chi: [-30, 30]} # annular sector

Coordinates are pixel indices: pixel ``[i, j]`` sits at (row i, column j). A pixel
belongs to an arc when ``r_min <= r < r_max`` and its azimuth is in
``[chi_min, chi_max)``, with ``chi = atan2(row - row_c, col - col_c)`` in degrees:
0 points along increasing columns, 90 along increasing rows (as pyFAI's chi).
A sector may cross +-180 (``chi: [170, -170]``).

Pixels in ``mask`` (file, nonzero = bad) and NaN pixels are left out. Results are
scalars ``<roi>_sum``, ``<roi>_mean``, ``<roi>_std``, ``<roi>_min``, ``<roi>_max``
(and ``<roi>_npix``, the number of pixels used); an ROI with no valid pixel has
sum 0 and NaN for the others.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from pipelines.calibration_store import load_mask

STATS = ("sum", "mean", "std", "min", "max", "npix")
KERNEL_ORDER = ("npix", "sum", "mean", "std", "min", "max")  # what roi_stats_kernel returns


@numba.njit(parallel=True, cache=True)
def roi_stats_kernel(frame, r0, c0, member):
    """(npix, sum, mean, std, min, max) of ``frame[r0 + i, c0 + j]`` where ``member[i, j]``, NaN skipped."""
    h, w = member.shape
    counts = np.zeros(h, dtype=np.int64)
    sums = np.zeros(h, dtype=np.float64)
    lows = np.full(h, np.inf)
    highs = np.full(h, -np.inf)
    for i in numba.prange(h):
        n, total, low, high = 0, 0.0, np.inf, -np.inf  # local accumulators stay in registers
        for j in range(w):
            v = np.float64(frame[r0 + i, c0 + j])
            if member[i, j] and v == v:
                n += 1
                total += v
                low = min(low, v)
                high = max(high, v)
        counts[i], sums[i], lows[i], highs[i] = n, total, low, high
    n = counts.sum()
    total = sums.sum()
    if n == 0:
        return 0, 0.0, np.nan, np.nan, np.nan, np.nan
    mean = total / n
    squares = np.zeros(h, dtype=np.float64)
    for i in numba.prange(h):
        row = 0.0
        for j in range(w):
            v = np.float64(frame[r0 + i, c0 + j])
            if member[i, j] and v == v:
                row += (v - mean) * (v - mean)
        squares[i] = row
    return n, total, mean, np.sqrt(squares.sum() / n), lows.min(), highs.max()


def roi_stats_reference(
    frame: np.ndarray, selection: np.ndarray
) -> tuple[int, float, float, float, float, float]:
    """Plain numpy (npix, sum, mean, std, min, max) of the non-NaN pixels where ``selection`` is True."""
    values = frame[selection].astype(np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return 0, 0.0, np.nan, np.nan, np.nan, np.nan
    return values.size, values.sum(), values.sum() / values.size, values.std(), values.min(), values.max()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _pair(spec: dict, key: str, name: str) -> tuple[float, float] | None:
    value = spec.get(key)
    if value is None:
        return None
    if not (isinstance(value, list | tuple) and len(value) == 2 and all(_is_number(v) for v in value)):
        raise ValueError(f"roi {name!r}: {key} = {value!r}; expected a pair of numbers")
    return float(value[0]), float(value[1])


def parse_roi(name: str, spec: Any) -> tuple:
    """Check one ROI's form: ("rect", r0, r1, c0, c1) or ("arc", centre, radius, chi or None)."""
    if isinstance(spec, dict) and "rect" in spec:
        spec = spec["rect"]
    if isinstance(spec, list | tuple):
        if not (len(spec) == 4 and all(_is_int(v) for v in spec) and spec[0] < spec[1] and spec[2] < spec[3]):
            raise ValueError(
                f"roi {name!r}: rectangle {spec!r}; expected [row0, row1, col0, col1] as ints, row0 < row1, col0 < col1"
            )
        return ("rect", *spec)
    if not isinstance(spec, dict):
        raise ValueError(
            f"roi {name!r}: {spec!r} is neither [row0, row1, col0, col1] nor {{centre, radius, chi}}"
        )
    unknown = set(spec) - {"centre", "center", "radius", "chi"}
    if unknown:
        raise ValueError(f"roi {name!r}: unknown keys {sorted(unknown)}; an arc has centre, radius and chi")
    centre = _pair(spec, "centre", name) or _pair(spec, "center", name)
    radius = _pair(spec, "radius", name)
    if centre is None or radius is None or not 0 <= radius[0] < radius[1]:
        raise ValueError(
            f"roi {name!r}: an arc needs centre: [row, col] and radius: [r_min, r_max] with 0 <= r_min < r_max"
        )
    return ("arc", centre, radius, _pair(spec, "chi", name))


def roi_selection(name: str, spec: Any, shape: tuple[int, int]) -> tuple[int, int, np.ndarray]:
    """The pixels of one ROI: (row0, col0, member) with ``member`` a bool array over its bounding box."""
    rows, cols = shape
    parsed = parse_roi(name, spec)
    if parsed[0] == "rect":
        r0, r1, c0, c1 = parsed[1:]
        if not (0 <= r0 and r1 <= rows and 0 <= c0 and c1 <= cols):
            raise ValueError(
                f"roi {name!r}: rectangle {list(parsed[1:])} does not fit a frame of shape {shape}"
            )
        return r0, c0, np.ones((r1 - r0, c1 - c0), dtype=bool)
    (rc, cc), radius, chi = parsed[1:]
    r0, r1 = max(0, int(np.floor(rc - radius[1]))), min(rows, int(np.ceil(rc + radius[1])) + 1)
    c0, c1 = max(0, int(np.floor(cc - radius[1]))), min(cols, int(np.ceil(cc + radius[1])) + 1)
    if r0 >= r1 or c0 >= c1:
        raise ValueError(
            f"roi {name!r}: arc around {[rc, cc]} with radius {radius[1]} lies outside the frame"
        )
    dr = np.arange(r0, r1, dtype=np.float64)[:, None] - rc
    dc = np.arange(c0, c1, dtype=np.float64)[None, :] - cc
    r = np.hypot(dr, dc)
    member = (r >= radius[0]) & (r < radius[1])
    if chi is not None:
        span = chi[1] - chi[0]
        if span <= 0:
            span += 360.0
        if span < 360.0:
            angle = np.degrees(np.arctan2(dr, dc))
            member &= np.mod(angle - chi[0], 360.0) < span
    return r0, c0, member


class RoiStatistics:
    """Statistics of named rectangles and arcs (see the module docstring for the forms).

    Parameters:
        rois: name -> rectangle [row0, row1, col0, col1] or arc {centre, radius, chi}.
        stats: which of sum, mean, std, min, max, npix to emit (default all but npix).
        mask: bad-pixel file or list of files (nonzero = bad), left out of every ROI.
    """

    def __init__(self, *, rois: dict, stats: list | None = None, mask: str | list | None = None):
        if not rois:
            raise ValueError("roi: rois is empty; give at least one name: [row0, row1, col0, col1]")
        self.stats = list(stats) if stats is not None else list(STATS[:5])
        wrong = [s for s in self.stats if s not in STATS]
        if wrong:
            raise ValueError(f"roi: stats {wrong} unknown; expected some of {', '.join(STATS)}")
        self.rois = dict(rois)
        for name, spec in self.rois.items():  # report a malformed ROI when the step is loaded
            parse_roi(name, spec)
        self.mask = load_mask(mask) if mask is not None else None
        self._shape: tuple[int, int] | None = None
        self._tables: dict[str, tuple[int, int, np.ndarray]] = {}
        if self.mask is not None:  # check the specs now rather than at the first frame
            self.tables(self.mask.shape)

    def tables(self, shape: tuple[int, int]) -> dict[str, tuple[int, int, np.ndarray]]:
        """Each ROI's (row0, col0, member) for frames of ``shape``, built once per shape."""
        if shape != self._shape:
            if self.mask is not None and self.mask.shape != shape:
                raise ValueError(f"roi: mask has shape {self.mask.shape}, the frame has {shape}")
            tables = {}
            for name, spec in self.rois.items():
                r0, c0, member = roi_selection(name, spec, shape)
                if self.mask is not None:
                    h, w = member.shape
                    member = member & ~self.mask[r0 : r0 + h, c0 : c0 + w]
                tables[name] = (r0, c0, np.ascontiguousarray(member))
            self._tables, self._shape = tables, shape
        return self._tables

    def __call__(self, frame: np.ndarray, meta: dict) -> dict[str, Any]:
        if frame.ndim != 2:
            raise ValueError(f"roi: expected a 2D frame, got shape {frame.shape}")
        out: dict[str, Any] = {}
        for name, (r0, c0, member) in self.tables(frame.shape).items():
            values = dict(zip(KERNEL_ORDER, roi_stats_kernel(frame, r0, c0, member), strict=True))
            for stat in self.stats:
                out[f"{name}_{stat}"] = int(values[stat]) if stat == "npix" else float(values[stat])
        return out
