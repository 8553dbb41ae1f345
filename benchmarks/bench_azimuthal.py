"""Azimuthal integration and caking against pyFAI's fastest CPU method, same frame, same cores.

A 2048 x 2048 uint16 frame with powder rings (``config/geometry/demo.poni``) is
integrated to 1000 bins in 2theta, without pixel splitting and with bounding-box
splitting, by the ``azimuthal`` step and by pyFAI's ``integrate1d``; likewise caked
to 1000 x 360 bins by ``azimuthal2d`` and ``integrate2d``. For pyFAI every Cython
method that matches the splitting (histogram, CSR, CSC; LUT too in 1D) is timed and the
fastest is the reference. Both use all the process's cores: numba's threads and
pyFAI's OpenMP threads (``OMP_NUM_THREADS`` unset means all cores; set it and
``NUMBA_NUM_THREADS`` to 1 to compare one core each), with ``OMP_WAIT_POLICY=PASSIVE``
as in the workers unless set otherwise. Blocks of calls alternate
between the two so that load from elsewhere hits both alike; times are medians
(minima beside them: on a shared machine they show the cost without others' load),
after a first call that builds pyFAI's tables and loads (or compiles) our kernel
(``first_call_ms``; ``from_cache`` says whether numba's disk cache served it).
``setup_ms`` is the time to configure our step (geometry and pixel -> bin matrix).

    python -m benchmarks.bench_azimuthal [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numba
import numpy as np

from pipelines.steps import azimuthal

PONI = Path(__file__).resolve().parent.parent / "config" / "geometry" / "demo.poni"
NPT = 1000
NPT_AZIM = 360
ALGORITHMS_1D = ("histogram", "csr", "csc", "lut")
ALGORITHMS_2D = ("histogram", "csr", "csc")


def _frame(ai) -> np.ndarray:
    """Powder rings on a background, Poisson noise: a realistic uint16 detector frame."""
    tth = ai.center_array(ai.detector.max_shape, unit="2th_deg")
    chi = ai.center_array(ai.detector.max_shape, unit="chi_deg")
    rings = sum(np.exp(-(((tth - c) / 0.05) ** 2)) for c in (8.3, 9.6, 13.6, 16.0, 19.3, 21.0, 24.4, 26.3))
    texture = 1.0 + 0.3 * np.cos(np.radians(chi) * 2)
    rng = np.random.default_rng(0)
    return rng.poisson(50 + 2000 * rings * texture).astype(np.uint16)


def _alternating(
    calls: dict[str, Callable[[], object]], repeats: int, block: int = 4
) -> dict[str, tuple[float, float]]:
    """(median, minimum) time in ms of each call over ``repeats`` timings, taken in alternating blocks.

    Each block starts with an untimed call: pyFAI's and numba's OpenMP runtimes are
    separate, and threads of the one that ran last keep spinning for a moment.
    """
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(-(-repeats // block)):
        for name, call in calls.items():
            call()
            for _ in range(block):
                start = time.perf_counter()
                call()
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def _cache_hits() -> int:
    return sum(azimuthal.matrix_integrate.stats.cache_hits.values())


def _case(
    label: str, make_step: Callable, frame: np.ndarray, pyfai_calls: dict[str, Callable], repeats: int
) -> dict:
    start = time.perf_counter()
    step = make_step()
    setup_ms = (time.perf_counter() - start) * 1e3
    hits = _cache_hits()
    start = time.perf_counter()
    step(frame, {})
    first_ms = (time.perf_counter() - start) * 1e3
    from_cache = _cache_hits() > hits
    for call in pyfai_calls.values():
        call()  # pyFAI builds its look-up tables on the first call
    trial = _alternating(pyfai_calls, max(2, repeats // 3))
    fastest = min(trial, key=lambda name: trial[name][0])
    ours = "tangopipe"
    timed = _alternating({ours: lambda: step(frame, {}), fastest: pyfai_calls[fastest]}, repeats)
    return {
        "kernel": label,
        "reference": f"pyFAI {fastest}",
        "reference_ms": round(timed[fastest][0], 2),
        "kernel_ms": round(timed[ours][0], 2),
        "speedup": round(timed[fastest][0] / timed[ours][0], 1),
        "reference_min_ms": round(timed[fastest][1], 2),
        "kernel_min_ms": round(timed[ours][1], 2),
        "first_call_ms": round(first_ms, 1),
        "from_cache": from_cache,
        "setup_ms": round(setup_ms),
        "threads": numba.get_num_threads(),
    }


def run(quick: bool = False) -> list[dict]:
    """One row per case: our step against pyFAI's fastest method for the same splitting."""
    # As in the workers (devices/worker.py): idle OpenMP threads sleep rather than spin.
    # pyFAI and numba each load their own OpenMP runtime; spinning threads of the one
    # that ran last would otherwise steal the cores from the other.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import pyFAI

    logging.getLogger("pyFAI").setLevel(logging.ERROR)
    repeats = 7 if quick else 31
    ai = pyFAI.load(str(PONI))
    frame = _frame(ai)
    rows = []
    for split, pyfai_split in (("none", "no"), ("bbox", "bbox")):
        step = partial(
            azimuthal.AzimuthalIntegration, poni=str(PONI), npt=NPT, unit="2th_deg", pixel_splitting=split
        )
        calls = {
            f"({pyfai_split}, {algo}, cython)": (
                lambda m=(pyfai_split, algo, "cython"): ai.integrate1d(frame, NPT, unit="2th_deg", method=m)
            )
            for algo in ALGORITHMS_1D
        }
        rows.append(_case(f"azimuthal 1D, {NPT} bins, splitting {split}", step, frame, calls, repeats))
    if not quick:
        for split, pyfai_split in (("none", "no"), ("bbox", "bbox")):
            step = partial(
                azimuthal.Caking,
                poni=str(PONI),
                npt=NPT,
                npt_azim=NPT_AZIM,
                unit="2th_deg",
                pixel_splitting=split,
            )
            calls = {
                f"({pyfai_split}, {algo}, cython)": (
                    lambda m=(pyfai_split, algo, "cython"): ai.integrate2d(
                        frame, NPT, NPT_AZIM, unit="2th_deg", method=m
                    )
                )
                for algo in ALGORITHMS_2D
            }
            rows.append(_case(f"caking {NPT_AZIM} x {NPT}, splitting {split}", step, frame, calls, repeats))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1D only, fewer repeats")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = run(quick=args.quick)
    print(
        f"numba {numba.__version__}: {numba.get_num_threads()} threads ({numba.threading_layer()}); "
        f"pyFAI OpenMP threads: {os.environ.get('OMP_NUM_THREADS', 'all cores')}; "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; "
        f"cores available: {len(os.sched_getaffinity(0))}"
    )
    header = (
        f"{'case':40} {'reference':28} {'ref ms':>8} {'ours ms':>8} {'speedup':>8} "
        f"{'ref min':>8} {'ours min':>8} {'first call ms':>14} {'setup ms':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        first = f"{row['first_call_ms']:.1f}{' (cache)' if row['from_cache'] else ''}"
        print(
            f"{row['kernel']:40} {row['reference']:28} {row['reference_ms']:8.2f} {row['kernel_ms']:8.2f} "
            f"{row['speedup']:7.1f}x {row['reference_min_ms']:8.2f} {row['kernel_min_ms']:8.2f} "
            f"{first:>14} {row['setup_ms']:9d}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
