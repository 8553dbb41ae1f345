"""Each numba kernel of the processing steps timed against its numpy/scipy reference.

Both run in the same process on the same data (2048 x 2048 uint16 frames; 1024 x 1024
with ``--quick``). Times are the median of several repeats after a first call; the
first call's time is reported on its own (``first_call_ms``): it is the compile time
the first time a kernel runs on a machine, and loading numba's on-disk cache after
that (``from_cache`` says which).

    python -m benchmarks.bench_kernels [--quick] [--threads N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numba
import numpy as np

from pipelines.steps import basic, binning, calibration, dpc, hits, photon, roi, tomo, xrf


def _ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _cache_hits(dispatchers: list) -> int:
    return sum(sum(d.stats.cache_hits.values()) for d in dispatchers)


def _measure(name: str, kernels: list, kernel: Callable, reference: Callable, repeats: int) -> dict:
    hits_before = _cache_hits(kernels)
    start = time.perf_counter()
    kernel()
    first = (time.perf_counter() - start) * 1e3
    from_cache = _cache_hits(kernels) > hits_before
    kernel_ms = _ms(kernel, repeats)
    reference_ms = _ms(reference, max(1, repeats // 2))
    return {
        "kernel": name,
        "reference_ms": round(reference_ms, 3),
        "kernel_ms": round(kernel_ms, 3),
        "speedup": round(reference_ms / kernel_ms, 1) if kernel_ms > 0 else float("inf"),
        "first_call_ms": round(first, 1),
        "from_cache": from_cache,
    }


def _frame(size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    r = np.hypot(*np.meshgrid(np.arange(size) - size / 2, np.arange(size) - size / 2, indexing="ij"))
    return rng.poisson(20 + 200 * np.exp(-(((r - size / 5) / 4) ** 2))).astype(np.uint16)


def run(quick: bool = False, threads: int | None = None) -> list[dict]:
    """Time every kernel against its reference; one row per kernel. ``threads`` limits
    numba's threads (default: all cores; one gives steadier figures on a busy machine)."""
    if threads is not None:
        numba.set_num_threads(threads)
    size = 1024 if quick else 2048
    repeats = 3 if quick else 7
    rng = np.random.default_rng(1)
    frame = _frame(size)
    shape = frame.shape
    rows: list[dict] = []

    dark = rng.normal(10, 1, shape).astype(np.float32)
    scale = rng.uniform(0.9, 1.1, shape).astype(np.float32)
    bad = rng.random(shape) < 0.01
    out = np.empty(shape, np.float32)
    fill = np.float32(np.nan)
    rows.append(
        _measure(
            "calibration: dark, gain, mask",
            [calibration.correct_kernel],
            lambda: calibration.correct_kernel(frame, dark, scale, bad, fill, out),
            lambda: calibration.correct_reference(frame, dark, scale, bad, np.nan),
            repeats,
        )
    )
    segments = calibration.common_mode_segments(shape, (256, 256), per_row=True)
    corrected = calibration.correct_reference(frame, dark, np.ones_like(scale), bad, np.nan)
    work = corrected.copy()
    rows.append(
        _measure(
            "calibration: + common mode per row",
            [calibration.common_mode_kernel],
            lambda: (
                np.copyto(work, corrected),
                calibration.common_mode_kernel(work, segments, 50.0, scale, fill),
            ),
            lambda: calibration.correct_reference(frame, dark, scale, bad, np.nan, segments, 50.0),
            repeats,
        )
    )
    step = roi.RoiStatistics(
        rois={
            "all": [0, size, 0, size],
            "box": [100, 400, 200, 700],
            "arc": {"centre": [size / 2, size / 2], "radius": [size / 6, size / 4], "chi": [-45, 45]},
        }
    )
    tables = step.tables(shape)
    selections = {}
    for name, (r0, c0, member) in tables.items():
        selections[name] = np.zeros(shape, bool)
        selections[name][r0 : r0 + member.shape[0], c0 : c0 + member.shape[1]] = member
    rows.append(
        _measure(
            "roi: 3 ROIs (frame, box, arc)",
            [roi.roi_stats_kernel],
            lambda: step(frame, {}),
            lambda: [roi.roi_stats_reference(frame, s) for s in selections.values()],
            repeats,
        )
    )
    rows.append(
        _measure(
            "binning: 4 x 4 sum",
            [binning.bin_kernel],
            lambda: binning.bin_pixels(frame, 4),
            lambda: basic.bin_pixels_reference(frame, 4),
            repeats,
        )
    )
    pedestal = np.full(shape, 10.0)
    gain = np.full(shape, 5.0)
    counts = np.empty(shape, np.int32)
    rows.append(
        _measure(
            "photon count",
            [photon.photon_kernel],
            lambda: photon.photon_kernel(frame, pedestal, gain, 0.5, counts),
            lambda: photon.photon_reference(frame, pedestal, gain, 0.5),
            repeats,
        )
    )
    rows.append(
        _measure(
            "threshold",
            [photon.threshold_kernel],
            lambda: photon.threshold_kernel(frame, np.float32(25), np.float32(np.inf), out),
            lambda: photon.threshold_reference(frame, 25, np.inf),
            repeats,
        )
    )
    crystal = frame.astype(np.float32)
    for r, c in rng.uniform(20, size - 20, (40, 2)).astype(int):
        crystal[r - 1 : r + 2, c - 1 : c + 2] += 400
    finder = hits.HitFinder()
    bins, n_bins = finder.bins(shape)
    rules = {"min_snr": 6.0, "min_adc": 0.0, "min_pix": 2, "max_pix": 200, "iterations": 5}
    rows.append(
        _measure(
            "hit finder (40 peaks)",
            [hits.background_kernel, hits.candidate_kernel, hits.label_kernel],
            lambda: finder.find_peaks(crystal),
            lambda: hits.find_peaks_reference(crystal, bins, n_bins, **rules),
            repeats,
        )
    )
    rows.append(
        _measure(
            "centre of mass (scipy)",
            [dpc.com_kernel],
            lambda: dpc.com_kernel(frame, 0, size, 0, size, 25.0),
            lambda: dpc.com_reference(frame, (0, size, 0, size), 25.0),
            repeats,
        )
    )
    spectra = rng.poisson(5, (7, 4096)).astype(np.uint32)
    detectors = np.arange(7)
    starts, stops = np.arange(0, 4000, 200), np.arange(100, 4100, 200)
    windows = list(zip(starts, stops, strict=True))
    rows.append(
        _measure(
            "xrf: 7 x 4096 spectrum, 20 windows",
            [xrf.xrf_kernel],
            lambda: xrf.xrf_kernel(spectra, detectors, starts, stops),
            lambda: xrf.xrf_reference(spectra, detectors, windows),
            repeats * 10,
        )
    )
    n = 128 if quick else 256
    angles = np.linspace(0, 180, n, endpoint=False)
    filtered = tomo.ramp_filter(rng.normal(size=(n, n)))
    radians = np.radians(angles)
    image = np.empty((n, n))
    rows.append(
        _measure(
            f"tomo: back-projection {n} x {n}, {n} angles",
            [tomo.backproject_kernel],
            lambda: tomo.backproject_kernel(filtered, np.cos(radians), np.sin(radians), (n - 1) / 2, image),
            lambda: tomo.backproject_reference(filtered, angles, (n - 1) / 2, n),
            max(1, repeats // 2),
        )
    )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller frames, fewer repeats")
    parser.add_argument("--threads", type=int, help="numba threads (default: all cores)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = run(quick=args.quick, threads=args.threads)
    print(f"numba {numba.__version__}, {numba.get_num_threads()} threads ({numba.threading_layer()})")
    header = f"{'kernel':44} {'reference ms':>13} {'kernel ms':>10} {'speedup':>8} {'first call ms':>14}"
    print(header)
    print("-" * len(header))
    for row in rows:
        first = f"{row['first_call_ms']:.1f}{' (cache)' if row['from_cache'] else ''}"
        print(
            f"{row['kernel']:44} {row['reference_ms']:13.3f} {row['kernel_ms']:10.3f} {row['speedup']:7.1f}x {first:>14}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
