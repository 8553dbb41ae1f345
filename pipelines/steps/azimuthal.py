"""Azimuthal integration (``azimuthal``) and caking (``azimuthal2d``) with pyFAI's geometry.

Both steps read a PONI file and build, once, a sparse matrix (CSR) that maps pixels
to bins: for every bin the indices of the pixels that fall in it and their weights.
Without pixel splitting each pixel goes whole to the bin of its centre; with
``bbox`` splitting a pixel's radial (and, for caking, azimuthal) extent is spread
over the bins it covers in proportion to the overlap, exactly as pyFAI's CSR
"bbox" engine does. A bin's value is pyFAI's weighted mean::

    I[bin] = sum_j w_j * frame_j / sum_j w_j * solid_angle_j * polarisation_j

The denominator does not depend on the frame, so it is summed once when the step is
configured; each frame costs one pass over the matrix (a numba kernel, parallel over
blocks of bins) that reads the frame in its own dtype, without converting it. The
rows are compressed by blocks of consecutive bins (two blocks per thread) whose
entries are kept in pixel order, so each block walks the frame forwards once rather
than once per bin; without splitting, a block's pixels are stored as runs of
consecutive pixels and read as contiguous slices (``PixelBinMatrix.to_csr`` gives
the plain per-bin CSR). Integer frames without splitting are summed exactly in
int64. Pixels that are NaN, equal to ``dummy``, or flagged in ``meta["pixel_mask"]``
(nonzero = bad, per frame) are left out of both sums of their bin; pixels of the
``mask`` file are left out of the matrix. Bins with no valid pixel hold ``dummy``
(0 when no dummy is given), as in pyFAI.

Bins are placed as pyFAI places them: ``npt`` equal bins from the smallest to just
above the largest pixel position (pixel centres, or bounding-box edges when
splitting; masked pixels excluded; 2theta and q clipped at 0), or over
``radial_range``; results are the bin centres. Azimuths are in degrees in
[-180, 180); an ``azimuth_range`` that crosses 180 deg (e.g. [90, 270]) is unwrapped
and covers the whole sector.

``integrate_reference`` is the same computation with ``np.bincount`` and no sparse
matrix, the yardstick the kernels are tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np

from pipelines.geometry import (
    CHI_DEG_SCALE,
    PoniError,
    PoniGeometry,
    chi_array,
    chi_delta_array,
    deg_to_chi,
    polarization_array,
    radial_array,
    radial_delta_array,
    radial_unit,
    read_poni,
    solid_angle_array,
    upper_bound,
)

SPLITTINGS = ("none", "bbox")


# ---------------------------------------------------------------- bins and pixels


@dataclass(frozen=True)
class BinAxis:
    """``n`` equal bins of width ``delta`` from ``lower`` (internal unit: radians or nm^-1).

    ``upper_in`` is the largest position accepted (pyFAI's ``pos_maxin``), used to
    discard pixels beyond an azimuth range.
    """

    lower: float
    upper: float
    upper_in: float
    n: int

    @property
    def delta(self) -> float:
        return (self.upper - self.lower) / self.n

    def centers(self) -> np.ndarray:
        """Bin centres as pyFAI computes them (``linspace`` from the first to the last centre)."""
        d = self.delta
        return np.linspace(self.lower + 0.5 * d, self.upper - 0.5 * d, self.n)


def make_axis(lower: float, upper_in: float, n: int) -> BinAxis:
    """``n`` bins from ``lower`` to just above ``upper_in``, as pyFAI places them."""
    return BinAxis(float(lower), upper_bound(float(upper_in)), float(upper_in), int(n))


@dataclass
class PixelTable:
    """Per-pixel inputs of the integration, flattened: positions (internal units),
    bounding-box half-widths (None without splitting), normalisation and static validity."""

    radial: np.ndarray
    radial_delta: np.ndarray | None
    chi: np.ndarray | None
    chi_delta: np.ndarray | None
    norm: np.ndarray  # float32: solid angle x polarisation (1 when neither)
    keep: np.ndarray  # bool: not in the mask file and a usable normalisation


def build_pixel_table(
    geometry: PoniGeometry,
    shape: tuple[int, int],
    unit: str,
    split: bool,
    need_chi: bool,
    correct_solid_angle: bool,
    polarization_factor: float | None,
    mask: np.ndarray | None,
    chi_unwrap_from: float | None = None,
) -> PixelTable:
    """Everything about the pixels that does not depend on a frame."""
    radial = radial_array(geometry, unit, shape, scale=False)
    radial_delta = radial_delta_array(geometry, unit, shape, center=radial) if split else None
    chi = chi_delta = None
    if need_chi:
        chi = chi_array(geometry, shape)
        chi_delta = chi_delta_array(geometry, shape, center=chi) if split else None
        if chi_unwrap_from is not None:
            chi = np.where(chi < chi_unwrap_from, chi + 2.0 * math.pi, chi)
    norm = np.ones(shape, dtype=np.float32)
    if correct_solid_angle:
        norm *= solid_angle_array(geometry, shape)
    if polarization_factor is not None:
        norm *= polarization_array(geometry, polarization_factor, shape)
    keep = np.isfinite(norm) & (norm != 0) & np.isfinite(radial)
    if mask is not None:
        keep &= mask == 0

    def flat(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else np.ascontiguousarray(a).reshape(-1)

    return PixelTable(flat(radial), flat(radial_delta), flat(chi), flat(chi_delta), flat(norm), flat(keep))


def radial_bins(
    pixels: PixelTable, npt: int, radial_range: tuple[float, float] | None, scale: float
) -> BinAxis:
    """pyFAI's radial bins: over ``radial_range`` (given in the user's unit) or the unmasked pixels' extent."""
    if radial_range is not None:
        return make_axis(radial_range[0] / scale, radial_range[-1] / scale, npt)
    pos = pixels.radial[pixels.keep]
    if pos.size == 0:
        raise ValueError("every pixel is masked: there is nothing to integrate")
    if pixels.radial_delta is None:
        lo, hi = float(pos.min()), float(pos.max())
    else:
        d = pixels.radial_delta[pixels.keep]
        lo, hi = float((pos - d).min()), float((pos + d).max())
    return make_axis(max(0.0, lo), max(0.0, hi), npt)


#: pi rounded to float32: pyFAI clips the azimuthal extent of a cake with this value.
PI_FLOAT32 = float(np.float32(math.pi))


