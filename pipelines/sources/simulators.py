"""Simulated data for each modality: diffraction rings, XRF spectra over a scan grid, a beam
deflected by a phase object (DPC), sparse Bragg peaks (hit finding), tomographic projections.

Each source makes frames that depend only on (seed, index), and for the mapping sources on
the scan grid, so any frame can be made again with ``frame`` to check a result against.
Each also tells the truth it simulated (ring angles, element concentrations, beam shifts,
peak lists, the phantom), so tests can assert that a pipeline finds the physics.

Mapping sources (MCA, DPC) take the scan grid from StartScan's metadata (``scan_shape``
[n_slow, n_fast] and ``snake``), else from their own parameters, and copy it into every
frame's metadata, which is all the steps see (``map_position`` needs it). The scan covers
the same area of the sample whatever the grid: more points sample it more finely.
``scan_defaults()`` is the StartScan metadata a scan needs when none is given (``tangopipe
demo`` uses it).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import geometry
from pipelines.steps.maps import grid_position, grid_shape

from . import SourceError

#: What a random generator is for (see ``_SimulatedSource._rng``).
SAMPLE, NOISE, PEAKS = 1, 2, 3

DEFAULT_PONI = str(Path(__file__).resolve().parents[2] / "config" / "geometry" / "demo.poni")


def _check(source: str, checks: dict[str, tuple[Any, bool, str]]) -> None:
    """Raise for the first failed check: name -> (value, ok, what was expected)."""
    for name, (value, ok, expected) in checks.items():
        if not ok:
            raise ValueError(f"{source}: {name} = {value!r}; expected {expected}")


def _number(value: Any, low: float = -math.inf, high: float = math.inf) -> bool:
    """A finite number (not a bool) in [low, high]."""
    return (
        isinstance(value, int | float | np.number)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and low <= value <= high
    )


def _integer(value: Any, low: int = -(2**62)) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= low


def _pair(value: Any, test: Callable[[Any], bool]) -> bool:
    return isinstance(value, list | tuple) and len(value) == 2 and all(test(v) for v in value)


def _frame_shape(source: str, shape: Any, minimum: int) -> tuple[int, int]:
    ok = _pair(shape, lambda n: _integer(n, minimum))
    _check(source, {"shape": (shape, ok, f"[rows, cols], two integers >= {minimum}")})
    return int(shape[0]), int(shape[1])


def _unsigned_dtype(source: str, dtype: Any) -> np.dtype:
    try:
        out = np.dtype(dtype)
    except TypeError:
        out = None
    ok = out is not None and out.kind == "u"
    _check(source, {"dtype": (dtype, ok, "an unsigned integer type (uint16, uint32)")})
    return out


def _soft_disc(r: np.ndarray, radius: float, edge: float) -> np.ndarray:
    """1 inside ``radius``, 0 outside, a tanh edge ``edge`` wide (sub-pixel positions render smoothly)."""
    return 0.5 * (1 - np.tanh((r - radius) / edge))


class _SimulatedSource:
    """Pacing, stopping and per-scan bookkeeping shared by the simulators."""

    kind = "simulator"

    def __init__(self, *, rate_hz: float, seed: int):
        _check(
            self.kind,
            {
                "rate_hz": (rate_hz, _number(rate_hz, 0), "a number >= 0 (0: as fast as possible)"),
                "seed": (seed, _integer(seed), "an integer"),
            },
        )
        self.rate_hz = float(rate_hz)
        self.seed = int(seed)
        self._stop = threading.Event()

    def _rng(self, purpose: int, index: int = 0) -> np.random.Generator:
        """The generator of one ``purpose`` (SAMPLE, NOISE, ...) for frame ``index``: the same
        numbers whenever the same frame is made, independent between purposes and frames.
        (Keys all have three words: numpy's seeding ignores trailing zero words.)"""
        return np.random.default_rng([self.seed, purpose, index])

    def scan_defaults(self) -> dict[str, Any]:
        """StartScan metadata for a scan started without any: its frames (and grid when mapping)."""
        return {"frames": self.default_frames}

    def _scan(self, scan: Mapping[str, Any]) -> dict[str, Any]:
        """This scan's settings from StartScan's metadata and the defaults; raises SourceError."""
        return {"frames": int(scan.get("frames", self.scan_defaults()["frames"]))}

    def _make(self, index: int, settings: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        """Frame ``index`` of a scan and its metadata."""
        raise NotImplementedError

    # -- the FrameSource protocol
    def frames(self, scan: Mapping[str, Any]) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
        settings = self._scan(scan)
        rate_hz = float(scan.get("rate_hz", self.rate_hz))  # a scan may ask for another rate
        period = 1.0 / rate_hz if rate_hz > 0 else 0.0
        self._stop.clear()
        start = time.perf_counter()
        for i in range(settings["frames"]):
            if self._stop.is_set():
                return
            if period:
                delay = start + i * period - time.perf_counter()
                if delay > 0 and self._stop.wait(delay):
                    return
            frame, meta = self._make(i, settings)
            meta["exposure_time"] = period
            yield frame, meta

    def stop(self) -> None:
        self._stop.set()

    def describe(self) -> dict[str, Any]:
        return {"detector": self.kind, "rate_hz": self.rate_hz, "seed": self.seed}


class _MappingSource(_SimulatedSource):
    """A source whose frames are the points of a 2D scan over the sample."""

    def __init__(self, *, scan_shape: Any, snake: bool, rate_hz: float, seed: int):
        super().__init__(rate_hz=rate_hz, seed=seed)
        try:
            self.scan_shape = grid_shape(scan_shape)
        except ValueError as exc:
            raise ValueError(f"{self.kind}: {exc}") from None
        _check(self.kind, {"snake": (snake, isinstance(snake, bool), "true or false")})
        self.snake = snake

    def scan_defaults(self) -> dict[str, Any]:
        n_slow, n_fast = self.scan_shape
        return {"frames": n_slow * n_fast, "scan_shape": [n_slow, n_fast], "snake": self.snake}

    def _grid(self, scan_shape: Any = None, snake: bool | None = None) -> tuple[tuple[int, int], bool]:
        try:
            shape = self.scan_shape if scan_shape is None else grid_shape(scan_shape)
        except ValueError as exc:
            raise SourceError(f"{self.kind}: StartScan metadata {exc}") from None
        return shape, self.snake if snake is None else bool(snake)

    def _scan(self, scan: Mapping[str, Any]) -> dict[str, Any]:
        shape, snake = self._grid(scan.get("scan_shape"), scan.get("snake"))
        points = shape[0] * shape[1]
        frames = int(scan.get("frames", points))
        if frames > points:
            raise SourceError(
                f"{self.kind}: the scan asks for {frames} frames but its grid {list(shape)} has {points} "
                f"points; give StartScan a scan_shape [n_slow, n_fast] with at least {frames} points"
            )
        return {"frames": frames, "scan_shape": shape, "snake": snake}

    def position(self, index: int, scan_shape: Any = None, snake: bool | None = None) -> tuple[float, float]:
        """Where point ``index`` lies on the sample: (v, u) in (0, 1), v along the slow axis."""
        shape, snake = self._grid(scan_shape, snake)
        row, col = grid_position(index, shape, snake)
        return (row + 0.5) / shape[0], (col + 0.5) / shape[1]

    def grid_coordinates(self, scan_shape: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """(v, u) of every pixel [row, col] of a map of the grid."""
        (n_slow, n_fast), _ = self._grid(scan_shape)
        v = (np.arange(n_slow)[:, None] + 0.5) / n_slow
        u = (np.arange(n_fast)[None, :] + 0.5) / n_fast
        return np.broadcast_to(v, (n_slow, n_fast)), np.broadcast_to(u, (n_slow, n_fast))

    def frame(self, index: int, scan_shape: Any = None, snake: bool | None = None) -> np.ndarray:
        raise NotImplementedError

    def _make(self, index: int, settings: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        shape, snake = settings["scan_shape"], settings["snake"]
        return self.frame(index, shape, snake), {"scan_shape": list(shape), "snake": snake}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "scan_shape": list(self.scan_shape), "snake": self.snake}


# ------------------------------------------------------------------------------------ XRD


class SimulatedDiffraction(_SimulatedSource):
    """Powder diffraction on an area detector placed as a PONI file says.

    Rings sit at the Bragg angles ``2 theta = 2 asin(wavelength / 2d)`` of ``d_spacings``
    (Angstrom; default: the first six reflections of an fcc cell with a = 11.5 A), Gaussian
    in 2 theta (sigma ``ring_width_deg``), seen through each pixel's solid angle and the
    beam's ``polarization`` (pyFAI's factor); rings listed in ``textured`` (by number) vary
    as ``1 + texture * cos(2 chi)`` around the ring. Besides: air scatter, Poisson noise, a
    beamstop with its arm, gaps between detector modules (0) and hot pixels (the dtype's
    maximum). :meth:`bad_pixel_mask` gives the pixels a calibration must mask; it depends on
    the shape only, as a real detector's defects do not change with the sample.

    As in ``simulator``, a few ring patterns (1, 1.15 and 1.3 times nominal) and air-scatter
    patterns are drawn once with Poisson noise; frame ``i`` is ring pattern ``i % 3`` plus
    scatter pattern ``i % 4``: counting statistics are right (a sum of Poisson draws is
    Poisson), frames come at full rate and any can be made again from its index.
    """

    kind = "simulator_xrd"
    RING_VARIANTS = 3
    SCATTER_VARIANTS = 4
    FCC_REFLECTIONS = ((1, 1, 1), (2, 0, 0), (2, 2, 0), (3, 1, 1), (2, 2, 2), (4, 0, 0))
    DEFAULT_INTENSITIES = (800.0, 350.0, 500.0, 300.0, 120.0, 200.0)

    def __init__(
        self,
        *,
        poni: str = DEFAULT_PONI,
        shape: list | None = None,
        dtype: str = "uint16",
        d_spacings: list | None = None,
        intensities: list | None = None,
        ring_width_deg: float = 0.04,
        textured: list | None = None,
        texture: float = 0.5,
        air_scatter: float = 20.0,
        polarization: float = 0.99,
        beamstop_radius: float = 30.0,
        rate_hz: float = 10.0,
        frames: int = 100,
        seed: int = 7,
    ):
        super().__init__(rate_hz=rate_hz, seed=seed)
        k = self.kind
        self.poni = str(poni)
        self.geometry = geometry.read_poni(self.poni)
        _check(k, {"poni": (poni, self.geometry.wavelength is not None, "a PONI file with a Wavelength")})
        if shape is None:
            no_shape = "[rows, cols]: the PONI file has no max_shape"
            _check(k, {"shape": (shape, self.geometry.shape is not None, no_shape)})
            shape = list(self.geometry.shape)
        self.shape = _frame_shape(k, shape, minimum=64)
        self.dtype = _unsigned_dtype(k, dtype)
        if d_spacings is None:
            d_spacings = [11.5 / math.sqrt(h * h + kk * kk + n * n) for h, kk, n in self.FCC_REFLECTIONS]
        half_wavelength = self.geometry.wavelength * 1e10 / 2
        valid_d = isinstance(d_spacings, list) and bool(d_spacings) and all(_number(d) for d in d_spacings)
        _check(
            k,
            {
                "d_spacings": (
                    d_spacings,
                    valid_d and all(d > half_wavelength for d in d_spacings),
                    f"a list of lattice spacings in Angstrom above half the wavelength ({half_wavelength:.4f})",
                ),
            },
        )
        self.d_spacings = [float(d) for d in d_spacings]
        n_rings = len(self.d_spacings)
        if intensities is None:
            intensities = [
                self.DEFAULT_INTENSITIES[n % len(self.DEFAULT_INTENSITIES)] for n in range(n_rings)
            ]
        textured = [] if textured is None else textured
        _check(
            k,
            {
                "intensities": (
                    intensities,
                    isinstance(intensities, list)
                    and len(intensities) == n_rings
                    and all(_number(v, 0) for v in intensities),
                    f"{n_rings} counts >= 0, one per d-spacing",
                ),
                "ring_width_deg": (ring_width_deg, _number(ring_width_deg, 1e-4), "degrees > 0"),
                "textured": (
                    textured,
                    isinstance(textured, list) and all(_integer(n, 0) and n < n_rings for n in textured),
                    f"a list of ring numbers 0..{n_rings - 1}",
                ),
                "texture": (texture, _number(texture, 0, 1), "a number in [0, 1]"),
                "air_scatter": (air_scatter, _number(air_scatter, 0), "counts per pixel >= 0"),
                "polarization": (polarization, _number(polarization, -1, 1), "a number in [-1, 1]"),
                "beamstop_radius": (beamstop_radius, _number(beamstop_radius, 0), "pixels >= 0"),
                "frames": (frames, _integer(frames, 0), "an integer >= 0"),
            },
        )
        self.intensities = [float(v) for v in intensities]
        self.ring_width_deg = float(ring_width_deg)
        self.textured = [int(n) for n in textured]
        self.texture = float(texture)
        self.air_scatter = float(air_scatter)
        self.polarization = float(polarization)
        self.beamstop_radius = float(beamstop_radius)
        self.default_frames = int(frames)
        self._lock = threading.Lock()
        self._geometry_tables: dict[str, np.ndarray] | None = None
        self._patterns: tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray] | None = None

    @property
    def two_theta_deg(self) -> np.ndarray:
        """Bragg angle of each ring, degrees."""
        wavelength = self.geometry.wavelength * 1e10
        return np.degrees(2 * np.arcsin(wavelength / (2 * np.asarray(self.d_spacings))))

    def ring_gain(self, index: int) -> float:
        """How much stronger than nominal the rings of frame ``index`` are."""
        return 1 + 0.15 * (index % self.RING_VARIANTS)

    def _tables(self) -> dict[str, np.ndarray]:
        """Per-pixel 2 theta (degrees), chi (radians) and response (solid angle x polarisation
        x beamstop shade), computed once."""
        with self._lock:
            if self._geometry_tables is None:
                response = geometry.solid_angle_array(self.geometry, self.shape)
                response *= geometry.polarization_array(self.geometry, self.polarization, self.shape)
                if self.beamstop_radius > 0:
                    response[self._beamstop(self.beamstop_radius)] *= 0.01
                self._geometry_tables = {
                    "tth": np.degrees(geometry.two_theta_array(self.geometry, self.shape)),
                    "chi": geometry.chi_array(self.geometry, self.shape),
                    "response": response,
                }
        return self._geometry_tables

    def _beamstop(self, radius: float) -> np.ndarray:
        """Pixels behind a beamstop of ``radius`` on the direct beam and its arm (up to row 0)."""
        x, y = self.geometry.with_shape(self.shape).beam_center
        rows, cols = np.ogrid[0 : self.shape[0], 0 : self.shape[1]]
        disc = np.hypot(rows + 0.5 - y, cols + 0.5 - x) < radius
        arm = (np.abs(cols + 0.5 - x) < radius / 3) & (rows + 0.5 < y)
        return disc | arm

    def _gaps_and_hot(self) -> tuple[np.ndarray, np.ndarray]:
        """Flat indices of the module gaps (8 pixels between 512 x 1024 modules) and of hot pixels."""
        rows, cols = self.shape
        gap = np.zeros(self.shape, dtype=bool)
        for r in range(512, rows, 512):
            gap[r - 4 : r + 4, :] = True
        for c in range(1024, cols, 1024):
            gap[:, c - 4 : c + 4] = True
        pixels = np.flatnonzero(~gap)  # hot pixels are real pixels, not gaps
        hot = np.random.default_rng(2048).choice(pixels, size=max(1, pixels.size // 20000), replace=False)
        return np.flatnonzero(gap), np.sort(hot)

    def bad_pixel_mask(self) -> np.ndarray:
        """Pixels to mask (True = bad): beamstop and arm with a 6-pixel margin, module gaps, hot pixels."""
        if self.beamstop_radius > 0:
            mask = self._beamstop(self.beamstop_radius + 6)
        else:
            mask = np.zeros(self.shape, dtype=bool)
        gaps, hot = self._gaps_and_hot()
        mask.flat[gaps] = True
        mask.flat[hot] = True
        return mask

    def _rings(self) -> np.ndarray:
        """Mean ring counts per pixel at nominal intensity, before the detector's response."""
        tables = self._tables()
        tth, chi = tables["tth"], tables["chi"]
        rings = np.zeros(self.shape)
        for n, (centre, height) in enumerate(zip(self.two_theta_deg, self.intensities, strict=True)):
            near = np.abs(tth - centre) < 8 * self.ring_width_deg
            profile = height * np.exp(-0.5 * ((tth[near] - centre) / self.ring_width_deg) ** 2)
            if n in self.textured:
                profile *= 1 + self.texture * np.cos(2 * chi[near])
            rings[near] += profile
        return rings

    def _scatter(self) -> np.ndarray:
        """Mean air-scatter counts per pixel, falling with 2 theta, before the detector's response."""
        return self.air_scatter * (0.3 + 0.7 * np.exp(-self._tables()["tth"] / 10.0))

    def expected_image(self, index: int = 0) -> np.ndarray:
        """Mean counts per pixel of frame ``index`` (float64), before noise and detector defects."""
        return (self.ring_gain(index) * self._rings() + self._scatter()) * self._tables()["response"]

    def _build(self) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray]:
        """The noisy ring and scatter patterns, the gaps and the hot pixels, made on first use."""
        if self._patterns is None:
            response = self._tables()["response"]
            rings, scatter = self._rings() * response, self._scatter() * response
            with self._lock:
                if self._patterns is None:
                    rng = self._rng(NOISE)
                    top = np.iinfo(self.dtype).max // 2

                    def draw(mean: np.ndarray) -> np.ndarray:
                        return np.minimum(rng.poisson(mean), top).astype(self.dtype)

                    ring_patterns = [draw(rings * self.ring_gain(v)) for v in range(self.RING_VARIANTS)]
                    scatter_patterns = [draw(scatter) for _ in range(self.SCATTER_VARIANTS)]
                    self._patterns = (ring_patterns, scatter_patterns, *self._gaps_and_hot())
        return self._patterns

    def frame(self, index: int) -> np.ndarray:
        """Frame ``index`` (a new array)."""
        rings, scatter, gaps, hot = self._build()
        out = rings[index % self.RING_VARIANTS] + scatter[index % self.SCATTER_VARIANTS]
        out.flat[gaps] = 0
        out.flat[hot] = np.iinfo(self.dtype).max
        return out

    def _make(self, index: int, settings: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        return self.frame(index), {}

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "shape": list(self.shape),
            "dtype": self.dtype.name,
            "pixel_size_um": self.geometry.pixel1 * 1e6,
            "poni": self.poni,
            "d_spacings": self.d_spacings,
            "two_theta_deg": [float(v) for v in self.two_theta_deg],
        }


# ------------------------------------------------------------------------------------ XRF

#: K alpha1, K beta1 emission and K absorption edge energies, keV (X-ray Data Booklet).
K_LINES: dict[str, tuple[float, float, float]] = {
    "K": (3.314, 3.590, 3.607),
    "Ca": (3.692, 4.013, 4.038),
    "Ti": (4.511, 4.932, 4.966),
    "Cr": (5.415, 5.947, 5.989),
    "Mn": (5.899, 6.490, 6.539),
    "Fe": (6.404, 7.058, 7.112),
    "Co": (6.930, 7.649, 7.709),
    "Ni": (7.478, 8.265, 8.333),
    "Cu": (8.048, 8.905, 8.979),
    "Zn": (8.639, 9.572, 9.659),
    "Ga": (9.252, 10.264, 10.367),
    "As": (10.544, 11.726, 11.867),
    "Se": (11.222, 12.496, 12.658),
    "Br": (11.924, 13.291, 13.474),
    "Sr": (14.165, 15.836, 16.105),
}
K_BETA_RATIO = 0.13


def detector_sigma_kev(energy_kev: Any) -> Any:
    """Energy resolution (Gaussian sigma, keV) of a silicon drift detector: 100 eV FWHM of
    electronic noise and Fano statistics, about 140 eV FWHM at Mn K alpha."""
    return np.sqrt((0.100 / 2.3548) ** 2 + 0.114 * 3.85e-3 * np.asarray(energy_kev))


class SimulatedMCA(_MappingSource):
    """XRF spectra of a raster scan over a sample holding ``elements`` in different places.

    Each element has its own concentration (0..1) over the sample: a blob, a gradient, a
    ring, stripes, particles, in turn, placed by ``seed`` (:meth:`concentration_map`). A
    point's spectrum holds, per element, a K alpha line of ``counts`` x concentration and a
    K beta line 0.13 times that, the elastic and Compton peaks of the beam (``scatter``), and
    a flat continuum; lines are broadened by the detector's resolution, counts are Poisson.
    Frames are (n_channels,) for one detector element and (n_detectors, n_channels) for
    more, which share the counts. Channel c has energy offset + gain * c (keV), as the
    ``xrf`` step reads it.
    """

    kind = "simulator_mca"

    def __init__(
        self,
        *,
        elements: list | None = None,
        counts: float = 2000.0,
        n_channels: int = 2048,
        n_detectors: int = 1,
        energy_offset: float = 0.0,
        energy_gain: float = 0.01,
        beam_energy_kev: float = 12.0,
        scatter: float = 3000.0,
        continuum: float = 0.5,
        scan_shape: list | None = None,
        snake: bool = True,
        rate_hz: float = 100.0,
        seed: int = 7,
    ):
        scan_shape = [20, 30] if scan_shape is None else scan_shape
        super().__init__(scan_shape=scan_shape, snake=snake, rate_hz=rate_hz, seed=seed)
        k = self.kind
        elements = ["Ca", "Fe", "Cu", "Zn"] if elements is None else elements
        known = isinstance(elements, list) and bool(elements) and all(e in K_LINES for e in elements)
        _check(
            k,
            {
                "elements": (
                    elements,
                    known and len(set(elements)) == len(elements),
                    f"a list of different element symbols from {', '.join(K_LINES)}",
                ),
                "beam_energy_kev": (beam_energy_kev, _number(beam_energy_kev, 1.0), "keV >= 1"),
            },
        )
        for name in elements:
            edge = K_LINES[name][2]
            excited = (
                f"elements the beam excites: the K edge of {name} ({edge} keV) is above {beam_energy_kev} keV"
            )
            _check(k, {"elements": (elements, edge < beam_energy_kev, excited)})
        _check(
            k,
            {
                "counts": (counts, _number(counts, 1e-9), "K alpha counts at concentration 1, > 0"),
                "n_channels": (n_channels, _integer(n_channels, 16), "an integer >= 16"),
                "n_detectors": (n_detectors, _integer(n_detectors, 1), "an integer >= 1"),
                "energy_offset": (energy_offset, _number(energy_offset), "keV of channel 0"),
                "energy_gain": (energy_gain, _number(energy_gain, 1e-9), "keV per channel > 0"),
                "scatter": (scatter, _number(scatter, 0), "counts in the elastic peak, >= 0"),
                "continuum": (continuum, _number(continuum, 0), "counts per channel >= 0"),
            },
        )
        self.elements = list(elements)
        self.counts = float(counts)
        self.n_channels, self.n_detectors = int(n_channels), int(n_detectors)
        self.energy_offset, self.energy_gain = float(energy_offset), float(energy_gain)
        self.beam_energy_kev = float(beam_energy_kev)
        self.scatter, self.continuum = float(scatter), float(continuum)
        self.energy = self.energy_offset + self.energy_gain * np.arange(self.n_channels)
        self._lines = np.stack([self._element_lines(name) for name in self.elements])
        self._background = self._scatter_background()
        rng = self._rng(SAMPLE)
        self._maps = [self._pattern(n, rng) for n in range(len(self.elements))]

    def _peak(self, centre: float, area: float, sigma: float | None = None) -> np.ndarray:
        """Counts per channel of a Gaussian line holding ``area`` counts."""
        s = float(detector_sigma_kev(centre)) if sigma is None else sigma
        density = np.exp(-0.5 * ((self.energy - centre) / s) ** 2) / (s * math.sqrt(2 * math.pi))
        return area * self.energy_gain * density

    def _element_lines(self, name: str) -> np.ndarray:
        alpha, beta, _ = K_LINES[name]
        return self._peak(alpha, 1.0) + self._peak(beta, K_BETA_RATIO)

    def _scatter_background(self) -> np.ndarray:
        e0 = self.beam_energy_kev
        compton = e0 / (1 + e0 / 511.0)  # scattered at 90 degrees
        spectrum = self._peak(e0, self.scatter)
        spectrum += self._peak(compton, 1.5 * self.scatter, sigma=2.5 * float(detector_sigma_kev(compton)))
        spectrum += self.continuum * ((self.energy > 1.0) & (self.energy < e0))
        return spectrum

    @staticmethod
    def _pattern(n: int, rng: np.random.Generator) -> Callable[[Any, Any], Any]:
        """The concentration (0..1) of the n-th element as a function of (v, u)."""
        cv, cu = rng.uniform(0.3, 0.7, 2)
        angle = rng.uniform(0, math.pi)
        along = math.cos(angle), math.sin(angle)
        kind = n % 5
        if kind == 0:  # a blob
            return lambda v, u: np.exp(-((u - cu) ** 2 + (v - cv) ** 2) / (2 * 0.15**2))
        if kind == 1:  # a gradient across the sample
            return lambda v, u: 0.1 + 0.9 * np.clip(0.5 + (u - 0.5) * along[0] + (v - 0.5) * along[1], 0, 1)
        if kind == 2:  # a ring, as a cell wall or a grain boundary
            return lambda v, u: np.exp(-0.5 * ((np.hypot(u - cu, v - cv) - 0.28) / 0.06) ** 2)
        if kind == 3:  # stripes
            return lambda v, u: 0.5 + 0.5 * np.sin(2 * math.pi * 2.5 * (u * along[0] + v * along[1]))
        centres = rng.uniform(0.15, 0.85, (6, 2))  # particles

        def particles(v: Any, u: Any) -> Any:
            nearest = np.min([np.hypot(u - a, v - b) for a, b in centres], axis=0)
            return _soft_disc(nearest, 0.07, 0.015)

        return particles

    def concentration_map(self, element: str, scan_shape: Any = None) -> np.ndarray:
        """Concentration of ``element`` at every point of a grid, as a map [row, col]."""
        if element not in self.elements:
            raise KeyError(f"{self.kind}: element {element!r} is not simulated; elements are {self.elements}")
        v, u = self.grid_coordinates(scan_shape)
        return np.asarray(self._maps[self.elements.index(element)](v, u), dtype=np.float64)

    def concentrations(
        self, index: int, scan_shape: Any = None, snake: bool | None = None
    ) -> dict[str, float]:
        """Concentration of each element at point ``index``."""
        v, u = self.position(index, scan_shape, snake)
        return {name: float(f(v, u)) for name, f in zip(self.elements, self._maps, strict=True)}

    def expected_spectrum(self, index: int, scan_shape: Any = None, snake: bool | None = None) -> np.ndarray:
        """Mean counts per channel at point ``index``, all detector elements together."""
        c = np.array(list(self.concentrations(index, scan_shape, snake).values()))
        return self.counts * c @ self._lines + self._background

    def frame(self, index: int, scan_shape: Any = None, snake: bool | None = None) -> np.ndarray:
        """The spectrum (spectra) of point ``index``, uint32 counts."""
        mean = self.expected_spectrum(index, scan_shape, snake) / self.n_detectors
        spectra = self._rng(NOISE, index).poisson(mean, (self.n_detectors, self.n_channels)).astype(np.uint32)
        return spectra[0] if self.n_detectors == 1 else spectra

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "elements": self.elements,
            "n_channels": self.n_channels,
            "n_detectors": self.n_detectors,
            "energy_offset_kev": self.energy_offset,
            "energy_gain_kev": self.energy_gain,
            "beam_energy_kev": self.beam_energy_kev,
        }


# ------------------------------------------------------------------------------------ DPC


class SimulatedDPC(_MappingSource):
    """A pixel detector in the far field of a scanned focused beam: the bright-field disc.

    The sample is a weak phase object (``cells`` overlapping Gaussian cells placed by
    ``seed``) whose phase gradient deflects the beam: the disc moves from ``centre`` by
    :meth:`beam_shift`, at most ``max_shift`` pixels, and dims by the sample's absorption
    (optical depth up to ``absorption`` where it is thickest, :meth:`transmission`).
    ``counts`` photons fall in the disc without sample and ``background`` photons on
    every pixel; Poisson noise.
    """

    kind = "simulator_dpc"

    def __init__(
        self,
        *,
        shape: list | None = None,
        dtype: str = "uint16",
        disc_radius: float = 16.0,
        centre: list | None = None,
        max_shift: float = 2.0,
        counts: float = 100000.0,
        absorption: float = 0.3,
        background: float = 0.5,
        cells: int = 5,
        scan_shape: list | None = None,
        snake: bool = False,
        rate_hz: float = 200.0,
        seed: int = 7,
    ):
        scan_shape = [32, 32] if scan_shape is None else scan_shape
        super().__init__(scan_shape=scan_shape, snake=snake, rate_hz=rate_hz, seed=seed)
        k = self.kind
        self.shape = _frame_shape(k, [128, 128] if shape is None else shape, minimum=8)
        self.dtype = _unsigned_dtype(k, dtype)
        centre = [(self.shape[0] - 1) / 2, (self.shape[1] - 1) / 2] if centre is None else centre
        _check(
            k,
            {
                "centre": (centre, _pair(centre, _number), "[row, col] of the undeflected disc"),
                "disc_radius": (disc_radius, _number(disc_radius, 1), "pixels >= 1"),
                "max_shift": (max_shift, _number(max_shift, 0), "pixels >= 0"),
                "counts": (counts, _number(counts, 1e-9), "photons in the disc, > 0"),
                "absorption": (absorption, _number(absorption, 0), "an optical depth >= 0"),
                "background": (background, _number(background, 0), "photons per pixel >= 0"),
                "cells": (cells, _integer(cells, 1), "an integer >= 1"),
            },
        )
        reach = disc_radius + max_shift + 2
        fits = all(reach <= c <= n - 1 - reach for c, n in zip(centre, self.shape, strict=True))
        expected = f"a disc that stays on the {list(self.shape)} detector around {list(centre)} when moved by max_shift"
        _check(k, {"disc_radius": (disc_radius, fits, expected)})
        self.disc_radius, self.centre = float(disc_radius), (float(centre[0]), float(centre[1]))
        self.max_shift, self.counts = float(max_shift), float(counts)
        self.absorption, self.background = float(absorption), float(background)
        rng = self._rng(SAMPLE)
        self._cells = np.column_stack(
            [
                rng.uniform(0.2, 0.8, cells),  # v
                rng.uniform(0.2, 0.8, cells),  # u
                rng.uniform(0.08, 0.16, cells),  # width
                rng.uniform(0.5, 1.0, cells),  # height
            ]
        )
        v, u = np.meshgrid(np.linspace(0, 1, 257), np.linspace(0, 1, 257), indexing="ij")
        thickness, grad_v, grad_u = self._phase(v, u)
        steepest = float(np.hypot(grad_v, grad_u).max())
        self._shift_scale = self.max_shift / steepest if steepest > 0 else 0.0
        self._thickest = float(thickness.max())
        rows, cols = np.mgrid[0 : self.shape[0], 0 : self.shape[1]]
        self._rows, self._cols = rows.astype(np.float64), cols.astype(np.float64)
        r = np.hypot(self._rows - self.centre[0], self._cols - self.centre[1])
        self._disc_area = float(_soft_disc(r, self.disc_radius, 0.5).sum())

    def _phase(self, v: Any, u: Any) -> tuple[Any, Any, Any]:
        """The sample's phase (proportional to its thickness) at (v, u) and its gradient along v and u."""
        phase, grad_v, grad_u = np.zeros(np.shape(v)), np.zeros(np.shape(v)), np.zeros(np.shape(v))
        for cv, cu, width, height in self._cells:
            g = height * np.exp(-((v - cv) ** 2 + (u - cu) ** 2) / (2 * width**2))
            phase += g
            grad_v -= g * (v - cv) / width**2
            grad_u -= g * (u - cu) / width**2
        return phase, grad_v, grad_u

    def beam_shift(
        self, index: int, scan_shape: Any = None, snake: bool | None = None
    ) -> tuple[float, float]:
        """(rows, cols) by which the disc of point ``index`` is moved from ``centre``."""
        v, u = self.position(index, scan_shape, snake)
        _, grad_v, grad_u = self._phase(v, u)
        return float(grad_v * self._shift_scale), float(grad_u * self._shift_scale)

    def shift_maps(self, scan_shape: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """The beam shift (rows, cols) at every point of a grid, as two maps [row, col]."""
        v, u = self.grid_coordinates(scan_shape)
        _, grad_v, grad_u = self._phase(v, u)
        return grad_v * self._shift_scale, grad_u * self._shift_scale

    def transmission(self, index: int, scan_shape: Any = None, snake: bool | None = None) -> float:
        """Fraction of the beam the sample lets through at point ``index``."""
        v, u = self.position(index, scan_shape, snake)
        return float(np.exp(-self.absorption * self._phase(v, u)[0] / self._thickest))

    def expected_frame(self, index: int, scan_shape: Any = None, snake: bool | None = None) -> np.ndarray:
        """Mean photons per pixel at point ``index`` (float64)."""
        d_row, d_col = self.beam_shift(index, scan_shape, snake)
        r = np.hypot(self._rows - self.centre[0] - d_row, self._cols - self.centre[1] - d_col)
        level = self.counts * self.transmission(index, scan_shape, snake) / self._disc_area
        return level * _soft_disc(r, self.disc_radius, 0.5) + self.background

    def frame(self, index: int, scan_shape: Any = None, snake: bool | None = None) -> np.ndarray:
        """The detector frame at point ``index``."""
        counts = self._rng(NOISE, index).poisson(self.expected_frame(index, scan_shape, snake))
        return np.minimum(counts, np.iinfo(self.dtype).max).astype(self.dtype)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "shape": list(self.shape),
            "dtype": self.dtype.name,
            "disc_radius": self.disc_radius,
            "centre": list(self.centre),
            "max_shift": self.max_shift,
        }


# ----------------------------------------------------------------------------------- hits


class SimulatedHits(_SimulatedSource):
    """Serial crystallography on an integrating detector: mostly blanks, now and then a crystal.

    Frames are in ADU: ``pedestal`` + ``gain`` x photons + Gaussian read noise (``read_noise``
    ADU). Every frame has a diffuse background (``background`` photons per pixel and a
    solvent ring of ``ring_photons`` at ``ring_radius`` pixels from ``centre``); a fraction
    ``hit_fraction`` of the frames also holds ``peaks_per_hit`` Bragg peaks: Gaussian spots
    of ``spot_sigma`` pixels with 80 + exponential(``peak_photons``) photons each.
    :meth:`is_hit` and :meth:`peaks` say which frames are hits and where their peaks are.

    The background's Poisson draws and the read noise are made once, a few of each; frame
    ``i`` uses background ``i % 7`` and read noise ``i % 5`` plus its own spots' Poisson
    draws, so frames come at full rate and any can be made again from its index.
    """

    BACKGROUND_VARIANTS = 7
    NOISE_VARIANTS = 5

    kind = "simulator_hits"

    def __init__(
        self,
        *,
        shape: list | None = None,
        dtype: str = "uint16",
        pedestal: float = 1000.0,
        gain: float = 10.0,
        read_noise: float = 1.0,
        background: float = 0.05,
        ring_radius: float | None = None,
        ring_photons: float = 0.5,
        centre: list | None = None,
        hit_fraction: float = 0.1,
        peaks_per_hit: list | None = None,
        peak_photons: float = 200.0,
        spot_sigma: float = 1.0,
        rate_hz: float = 50.0,
        frames: int = 500,
        seed: int = 7,
    ):
        super().__init__(rate_hz=rate_hz, seed=seed)
        k = self.kind
        self.shape = _frame_shape(k, [512, 512] if shape is None else shape, minimum=32)
        self.dtype = _unsigned_dtype(k, dtype)
        half_range = float(np.iinfo(self.dtype).max) / 2
        centre = [(self.shape[0] - 1) / 2, (self.shape[1] - 1) / 2] if centre is None else centre
        ring_radius = 0.3 * min(self.shape) if ring_radius is None else ring_radius
        peaks_per_hit = [20, 60] if peaks_per_hit is None else peaks_per_hit
        _check(
            k,
            {
                "pedestal": (pedestal, _number(pedestal, 0, half_range), f"ADU in [0, {half_range:.0f}]"),
                "gain": (gain, _number(gain, 1e-9), "ADU per photon > 0"),
                "read_noise": (read_noise, _number(read_noise, 0), "ADU >= 0"),
                "background": (background, _number(background, 0), "photons per pixel >= 0"),
                "ring_radius": (ring_radius, _number(ring_radius, 1e-9), "pixels > 0"),
                "ring_photons": (ring_photons, _number(ring_photons, 0), "photons per pixel >= 0"),
                "centre": (centre, _pair(centre, _number), "[row, col] of the beam"),
                "hit_fraction": (hit_fraction, _number(hit_fraction, 0, 1), "a number in [0, 1]"),
                "peaks_per_hit": (
                    peaks_per_hit,
                    _pair(peaks_per_hit, lambda n: _integer(n, 1)) and peaks_per_hit[0] <= peaks_per_hit[1],
                    "[fewest, most] peaks in a hit, 1 <= fewest <= most",
                ),
                "peak_photons": (peak_photons, _number(peak_photons, 1e-9), "photons > 0"),
                "spot_sigma": (spot_sigma, _number(spot_sigma, 0.3, 5), "pixels in [0.3, 5]"),
                "frames": (frames, _integer(frames, 0), "an integer >= 0"),
            },
        )
        self.pedestal, self.gain, self.read_noise = float(pedestal), float(gain), float(read_noise)
        self.centre = (float(centre[0]), float(centre[1]))
        self.hit_fraction = float(hit_fraction)
        self.peaks_per_hit = (int(peaks_per_hit[0]), int(peaks_per_hit[1]))
        self.peak_photons, self.spot_sigma = float(peak_photons), float(spot_sigma)
        self.default_frames = int(frames)
        rows, cols = np.mgrid[0 : self.shape[0], 0 : self.shape[1]]
        r = np.hypot(rows - self.centre[0], cols - self.centre[1])
        ring_width = 0.05 * float(ring_radius) + 2.0
        ring = float(ring_photons) * np.exp(-0.5 * ((r - float(ring_radius)) / ring_width) ** 2)
        self.background_photons = float(background) + ring
        self._half = int(math.ceil(4 * self.spot_sigma))
        rng = self._rng(NOISE)
        self._background_draws = [
            rng.poisson(self.background_photons).astype(np.int32) for _ in range(self.BACKGROUND_VARIANTS)
        ]
        self._read_noise = [
            rng.normal(0.0, self.read_noise, self.shape).astype(np.float32)
            for _ in range(self.NOISE_VARIANTS)
        ]

    def is_hit(self, index: int) -> bool:
        """Whether frame ``index`` holds a crystal's peaks."""
        return bool(self._rng(PEAKS, index).random() < self.hit_fraction)

    def peaks(self, index: int) -> np.ndarray:
        """The Bragg peaks of frame ``index``: N x 3 (row, col, photons); 0 x 3 for a blank."""
        rng = self._rng(PEAKS, index)
        if not rng.random() < self.hit_fraction:
            return np.zeros((0, 3))
        n = int(rng.integers(self.peaks_per_hit[0], self.peaks_per_hit[1] + 1))
        margin = self._half + 1
        rows = rng.uniform(margin, self.shape[0] - 1 - margin, n)
        cols = rng.uniform(margin, self.shape[1] - 1 - margin, n)
        photons = 80.0 + rng.exponential(self.peak_photons, n)
        return np.column_stack([rows, cols, photons])

    def _spots(self, index: int) -> list[tuple[slice, slice, np.ndarray]]:
        """Each peak's window on the frame and its mean photons there."""
        h = self._half
        offsets = np.arange(-h, h + 1)
        out = []
        for row, col, photons in self.peaks(index):
            r0, c0 = int(round(row)), int(round(col))
            d2 = (r0 + offsets - row)[:, None] ** 2 + (c0 + offsets - col)[None, :] ** 2
            spot = np.exp(-d2 / (2 * self.spot_sigma**2))
            out.append((slice(r0 - h, r0 + h + 1), slice(c0 - h, c0 + h + 1), photons * spot / spot.sum()))
        return out

    def expected_photons(self, index: int) -> np.ndarray:
        """Mean photons per pixel of frame ``index`` (float64)."""
        mean = self.background_photons.copy()
        for rows, cols, spot in self._spots(index):
            mean[rows, cols] += spot
        return mean

    def photons(self, index: int) -> np.ndarray:
        """Photons per pixel of frame ``index`` (int32): the Poisson draw behind the ADU frame."""
        out = self._background_draws[index % self.BACKGROUND_VARIANTS].copy()
        rng = self._rng(NOISE, index)
        for rows, cols, spot in self._spots(index):
            out[rows, cols] += rng.poisson(spot).astype(np.int32)
        return out

    def frame(self, index: int) -> np.ndarray:
        """Frame ``index`` in ADU."""
        adu = self.photons(index).astype(np.float32)
        adu *= np.float32(self.gain)
        adu += np.float32(self.pedestal)
        adu += self._read_noise[index % self.NOISE_VARIANTS]
        return np.clip(np.rint(adu), 0, np.iinfo(self.dtype).max).astype(self.dtype)

    def _make(self, index: int, settings: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        return self.frame(index), {}

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "shape": list(self.shape),
            "dtype": self.dtype.name,
            "pedestal_adu": self.pedestal,
            "gain_adu_per_photon": self.gain,
            "hit_fraction": self.hit_fraction,
        }


# ----------------------------------------------------------------------------- tomography

#: The phantom: ellipsoids (x0, y0, z0, a, b, c, phi_deg, density) in units of the object's
#: half-size, rotated by phi about the rotation axis; densities add. A body with a cavity,
#: two grains and two dense specks.
PHANTOM = (
    (0.0, 0.0, 0.0, 0.90, 0.70, 0.95, 0.0, 1.0),
    (0.10, 0.0, 0.05, 0.50, 0.35, 0.60, 20.0, -0.6),
    (-0.50, 0.20, 0.30, 0.15, 0.15, 0.15, 0.0, 1.0),
    (0.35, -0.35, -0.30, 0.25, 0.10, 0.40, -30.0, 0.8),
    (0.20, 0.40, -0.50, 0.06, 0.06, 0.06, 0.0, 2.0),
    (-0.30, -0.30, 0.60, 0.06, 0.06, 0.06, 0.0, 2.0),
)


class SimulatedTomography(_SimulatedSource):
    """Parallel-beam projections of a 3D phantom turning on a rotation stage.

    Detector rows are slices (the rotation axis is vertical), columns the position across
    the beam. Frame ``i`` is taken at ``angle_start + i * angle_step`` degrees, given as
    ``meta["angle"]``. :meth:`projection` is the exact line integral of the phantom's
    ellipsoids in the geometry of :mod:`pipelines.steps.tomo` (slice pixel [i, j] at
    x = j - c, y = i - c is seen at detector column x cos(angle) + y sin(angle) + ``centre``);
    frames are ``flat`` x exp(-projection) counts with Poisson noise. ``attenuation`` is the
    body's attenuation per pixel; the object spans 90 % of the detector's half-width.
    """

    kind = "simulator_tomo"

    def __init__(
        self,
        *,
        shape: list | None = None,
        dtype: str = "uint16",
        flat: float = 10000.0,
        attenuation: float = 0.02,
        angle_start: float = 0.0,
        angle_step: float = 1.0,
        centre: float | None = None,
        rate_hz: float = 50.0,
        frames: int = 180,
        seed: int = 7,
    ):
        super().__init__(rate_hz=rate_hz, seed=seed)
        k = self.kind
        self.shape = _frame_shape(k, [128, 160] if shape is None else shape, minimum=8)
        self.dtype = _unsigned_dtype(k, dtype)
        top = np.iinfo(self.dtype).max
        cols = self.shape[1]
        centre = (cols - 1) / 2 if centre is None else centre
        _check(
            k,
            {
                "flat": (flat, _number(flat, 1e-9, top), f"counts without sample in (0, {top}]"),
                "attenuation": (attenuation, _number(attenuation, 0), "per pixel >= 0"),
                "angle_start": (angle_start, _number(angle_start), "degrees"),
                "angle_step": (
                    angle_step,
                    _number(angle_step) and angle_step != 0,
                    "degrees per frame, not 0",
                ),
                "centre": (
                    centre,
                    _number(centre, 4, cols - 5),
                    f"the rotation axis' column, in [4, {cols - 5}]",
                ),
                "frames": (frames, _integer(frames, 0), "an integer >= 0"),
            },
        )
        self.flat, self.attenuation = float(flat), float(attenuation)
        self.angle_start, self.angle_step = float(angle_start), float(angle_step)
        self.centre = float(centre)
        self.default_frames = int(frames)
        self.radius_xy = min(self.centre, cols - 1 - self.centre)  # stays on the detector at every angle
        self.radius_z = 0.5 * self.shape[0]

    def angle(self, index: int) -> float:
        """Rotation angle of frame ``index``, degrees."""
        return self.angle_start + index * self.angle_step

    def _slice_ellipses(self, row: int) -> list[tuple[float, float, float, float, float, float]]:
        """The phantom's ellipses in detector row ``row``: (x0, y0, a, b, phi, mu), lengths in pixels."""
        z = (row - (self.shape[0] - 1) / 2) / self.radius_z
        out = []
        for x0, y0, z0, a, b, c, phi_deg, density in PHANTOM:
            inside = 1 - ((z - z0) / c) ** 2
            if inside > 0:
                s = math.sqrt(inside) * self.radius_xy
                r = self.radius_xy
                out.append((x0 * r, y0 * r, a * s, b * s, math.radians(phi_deg), density * self.attenuation))
        return out

    def projection(self, angle_deg: float) -> np.ndarray:
        """Line integrals of the attenuation at ``angle_deg`` (rows x cols, float64, no noise).

        The projection of an ellipse with semi-axes a, b turned by phi, centred at (x0, y0),
        is 2 mu a b / s^2 * sqrt(s^2 - (t - t0)^2) with s^2 = a^2 cos^2(angle - phi) +
        b^2 sin^2(angle - phi) and t0 = x0 cos(angle) + y0 sin(angle) (Kak & Slaney, 3.2).
        """
        theta = math.radians(angle_deg)
        t = np.arange(self.shape[1], dtype=np.float64) - self.centre
        out = np.zeros(self.shape)
        for row in range(self.shape[0]):
            for x0, y0, a, b, phi, mu in self._slice_ellipses(row):
                s2 = (a * math.cos(theta - phi)) ** 2 + (b * math.sin(theta - phi)) ** 2
                t0 = x0 * math.cos(theta) + y0 * math.sin(theta)
                out[row] += 2 * mu * a * b / s2 * np.sqrt(np.maximum(s2 - (t - t0) ** 2, 0.0))
        return out

    def slice_image(self, row: int, size: int | None = None) -> np.ndarray:
        """Attenuation per pixel of slice ``row`` on the size x size grid that
        :func:`pipelines.steps.tomo.fbp` reconstructs (default size: the detector's width)."""
        size = self.shape[1] if size is None else int(size)
        y, x = np.mgrid[0:size, 0:size].astype(np.float64) - (size - 1) / 2
        out = np.zeros((size, size))
        for x0, y0, a, b, phi, mu in self._slice_ellipses(row):
            along = (x - x0) * math.cos(phi) + (y - y0) * math.sin(phi)
            across = -(x - x0) * math.sin(phi) + (y - y0) * math.cos(phi)
            out += mu * ((along / a) ** 2 + (across / b) ** 2 <= 1)
        return out

    def frame(self, index: int) -> np.ndarray:
        """Counts of frame ``index``: Poisson around flat x exp(-projection)."""
        mean = self.flat * np.exp(-self.projection(self.angle(index)))
        counts = self._rng(NOISE, index).poisson(mean)
        return np.minimum(counts, np.iinfo(self.dtype).max).astype(self.dtype)

    def _make(self, index: int, settings: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        return self.frame(index), {"angle": self.angle(index)}

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "shape": list(self.shape),
            "dtype": self.dtype.name,
            "flat_counts": self.flat,
            "angle_start_deg": self.angle_start,
            "angle_step_deg": self.angle_step,
            "rotation_axis_column": self.centre,
        }