def azimuth_bins(pixels: PixelTable, npt: int, chi_range: tuple[float, float] | None) -> BinAxis:
    """pyFAI's azimuthal bins for caking: over ``chi_range`` (radians) or the pixels' extent clipped to [-pi, pi]."""
    if chi_range is not None:
        return make_axis(chi_range[0], chi_range[1], npt)
    pos = pixels.chi[pixels.keep]
    if pixels.chi_delta is None:
        lo, hi = float(pos.min()), float(pos.max())
    else:
        d = pixels.chi_delta[pixels.keep]
        lo, hi = float((pos - d).min()), float((pos + d).max())
    return make_axis(max(lo, -PI_FLOAT32), min(hi, PI_FLOAT32), npt)


# ---------------------------------------------------------------- numpy reference


def _spans(pos: np.ndarray, delta: np.ndarray | None, axis: BinAxis):
    """First/last bin (clipped) and fractional bin edges of each pixel; ``inside`` as pyFAI decides it."""
    d = 0.0 if delta is None else delta
    f_lo = ((pos - d) - axis.lower) / axis.delta
    f_hi = ((pos + d) - axis.lower) / axis.delta
    b_lo = np.trunc(f_lo)
    b_hi = np.trunc(f_hi)
    inside = (b_hi >= 0) & (b_lo < axis.n)
    b_lo = np.clip(b_lo, 0, axis.n - 1).astype(np.int64)
    b_hi = np.clip(b_hi, 0, axis.n - 1).astype(np.int64)
    return b_lo, b_hi, f_lo, f_hi, inside


def _span_weight(k: int, b_lo, b_hi, f_lo, f_hi) -> tuple[np.ndarray, np.ndarray]:
    """Bin ``b_lo + k`` of each pixel and the share of the pixel that falls in it."""
    b = b_lo + k
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / (f_hi - f_lo)
        w = np.where(b == b_lo, ((b_lo + 1) - f_lo) * inv, np.where(b == b_hi, (f_hi - b_hi) * inv, inv))
    w = np.where(b_lo == b_hi, 1.0, w)
    return b, np.where(b <= b_hi, w, 0.0)


def integrate_reference(
    frame: np.ndarray,
    pixels: PixelTable,
    radial_axis: BinAxis,
    azimuth_axis: BinAxis | None = None,
    chi_filter: tuple[float, float] | None = None,
    dummy: float | None = None,
    pixel_mask: np.ndarray | None = None,
) -> np.ndarray:
    """The integration with ``np.bincount``: 1D (``azimuth_axis`` None) or a (n_azim, n_radial) cake.

    ``chi_filter`` (radians, 1D only) drops pixels whose azimuth lies outside it.
    """
    raw = np.asarray(frame).reshape(-1)
    values = raw.astype(np.float64)
    use = pixels.keep & ~np.isnan(values)
    if dummy is not None:
        use &= raw != _dummy_like(dummy, raw.dtype)
    if pixel_mask is not None:
        use &= np.asarray(pixel_mask).reshape(-1) == 0
    if chi_filter is not None:
        d1 = 0.0 if pixels.chi_delta is None else pixels.chi_delta
        use &= ~((pixels.chi + d1 < chi_filter[0]) | (pixels.chi - d1 > chi_filter[1]))
    r_lo, r_hi, rf_lo, rf_hi, inside = _spans(pixels.radial, pixels.radial_delta, radial_axis)
    use &= inside
    n_bins = radial_axis.n
    if azimuth_axis is not None:
        a_lo, a_hi, af_lo, af_hi, inside = _spans(pixels.chi, pixels.chi_delta, azimuth_axis)
        use &= inside
        n_bins *= azimuth_axis.n
    sel = np.nonzero(use)[0]
    values, norm = values[sel], pixels.norm[sel].astype(np.float64)
    r_lo, r_hi, rf_lo, rf_hi = r_lo[sel], r_hi[sel], rf_lo[sel], rf_hi[sel]
    signal = np.zeros(n_bins)
    normalization = np.zeros(n_bins)
    r_span = int((r_hi - r_lo).max(initial=0)) + 1
    if azimuth_axis is None:
        parts = [(k, None) for k in range(r_span)]
    else:
        a_lo, a_hi, af_lo, af_hi = a_lo[sel], a_hi[sel], af_lo[sel], af_hi[sel]
        a_span = int((a_hi - a_lo).max(initial=0)) + 1
        parts = [(k, m) for k in range(r_span) for m in range(a_span)]
    for k, m in parts:
        b, w = _span_weight(k, r_lo, r_hi, rf_lo, rf_hi)
        if m is not None:
            b_a, w_a = _span_weight(m, a_lo, a_hi, af_lo, af_hi)
            b = b_a * radial_axis.n + b
            w = w * w_a
        on = w != 0
        signal += np.bincount(b[on], weights=w[on] * values[on], minlength=n_bins)
        normalization += np.bincount(b[on], weights=w[on] * norm[on], minlength=n_bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        result = np.where(normalization > 0, signal / normalization, 0.0 if dummy is None else dummy)
    if azimuth_axis is not None:
        result = result.reshape(azimuth_axis.n, radial_axis.n)
    return result


# ---------------------------------------------------------------- building the pixel -> bin matrix


@numba.njit(cache=True, inline="always")
def _clip_span(f_lo, f_hi, n):
    """pyFAI's first/last bin of a box [f_lo, f_hi] in bin units (C truncation, then clipping);
    last < first when the box misses all bins (tested on the floats first: no overflowing casts)."""
    if not (f_hi > -1.0 and f_lo < n):  # i.e. trunc(f_hi) < 0 or trunc(f_lo) >= n, or NaN
        return 1, 0
    return max(int(f_lo), 0), min(int(f_hi), n - 1)


@numba.njit(cache=True, inline="always")
def _share(k, b_lo, b_hi, f_lo, f_hi):
    """Fraction of a box [f_lo, f_hi] (bin units) given to bin ``k`` (pyFAI's bbox weights)."""
    if b_lo == b_hi:
        return 1.0
    inv = 1.0 / (f_hi - f_lo)
    if k == b_lo:
        return ((b_lo + 1) - f_lo) * inv
    if k == b_hi:
        return (f_hi - b_hi) * inv
    return inv


@numba.njit(cache=True)
def _scan_pixels(
    radial, radial_delta, chi, chi_delta, keep, r_lower, r_delta, n_r, a_lower, a_delta, a_upper_in, n_a, mode,
    fill, counts, block_of_row, block_rows, cursor, indices, local_rows, weights,
):  # fmt: skip
    """Visit every (pixel, bin, weight) entry of the pixel -> bin map, pixels in ascending order.

    ``mode`` 0: 1D; 1: 1D keeping only chi in [a_lower, a_upper_in]; 2: 2D, row =
    azimuth_bin * n_r + radial_bin. Empty delta arrays mean no splitting. With
    ``fill`` 0 the entries are counted per row; with 1 each is appended to its row's
    block (so a block's entries come in pixel order).
    """
    split_r = radial_delta.size > 0
    split_a = chi_delta.size > 0
    for i in range(radial.size):
        if not keep[i]:
            continue
        c0 = radial[i]
        d0 = radial_delta[i] if split_r else 0.0
        if mode == 1:
            c1 = chi[i]
            d1 = chi_delta[i] if split_a else 0.0
            if c1 + d1 < a_lower or c1 - d1 > a_upper_in:
                continue
        f0_lo = ((c0 - d0) - r_lower) / r_delta
        f0_hi = ((c0 + d0) - r_lower) / r_delta
        b0_lo, b0_hi = _clip_span(f0_lo, f0_hi, n_r)
        if b0_hi < b0_lo:
            continue
        b1_lo, b1_hi = 0, 0
        f1_lo, f1_hi = 0.0, 0.0
        if mode == 2:
            c1 = chi[i]
            d1 = chi_delta[i] if split_a else 0.0
            f1_lo = ((c1 - d1) - a_lower) / a_delta
            f1_hi = ((c1 + d1) - a_lower) / a_delta
            b1_lo, b1_hi = _clip_span(f1_lo, f1_hi, n_a)
            if b1_hi < b1_lo:
                continue
        for k1 in range(b1_lo, b1_hi + 1):
            w1 = _share(k1, b1_lo, b1_hi, f1_lo, f1_hi) if mode == 2 else 1.0
            for k0 in range(b0_lo, b0_hi + 1):
                row = k1 * n_r + k0
                if fill == 0:
                    counts[row] += 1
                else:
                    block = block_of_row[row]
                    at = cursor[block]
                    indices[at] = i
                    local_rows[at] = row - block_rows[block]
                    weights[at] = w1 * _share(k0, b0_lo, b0_hi, f0_lo, f0_hi)
                    cursor[block] = at + 1


@numba.njit(cache=True)
def _block_bounds(counts, target, max_rows):
    """Split rows into consecutive blocks of about ``target`` entries and at most ``max_rows`` rows."""
    n_rows = counts.size
    bounds = np.empty(n_rows + 1, dtype=np.int64)
    bounds[0] = 0
    n = 0
    filled = 0
    first = 0
    for r in range(n_rows):
        filled += counts[r]
        if filled >= target or r + 1 - first >= max_rows:
            n += 1
            bounds[n] = r + 1
            first = r + 1
            filled = 0
    if bounds[n] != n_rows:
        n += 1
        bounds[n] = n_rows
    return bounds[: n + 1].copy()


#: How a matrix stores its entries (see :class:`PixelBinMatrix`).
WHOLE_PIXELS, SPLIT_PAIRS, ENTRIES = 0, 1, 2


@dataclass
class PixelBinMatrix:
    """The sparse pixel -> bin matrix (rows = bins, columns = pixels), row-compressed by blocks.

    Consecutive rows (bins) are grouped in blocks of about equal work;
    ``block_rows`` gives each block's first row and ``block_ptr`` its first item
    (CSR's ``indptr`` at block granularity). Within a block the items are stored in
    pixel order, each with its row inside the block (``local_rows``), so that a
    block's pass over the frame walks memory forwards once instead of once per bin.
    Items are one of three ``layout``:

    - ``WHOLE_PIXELS`` (no splitting): an item is a pixel with weight 1. A block's
      pixels form long runs of consecutive indices (the image rows crossing its
      annulus or sector), stored as ``run_ptr`` (first run of each block),
      ``run_start`` and ``run_length``: the frame is read as contiguous slices.
    - ``SPLIT_PAIRS`` (splitting): an item is a pixel shared by two neighbouring
      rows, the share ``weights[i]`` to its row and 1 - that to the next row (a
      pixel inside one bin is a pair with share 1, or share 0 to the row before on
      a block's last row, so that the next row is always in the block). Pixels are
      stored as runs as above; the entries that do not fit (pixels over three or
      more bins, or cut by a range or a block edge) are listed apart in
      ``extra_*``, one per entry.
    - ``ENTRIES``: an item is an entry, with its pixel in ``indices``.

    The weights are pyFAI's (``to_csr`` gives the plain per-bin CSR); the second
    share of a pair is 1 - the first rather than a separately rounded float32.
    """

    n_rows: int
    nnz: int
    layout: int
    block_rows: np.ndarray  # int64, n_blocks + 1
    block_ptr: np.ndarray  # int64, n_blocks + 1: first item of each block
    local_rows: np.ndarray  # uint16 per item: row - block_rows[block]
    weights: np.ndarray  # float32 per item (empty for WHOLE_PIXELS)
    indices: np.ndarray  # uint32 pixel per item (ENTRIES only)
    run_ptr: np.ndarray  # int64, n_blocks + 1 (WHOLE_PIXELS, SPLIT_PAIRS)
    run_start: np.ndarray  # uint32 first pixel of each run
    run_length: np.ndarray  # uint32 pixels in each run
    extra_ptr: np.ndarray  # int64, n_blocks + 1 (SPLIT_PAIRS)
    extra_indices: np.ndarray  # uint32
    extra_rows: np.ndarray  # uint16, row - block_rows[block]
    extra_weights: np.ndarray  # float32

    def _item_pixels(self) -> np.ndarray:
        if self.layout == ENTRIES:
            return self.indices.astype(np.int64)
        lengths = self.run_length.astype(np.int64)
        first_item = np.cumsum(lengths) - lengths
        return np.repeat(self.run_start.astype(np.int64) - first_item, lengths) + np.arange(lengths.sum())

    def entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every nonzero entry as (row, pixel, weight) arrays (int64, int64, float64)."""
        rows = np.repeat(self.block_rows[:-1], np.diff(self.block_ptr)) + self.local_rows
        pixels = self._item_pixels()
        if self.layout == WHOLE_PIXELS:
            return rows, pixels, np.ones(rows.size)
        share = self.weights.astype(np.float64)
        if self.layout == ENTRIES:
            return rows, pixels, share
        extra_rows = np.repeat(self.block_rows[:-1], np.diff(self.extra_ptr)) + self.extra_rows
        rows = np.concatenate([rows, rows + 1, extra_rows])
        pixels = np.concatenate([pixels, pixels, self.extra_indices.astype(np.int64)])
        share = np.concatenate([share, 1.0 - share, self.extra_weights.astype(np.float64)])
        real = share != 0.0
        return rows[real], pixels[real], share[real]

    def to_csr(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The plain CSR (indptr, int32 indices, float32 weights), each row's entries in pixel order."""
        rows, pixels, weights = self.entries()
        order = np.lexsort((pixels, rows))
        indptr = np.zeros(self.n_rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=self.n_rows), out=indptr[1:])
        return indptr, pixels[order].astype(np.int32), weights[order].astype(np.float32)


#: Blocks per thread: few blocks keep each block's pass over the frame long and forward.
BLOCKS_PER_THREAD = 2
#: At most this many bins per block (the row-in-block index is a uint16).
MAX_BLOCK_ROWS = 65535


def _runs(pixels: np.ndarray, block_ptr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of consecutive pixel indices within each block: (run_ptr, run_start, run_length)."""
    starts = np.ones(pixels.size, dtype=bool)
    starts[1:] = np.diff(pixels.astype(np.int64)) != 1
    starts[block_ptr[:-1][block_ptr[:-1] < pixels.size]] = True
    first = np.flatnonzero(starts)
    run_length = np.diff(np.append(first, pixels.size)).astype(np.uint32)
    run_ptr = np.searchsorted(first, block_ptr).astype(np.int64)
    return run_ptr, pixels[first].copy(), run_length


@numba.njit(cache=True)
def _pair_up(block_rows, block_ptr, indices, local_rows, weights):
    """Split per-entry blocks (pixel order) into pairs (pixel, row, share of row; rest to row + 1)
    and the leftover entries. A pixel within one bin becomes a pair with share 1 (or, on a
    block's last row, share 0 to the row before)."""
    n_blocks = block_rows.size - 1
    size = indices.size
    pair_ptr = np.zeros(n_blocks + 1, dtype=np.int64)
    pair_pixels = np.empty(size, dtype=np.uint32)
    pair_rows = np.empty(size, dtype=np.uint16)
    pair_shares = np.empty(size, dtype=np.float32)
    extra_ptr = np.zeros(n_blocks + 1, dtype=np.int64)
    extra_pixels = np.empty(size, dtype=np.uint32)
    extra_rows = np.empty(size, dtype=np.uint16)
    extra_weights = np.empty(size, dtype=np.float32)
    n_pairs = 0
    n_extra = 0
    for b in range(n_blocks):
        n_local = block_rows[b + 1] - block_rows[b]
        j = block_ptr[b]
        stop = block_ptr[b + 1]
        while j < stop:
            end = j + 1
            while end < stop and indices[end] == indices[j]:
                end += 1
            row = np.int64(local_rows[j])
            share = np.float32(-1.0)
            if end - j == 1 and weights[j] == 1.0 and n_local >= 2:
                if row + 1 < n_local:
                    share = np.float32(1.0)
                else:
                    row -= 1
                    share = np.float32(0.0)
            elif (
                end - j == 2
                and np.int64(local_rows[j + 1]) == row + 1
                and abs(np.float64(weights[j]) + np.float64(weights[j + 1]) - 1.0) <= 2.5e-7
            ):
                share = weights[j]
            if share >= 0.0:
                pair_pixels[n_pairs] = indices[j]
                pair_rows[n_pairs] = row
                pair_shares[n_pairs] = share
                n_pairs += 1
            else:
                for t in range(j, end):
                    extra_pixels[n_extra] = indices[t]
                    extra_rows[n_extra] = local_rows[t]
                    extra_weights[n_extra] = weights[t]
                    n_extra += 1
            j = end
        pair_ptr[b + 1] = n_pairs
        extra_ptr[b + 1] = n_extra
    return (
        pair_ptr, pair_pixels[:n_pairs].copy(), pair_rows[:n_pairs].copy(), pair_shares[:n_pairs].copy(),
        extra_ptr, extra_pixels[:n_extra].copy(), extra_rows[:n_extra].copy(), extra_weights[:n_extra].copy(),
    )  # fmt: skip


def build_matrix(
    pixels: PixelTable,
    radial_axis: BinAxis,
    azimuth_axis: BinAxis | None,
    chi_filter: tuple[float, float] | None,
    split: bool,
    blocks: int | None = None,
    layout: int | None = None,
) -> PixelBinMatrix:
    """The pixel -> bin matrix of pyFAI's CSR engine (same entries, same float32 weights).

    ``layout`` defaults to ``WHOLE_PIXELS`` without splitting and, with splitting,
    ``SPLIT_PAIRS`` when at most a tenth of the entries are left over as extras
    (1D patterns), else ``ENTRIES`` (cakes, whose pixels often straddle two sectors).
    """
    empty = np.empty(0)
    r = radial_axis
    if azimuth_axis is not None:
        a = azimuth_axis
        mode, a_args = 2, (a.lower, a.delta, a.upper_in, a.n)
    elif chi_filter is not None:
        mode, a_args = 1, (chi_filter[0], 1.0, chi_filter[1], 1)
    else:
        mode, a_args = 0, (0.0, 1.0, 0.0, 1)
    n_rows = r.n * (a_args[3] if mode == 2 else 1)
    geometry_args = (
        pixels.radial,
        pixels.radial_delta if split else empty,
        pixels.chi if pixels.chi is not None else empty,
        pixels.chi_delta if (split and pixels.chi_delta is not None) else empty,
        pixels.keep,
        r.lower,
        r.delta,
        r.n,
        *a_args,
        mode,
    )
    if pixels.radial.size >= 2**32:
        raise ValueError(f"frames of {pixels.radial.size} pixels are too large (at most 2**32)")
    counts = np.zeros(n_rows, dtype=np.int64)
    no_i64, no_u32, no_u16, no_f32 = (np.empty(0, t) for t in (np.int64, np.uint32, np.uint16, np.float32))
    _scan_pixels(*geometry_args, 0, counts, no_i64, no_i64, no_i64, no_u32, no_u16, no_f32)
    nnz = int(counts.sum())
    blocks = blocks or BLOCKS_PER_THREAD * numba.get_num_threads()
    block_rows = _block_bounds(counts, max(1, -(-nnz // blocks)), MAX_BLOCK_ROWS)
    block_ptr = np.zeros(block_rows.size, dtype=np.int64)
    np.cumsum(np.add.reduceat(counts, block_rows[:-1]) if n_rows else [], out=block_ptr[1:])
    block_of_row = np.repeat(np.arange(block_rows.size - 1), np.diff(block_rows))
    indices = np.empty(nnz, dtype=np.uint32)
    local_rows = np.empty(nnz, dtype=np.uint16)
    weights = np.empty(nnz, dtype=np.float32)
    _scan_pixels(
        *geometry_args,
        1,
        no_i64,
        block_of_row,
        block_rows,
        block_ptr[:-1].copy(),
        indices,
        local_rows,
        weights,
    )
    chosen = layout
    layout = (SPLIT_PAIRS if split else WHOLE_PIXELS) if layout is None else layout
    no_runs = (np.zeros(block_rows.size, np.int64), no_u32, no_u32)
    no_extra = (np.zeros(block_rows.size, np.int64), no_u32, no_u16, no_f32)
    if layout == WHOLE_PIXELS:
        if split and not bool(np.all(weights == 1.0)):
            raise ValueError("a split matrix cannot be stored as whole pixels")
        return PixelBinMatrix(n_rows, nnz, layout, block_rows, block_ptr, local_rows, no_f32, no_u32,
                              *_runs(indices, block_ptr), *no_extra)  # fmt: skip
    if layout == SPLIT_PAIRS:
        pair_ptr, pair_pixels, pair_rows, shares, *extra = _pair_up(
            block_rows, block_ptr, indices, local_rows, weights
        )
        if chosen is not None or extra[1].size <= nnz // 10:
            return PixelBinMatrix(n_rows, nnz, layout, block_rows, pair_ptr, pair_rows, shares, no_u32,
                                  *_runs(pair_pixels, pair_ptr), *extra)  # fmt: skip
    return PixelBinMatrix(
        n_rows, nnz, ENTRIES, block_rows, block_ptr, local_rows, weights, indices, *no_runs, *no_extra
    )


# ---------------------------------------------------------------- per-frame kernel


@numba.njit(cache=True)
def _careful_block(frame, block, layout, block_rows, block_ptr, local_rows, weights, indices, run_ptr, run_start,
                   run_length, extra_ptr, extra_indices, extra_rows, extra_weights, pixel_norm, check_dummy, dummy,
                   pixel_mask, empty, out):  # fmt: skip
    """One block again, leaving out NaN / dummy / masked pixels from signal and normalisation."""
    r0 = block_rows[block]
    n = block_rows[block + 1] - r0
    check_mask = pixel_mask.size > 0
    signal = np.zeros(n + 1)
    normalization = np.zeros(n + 1)
    j = block_ptr[block]
    stop = block_ptr[block + 1]
    run = run_ptr[block] if layout != ENTRIES else 0
    offset = 0
    while j < stop:
        if layout == ENTRIES:
            idx = np.int64(indices[j])
        else:
            idx = np.int64(run_start[run]) + offset
            offset += 1
            if offset == run_length[run]:
                run += 1
                offset = 0
        k = local_rows[j]
        w = 1.0 if layout == WHOLE_PIXELS else np.float64(weights[j])
        j += 1
        v = frame[idx]
        if v != v or (check_dummy and v == dummy) or (check_mask and pixel_mask[idx] != 0):
            continue
        norm = np.float64(pixel_norm[idx])
        if w != 0.0:
            signal[k] += w * v
            normalization[k] += w * norm
        if layout == SPLIT_PAIRS and w != 1.0:
            signal[k + 1] += (1.0 - w) * v
            normalization[k + 1] += (1.0 - w) * norm
    if layout == SPLIT_PAIRS:
        for e in range(extra_ptr[block], extra_ptr[block + 1]):
            idx = np.int64(extra_indices[e])
            v = frame[idx]
            if v != v or (check_dummy and v == dummy) or (check_mask and pixel_mask[idx] != 0):
                continue
            w = np.float64(extra_weights[e])
            signal[extra_rows[e]] += w * v
            normalization[extra_rows[e]] += w * np.float64(pixel_norm[idx])
    for k in range(n):
        out[r0 + k] = signal[k] / normalization[k] if normalization[k] > 0.0 else empty


@numba.njit(parallel=True, cache=True)
def matrix_integrate(frame, layout, block_rows, block_ptr, local_rows, weights, indices, run_ptr, run_start, run_length,
                     extra_ptr, extra_indices, extra_rows, extra_weights, denominator, pixel_norm, check_dummy, dummy,
                     pixel_mask, empty, acc, out):  # fmt: skip
    """out[row] = (sum_j w_j frame[idx_j]) / denominator[row]: the matrix-vector product, parallel over blocks of bins.

    ``acc`` is (4, rows) scratch (int64 for integer frames and whole pixels:
    exact sums; float64 otherwise); consecutive items add to different rows of it,
    so that neighbouring pixels, which often share a bin, update different memory.
    A block with a NaN sum (a NaN pixel) is summed again without its bad pixels;
    with a dummy value or a per-frame ``pixel_mask`` (non-empty) every block takes
    that careful path.
    """
    careful = check_dummy or pixel_mask.size > 0
    for block in numba.prange(block_rows.size - 1):
        r0 = block_rows[block]
        r1 = block_rows[block + 1]
        redo = careful
        if not careful:
            # (a pair's next row is always inside its block: the blocks' rows never overlap)
            a0 = acc[0, r0:r1]
            a1 = acc[1, r0:r1]
            a2 = acc[2, r0:r1]
            a3 = acc[3, r0:r1]
            a0[:] = 0
            a1[:] = 0
            a2[:] = 0
            a3[:] = 0
            j = block_ptr[block]
            stop = block_ptr[block + 1]
            if layout == WHOLE_PIXELS:  # contiguous slices of the frame, weights all 1
                for run in range(run_ptr[block], run_ptr[block + 1]):
                    n = np.int64(run_length[run])
                    values = frame[np.int64(run_start[run]) : np.int64(run_start[run]) + n]
                    rows = local_rows[j : j + n]
                    q = 0
                    while q + 3 < n:
                        a0[rows[q]] += values[q]
                        a1[rows[q + 1]] += values[q + 1]
                        a2[rows[q + 2]] += values[q + 2]
                        a3[rows[q + 3]] += values[q + 3]
                        q += 4
                    while q < n:
                        a0[rows[q]] += values[q]
                        q += 1
                    j += n
            elif layout == SPLIT_PAIRS:  # contiguous slices, each pixel shared by a row and the next
                for run in range(run_ptr[block], run_ptr[block + 1]):
                    n = np.int64(run_length[run])
                    values = frame[np.int64(run_start[run]) : np.int64(run_start[run]) + n]
                    rows = local_rows[j : j + n]
                    shares = weights[j : j + n]
                    q = 0
                    while q + 1 < n:
                        v = np.float64(values[q])
                        x = shares[q] * v
                        a0[rows[q]] += x
                        a1[rows[q] + 1] += v - x
                        v = np.float64(values[q + 1])
                        x = shares[q + 1] * v
                        a2[rows[q + 1]] += x
                        a3[rows[q + 1] + 1] += v - x
                        q += 2
                    if q < n:
                        v = np.float64(values[q])
                        x = shares[q] * v
                        a0[rows[q]] += x
                        a1[rows[q] + 1] += v - x
                    j += n
                for e in range(extra_ptr[block], extra_ptr[block + 1]):
                    a2[extra_rows[e]] += extra_weights[e] * np.float64(frame[extra_indices[e]])
            else:
                while j + 3 < stop:
                    a0[local_rows[j]] += weights[j] * np.float64(frame[indices[j]])
                    a1[local_rows[j + 1]] += weights[j + 1] * np.float64(frame[indices[j + 1]])
                    a2[local_rows[j + 2]] += weights[j + 2] * np.float64(frame[indices[j + 2]])
                    a3[local_rows[j + 3]] += weights[j + 3] * np.float64(frame[indices[j + 3]])
                    j += 4
                while j < stop:
                    a0[local_rows[j]] += weights[j] * np.float64(frame[indices[j]])
                    j += 1
            for k in range(r1 - r0):
                s = (np.float64(a0[k]) + np.float64(a1[k])) + (np.float64(a2[k]) + np.float64(a3[k]))
                if s != s:
                    redo = True
                    break
                d = denominator[r0 + k]
                out[r0 + k] = s / d if d > 0.0 else empty
        if redo:
            _careful_block(frame, block, layout, block_rows, block_ptr, local_rows, weights, indices, run_ptr,
                           run_start, run_length, extra_ptr, extra_indices, extra_rows, extra_weights, pixel_norm,
                           check_dummy, dummy, pixel_mask, empty, out)  # fmt: skip


def matrix_row_sums(matrix: PixelBinMatrix, vector: np.ndarray) -> np.ndarray:
    """sum_j w_j vector[idx_j] per row, float64: the frame-independent normalisation."""
    rows, pixels, weights = matrix.entries()
    return np.bincount(rows, weights=weights * vector.astype(np.float64)[pixels], minlength=matrix.n_rows)


# ---------------------------------------------------------------- the steps


def _check_range(name: str, value: Any) -> tuple[float, float] | None:
    if value is None:
        return None
    if not (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        and value[0] < value[1]
    ):
        raise ValueError(f"{name} = {value!r} must be [low, high] with low < high, two finite numbers")
    return float(value[0]), float(value[1])


def _dummy_like(dummy: float, dtype: np.dtype) -> float:
    """The dummy value as a pixel of a float frame holds it (float32 frames store float32(dummy))."""
    return dtype.type(dummy) if dtype.kind == "f" else float(dummy)


def _native_frame(frame: np.ndarray) -> np.ndarray:
    """The frame as a flat, native-byte-order view (copied only when it is not already one)."""
    frame = np.asarray(frame)
    if frame.dtype.kind == "b":
        frame = frame.view(np.uint8)
    if frame.dtype.kind not in "uif":
        raise TypeError(f"azimuthal integration needs a numeric frame, got dtype {frame.dtype}")
    if not frame.dtype.isnative:
        frame = frame.astype(frame.dtype.newbyteorder("="))
    return np.ascontiguousarray(frame).reshape(-1)


class _Integrator:
    """What the 1D and 2D steps share: parameters, geometry, the pixel -> bin matrix and the kernel call.

    One instance integrates one frame at a time (it reuses scratch buffers); a
    worker that runs frames in parallel threads gives each thread its own step.
    """

    two_d = False

    def _configure(
        self,
        poni: str,
        npt: int,
        npt_azim: int,
        unit: str,
        radial_range: list | None,
        azimuth_range: list | None,
        mask: str | None,
        correct_solid_angle: bool,
        polarization_factor: float | None,
        pixel_splitting: str,
        dummy: float | None,
        shape: list | None,
        prefix: str,
    ) -> None:
        if not isinstance(npt, int) or isinstance(npt, bool) or npt < 1:
            raise ValueError(f"npt = {npt!r} must be a positive integer (number of radial bins)")
        if not isinstance(npt_azim, int) or isinstance(npt_azim, bool) or npt_azim < 1:
            raise ValueError(f"npt_azim = {npt_azim!r} must be a positive integer (number of azimuthal bins)")
        if pixel_splitting not in SPLITTINGS:
            raise ValueError(f"pixel_splitting = {pixel_splitting!r} must be one of {', '.join(SPLITTINGS)}")
        if polarization_factor is not None and not (
            isinstance(polarization_factor, int | float) and -1.0 <= polarization_factor <= 1.0
        ):
            raise ValueError(
                f"polarization_factor = {polarization_factor!r} must be None or a number in [-1, 1]"
            )
        if dummy is not None and not isinstance(dummy, int | float):
            raise ValueError(f"dummy = {dummy!r} must be None or a number")
        if not isinstance(prefix, str):
            raise ValueError(f"prefix = {prefix!r} must be a string")
        self.prefix = prefix
        self.unit = radial_unit(unit)
        self.radial_range = _check_range("radial_range", radial_range)
        azimuth_range = _check_range("azimuth_range", azimuth_range)
        if azimuth_range is not None and azimuth_range[1] - azimuth_range[0] > 360.0:
            raise ValueError(f"azimuth_range = {list(azimuth_range)!r} spans more than 360 degrees")
        self.azimuth_range = azimuth_range
        # Azimuths in radians as pyFAI normalises them; a range crossing the cut at
        # +-180 deg gets an upper end above pi, and the pixels below its lower end
        # are moved up by a turn so that the sector is contiguous.
        self.chi_range: tuple[float, float] | None = None
        self.chi_unwrap_from: float | None = None
        if azimuth_range is not None:
            lo, hi = deg_to_chi(azimuth_range[0]), deg_to_chi(azimuth_range[1])
            if hi <= lo:
                hi += 2.0 * math.pi
            self.chi_range = (lo, hi)
            if hi > math.pi:
                self.chi_unwrap_from = lo
        self.npt = npt
        self.npt_azim = npt_azim
        self.split = pixel_splitting == "bbox"
        self.correct_solid_angle = bool(correct_solid_angle)
        self.polarization_factor = None if polarization_factor is None else float(polarization_factor)
        self.dummy = None if dummy is None else float(dummy)
        self.empty = 0.0 if dummy is None else float(dummy)
        self.poni_path = str(poni)
        try:
            self.geometry = read_poni(poni)
        except PoniError as exc:
            raise ValueError(f"poni = {poni!r}: {exc}") from exc
        if self.geometry.wavelength is None and self.unit.space == "q":
            raise ValueError(f"unit = {unit!r} needs a wavelength, and the PONI file {poni} has none")
        self.static_mask = None
        if mask is not None:
            try:
                self.static_mask = np.load(Path(mask), allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise ValueError(f"mask = {mask!r}: cannot read it as a .npy array: {exc}") from exc
            if self.static_mask.ndim != 2:
                raise ValueError(f"mask = {mask!r} has shape {self.static_mask.shape}; expected a 2D image")
        if shape is not None:
            if not (
                isinstance(shape, list | tuple)
                and len(shape) == 2
                and all(isinstance(v, int) and v > 0 for v in shape)
            ):
                raise ValueError(f"shape = {shape!r} must be [rows, columns], two positive integers")
            shape = (int(shape[0]), int(shape[1]))
        else:
            shape = self.geometry.shape or (None if self.static_mask is None else self.static_mask.shape)
        self.shape: tuple[int, int] | None = None
        if shape is not None:
            self._build(shape)

    # -- tables

    def pixel_table(self, shape: tuple[int, int] | None = None) -> PixelTable:
        """The per-pixel inputs (recomputed; used to build the matrix and by the reference)."""
        shape = shape or self.shape
        if self.static_mask is not None and self.static_mask.shape != tuple(shape):
            raise ValueError(f"the mask has shape {self.static_mask.shape}, frames have shape {tuple(shape)}")
        return build_pixel_table(
            self.geometry,
            shape,
            self.unit.name,
            self.split,
            need_chi=self.two_d or self.chi_range is not None,
            correct_solid_angle=self.correct_solid_angle,
            polarization_factor=self.polarization_factor,
            mask=self.static_mask,
            chi_unwrap_from=self.chi_unwrap_from,
        )

    def _build(self, shape: tuple[int, int], layout: int | None = None) -> None:
        """Bins, the pixel -> bin matrix and its normalisation sums: everything frame-independent."""
        pixels = self.pixel_table(shape)
        self.radial_axis = radial_bins(pixels, self.npt, self.radial_range, self.unit.scale)
        self.azimuth_axis: BinAxis | None = None
        if self.two_d:
            self.azimuth_axis = azimuth_bins(pixels, self.npt_azim, self.chi_range)
        r = self.radial_axis
        chi_filter = None if self.two_d else self.chi_range
        self.matrix = build_matrix(pixels, r, self.azimuth_axis, chi_filter, self.split, layout=layout)
        self.pixel_norm = pixels.norm
        self.denominator = matrix_row_sums(self.matrix, pixels.norm)
        self._scratch: dict[bool, np.ndarray] = {}
        self.radial = r.centers() * self.unit.scale
        self.radial.setflags(write=False)
        if self.two_d:
            self.azimuthal = self.azimuth_axis.centers() * CHI_DEG_SCALE
            self.azimuthal.setflags(write=False)
        self.shape = (int(shape[0]), int(shape[1]))
        self.geometry = self.geometry.with_shape(self.shape)

    def rebuild(self, layout: int) -> None:
        """Store the matrix in another layout (``SPLIT_PAIRS`` or ``ENTRIES`` when splitting):
        the same results at another speed, for tests and benchmarks."""
        if self.shape is None:
            raise ValueError("the tables are not built yet: integrate a frame first")
        self._build(self.shape, layout)

    # -- per frame

    def _check_frame(self, frame: np.ndarray) -> None:
        if frame.ndim != 2:
            raise ValueError(f"azimuthal integration needs a 2D frame, got shape {frame.shape}")
        if self.shape is None:
            self._build(frame.shape)
        elif frame.shape != self.shape:
            raise ValueError(
                f"frame shape {frame.shape} does not match the geometry's detector shape {self.shape}"
            )

    def _integrate(self, frame: np.ndarray, meta: dict | None, out: np.ndarray) -> np.ndarray:
        self._check_frame(frame)
        pixel_mask = None if meta is None else meta.get("pixel_mask")
        if pixel_mask is None:
            flat_mask = np.empty(0, dtype=np.uint8)
        else:
            pixel_mask = np.asarray(pixel_mask)
            if pixel_mask.shape != self.shape:
                raise ValueError(
                    f"meta['pixel_mask'] has shape {pixel_mask.shape}, the frame has {self.shape}"
                )
            flat_mask = _native_frame(pixel_mask)
        flat = _native_frame(frame)
        m = self.matrix
        exact = m.layout == WHOLE_PIXELS and flat.dtype.kind in "ui" and flat.dtype.itemsize <= 4
        scratch = self._scratch.get(exact)
        if scratch is None:
            dtype = np.int64 if exact else np.float64
            scratch = self._scratch[exact] = np.empty((4, m.n_rows), dtype)
        matrix_integrate(
            flat,
            m.layout,
            m.block_rows,
            m.block_ptr,
            m.local_rows,
            m.weights,
            m.indices,
            m.run_ptr,
            m.run_start,
            m.run_length,
            m.extra_ptr,
            m.extra_indices,
            m.extra_rows,
            m.extra_weights,
            self.denominator,
            self.pixel_norm,
            self.dummy is not None,
            0.0 if self.dummy is None else _dummy_like(self.dummy, flat.dtype),
            flat_mask,
            self.empty,
            scratch,
            out.reshape(-1),
        )
        return out

    def reference(self, frame: np.ndarray, meta: dict | None = None) -> np.ndarray:
        """The same integration by :func:`integrate_reference` (numpy, no CSR): slow, for tests."""
        self._check_frame(frame)
        return integrate_reference(
            frame,
            self.pixel_table(),
            self.radial_axis,
            self.azimuth_axis,
            chi_filter=None if self.two_d else self.chi_range,
            dummy=self.dummy,
            pixel_mask=None if meta is None else meta.get("pixel_mask"),
        )

    def lavue_metadata(self) -> dict[str, Any]:
        """What Lavue (and NeXus writers) want to know, in the units Lavue's settings use.

        ``axisscales`` [x0, y0, xscale, yscale] and ``axislabels`` [xtext, ytext,
        xunits, yunits] describe the caked image as Lavue shows it (x = radial
        columns, y = azimuth rows; x0/y0 are the outer edges of the first bins);
        ``wavelength`` in Angstrom, ``energy`` in eV, ``detector_distance`` (sample to
        PONI, along the detector normal) and ``direct_beam_distance`` in mm,
        ``beam_center_x``/``beam_center_y`` in pixels (frame column/row, pixel i
        spanning [i, i+1)), ``pixel_size_x``/``pixel_size_y`` in micrometres, the raw
        PONI values (``poni1``/``poni2`` in m, ``rot1..3`` in rad) and the radial
        ``unit``.
        """
        g = self.geometry
        out: dict[str, Any] = {
            "unit": self.unit.name,
            "detector_distance": g.dist * 1e3,
            "direct_beam_distance": g.direct_beam_distance * 1e3,
            "pixel_size_x": g.pixel2 * 1e6,
            "pixel_size_y": g.pixel1 * 1e6,
            "poni1": g.poni1,
            "poni2": g.poni2,
            "rot1": g.rot1,
            "rot2": g.rot2,
            "rot3": g.rot3,
        }
        if g.wavelength is not None:
            out["wavelength"] = g.wavelength * 1e10
            out["energy"] = g.energy_kev * 1e3
        if g.orientation == 3 or g.shape is not None:
            out["beam_center_x"], out["beam_center_y"] = g.beam_center
        if self.shape is not None:
            r = self.radial_axis
            s = self.unit.scale
            if self.two_d:
                a = self.azimuth_axis
                out["axisscales"] = [
                    r.lower * s,
                    a.lower * CHI_DEG_SCALE,
                    r.delta * s,
                    a.delta * CHI_DEG_SCALE,
                ]
                out["axislabels"] = [self.unit.label, "chi", self.unit.symbol, "deg"]
            else:
                out["axisscales"] = [r.lower * s, 0.0, r.delta * s, 1.0]
                out["axislabels"] = [self.unit.label, "intensity", self.unit.symbol, ""]
        return out


class AzimuthalIntegration(_Integrator):
    """1D azimuthal integration: results ``radial`` (bin centres in ``unit``) and ``intensity`` (float32)."""

    two_d = False

    def __init__(
        self,
        *,
        poni: str,
        npt: int = 1000,
        unit: str = "2th_deg",
        radial_range: list | None = None,
        azimuth_range: list | None = None,
        mask: str | None = None,
        correct_solid_angle: bool = True,
        polarization_factor: float | None = None,
        pixel_splitting: str = "none",
        dummy: float | None = None,
        shape: list | None = None,
        prefix: str = "",
    ):
        """
        poni: PONI file (pyFAI-calib2) with the detector geometry.
        npt: number of radial bins.
        unit: radial unit, "2th_deg", "2th_rad", "q_nm^-1" or "q_A^-1".
        radial_range: [low, high] in ``unit``; default: all pixels.
        azimuth_range: [low, high] in degrees; only pixels in this sector count.
        mask: .npy image, nonzero = pixel left out (besides NaN pixels and meta["pixel_mask"]).
        correct_solid_angle: divide by each pixel's relative solid angle.
        polarization_factor: None for no correction, else -1..1 (pyFAI's; ~0.95-0.99 at synchrotrons).
        pixel_splitting: "none" or "bbox" (split each pixel's radial extent over the bins it covers).
        dummy: pixel value meaning "no data"; also the value of empty bins (else 0).
        shape: [rows, columns] of the frames, when the PONI file has no max_shape
            (without either, the tables are built on the first frame).
        prefix: put before the result names ("saxs_" gives saxs_radial, saxs_intensity),
            so that several integrations can run in one chain.
        """
        self._configure(
            poni, npt, 1, unit, radial_range, azimuth_range, mask, correct_solid_angle,
            polarization_factor, pixel_splitting, dummy, shape, prefix,
        )  # fmt: skip

    def __call__(self, frame: np.ndarray, meta: dict) -> dict[str, Any]:
        intensity = self._integrate(frame, meta, np.empty(self.npt, dtype=np.float32))
        p = self.prefix
        return {f"{p}radial": self.radial, f"{p}intensity": intensity}


class Caking(_Integrator):
    """2D integration: ``cake`` (npt_azim x npt, float32), ``radial`` bin centres and ``azimuthal`` (degrees)."""

    two_d = True

    def __init__(
        self,
        *,
        poni: str,
        npt: int = 1000,
        npt_azim: int = 360,
        unit: str = "2th_deg",
        radial_range: list | None = None,
        azimuth_range: list | None = None,
        mask: str | None = None,
        correct_solid_angle: bool = True,
        polarization_factor: float | None = None,
        pixel_splitting: str = "none",
        dummy: float | None = None,
        shape: list | None = None,
        prefix: str = "",
    ):
        """Parameters as for ``azimuthal`` (results ``cake``, ``radial``, ``azimuthal``),
        plus npt_azim: number of azimuthal bins over azimuth_range (default: the
        pixels' extent within [-180, 180] degrees)."""
        self._configure(
            poni, npt, npt_azim, unit, radial_range, azimuth_range, mask, correct_solid_angle,
            polarization_factor, pixel_splitting, dummy, shape, prefix,
        )  # fmt: skip

    def __call__(self, frame: np.ndarray, meta: dict) -> dict[str, Any]:
        cake = self._integrate(frame, meta, np.empty((self.npt_azim, self.npt), dtype=np.float32))
        p = self.prefix
        return {f"{p}cake": cake, f"{p}radial": self.radial, f"{p}azimuthal": self.azimuthal}
