"""Detector geometry from PONI files, with the conventions of pyFAI's ``Geometry``.

A beamline's calibration already lives in a PONI file made by pyFAI-calib2, so the
azimuthal-integration steps read that file rather than a format of their own. This
module reads and writes PONI files (versions 1, 2, 2.1 and 3 without parallax) and
computes, per pixel, what integration needs: scattering angle 2theta, azimuthal angle
chi, scattering vector q, solid angle and polarisation factor. The numbers match
pyFAI's (same rotation convention, same pixel-centre offset, same detector
orientation handling) so that results agree with an ``AzimuthalIntegrator`` built from
the same file; pyFAI itself is only needed for files that name a detector model
without giving its pixel size.

Conventions (pyFAI's): axis 1 is the slow (row, vertical) axis, axis 2 the fast
(column, horizontal) one; lengths are in metres, angles in radians; chi is in
[-pi, pi). Internal radial values are 2theta in radians and q in inverse nanometres;
a unit's ``scale`` turns them into the unit shown to users (degrees, inverse
angstroms).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

#: Planck constant times speed of light, in keV * Angstrom (CODATA 2018).
HC_KEV_ANGSTROM = 12.398419843320026
#: Smallest step above 1 in float32, pyFAI's margin on the upper bound of a bin range.
EPS32 = 1.0 + float(np.finfo(np.float32).eps)
#: Detector orientations pyFAI supports (EXIF numbering); 3 is pyFAI's native one.
ORIENTATIONS = (1, 2, 3, 4)
#: PONI versions this module reads.
PONI_VERSIONS = (1, 2, 2.1, 3)


@dataclass(frozen=True)
class RadialUnit:
    """A radial unit: ``space`` is the quantity, ``scale`` turns internal values into this unit."""

    name: str
    space: str  # "2th" (radians internally) or "q" (inverse nm internally)
    scale: float
    label: str
    symbol: str


RADIAL_UNITS: dict[str, RadialUnit] = {
    "2th_deg": RadialUnit("2th_deg", "2th", 180.0 / math.pi, "2theta", "deg"),
    "2th_rad": RadialUnit("2th_rad", "2th", 1.0, "2theta", "rad"),
    "q_nm^-1": RadialUnit("q_nm^-1", "q", 1.0, "q", "nm^-1"),
    "q_A^-1": RadialUnit("q_A^-1", "q", 0.1, "q", "A^-1"),
}
#: The azimuthal unit of results: degrees, as pyFAI's ``integrate2d``.
CHI_DEG_SCALE = 180.0 / math.pi


def radial_unit(name: str) -> RadialUnit:
    """The :class:`RadialUnit` called ``name``; a clear error for anything else."""
    try:
        return RADIAL_UNITS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unit = {name!r} is not supported; expected one of {', '.join(RADIAL_UNITS)}"
        ) from None


class PoniError(ValueError):
    """A PONI file is missing a value, has a bad one, or needs something not supported."""


@dataclass(frozen=True)
class PoniGeometry:
    """The content of a PONI file: where the detector is and what it is.

    ``dist`` is the sample to detector-plane distance along the plane's normal and
    ``poni1``/``poni2`` the point of normal incidence on the detector, measured from
    its first pixel's outer corner (metres); ``rot1..3`` the detector rotations
    (radians); ``wavelength`` in metres; ``pixel1``/``pixel2`` the pixel size along
    the slow and fast axes (metres); ``shape`` the detector's (rows, columns) when
    the file gives it.
    """

    dist: float
    poni1: float
    poni2: float
    rot1: float = 0.0
    rot2: float = 0.0
    rot3: float = 0.0
    wavelength: float | None = None
    pixel1: float = 0.0
    pixel2: float = 0.0
    shape: tuple[int, int] | None = None
    orientation: int = 3
    detector: str = "Detector"
    detector_config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("dist", "poni1", "poni2", "rot1", "rot2", "rot3", "pixel1", "pixel2"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise PoniError(f"PONI {name} = {value!r} is not a finite number")
        if self.dist <= 0:
            raise PoniError(f"PONI distance = {self.dist!r} must be > 0 (metres)")
        if self.pixel1 <= 0 or self.pixel2 <= 0:
            raise PoniError(f"PONI pixel size ({self.pixel1!r}, {self.pixel2!r}) must be > 0 (metres)")
        if self.wavelength is not None and not (math.isfinite(self.wavelength) and self.wavelength > 0):
            raise PoniError(f"PONI wavelength = {self.wavelength!r} must be > 0 (metres)")
        if self.orientation not in ORIENTATIONS:
            raise PoniError(
                f"detector orientation = {self.orientation!r} is not supported; expected 1, 2, 3 or 4"
            )
        if self.shape is not None:
            object.__setattr__(self, "shape", (int(self.shape[0]), int(self.shape[1])))

    @property
    def energy_kev(self) -> float | None:
        """Photon energy in keV, from the wavelength."""
        return None if self.wavelength is None else HC_KEV_ANGSTROM / (self.wavelength * 1e10)

    @property
    def beam_center(self) -> tuple[float, float]:
        """Where the direct beam hits the detector plane, as (x, y) in pixels.

        Pixel coordinates are frame indices counted from the first pixel's outer
        corner, pixel ``i`` spanning [i, i+1) (Fit2D's and Lavue's convention; for
        orientation 3 the same numbers as pyFAI's ``getFit2D()`` centerX/centerY).
        Independent of rot3.
        """
        c1, c2 = math.cos(self.rot1), math.cos(self.rot2)
        x = (self.poni2 - self.dist * math.tan(self.rot1)) / self.pixel2
        y = (self.poni1 + self.dist * math.sin(self.rot2) / (c1 * c2)) / self.pixel1
        if self.orientation != 3:
            if self.shape is None:
                raise PoniError(
                    "the beam centre of a flipped detector (orientation != 3) needs the detector shape"
                )
            if self.orientation in (1, 4):
                x = self.shape[1] - x
            if self.orientation in (1, 2):
                y = self.shape[0] - y
        return x, y

    @property
    def direct_beam_distance(self) -> float:
        """Sample to detector distance along the direct beam, in metres."""
        return self.dist / (math.cos(self.rot1) * math.cos(self.rot2))

    def with_shape(self, shape: tuple[int, int]) -> PoniGeometry:
        """The same geometry for frames of ``shape`` (rows, columns)."""
        return replace(self, shape=(int(shape[0]), int(shape[1])))


# ---------------------------------------------------------------- PONI files


def _parse_lines(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """``key: value`` lines (case-insensitive keys, the last one wins) and ``# Key: value`` extras."""
    values: dict[str, str] = {}
    extra: dict[str, str] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        if line.lstrip().startswith("#"):
            key, _, value = line.lstrip()[1:].partition(":")
            key = key.strip().capitalize()
            if key in ("Calibrant", "Image"):
                extra[key] = value.strip()
            continue
        key, _, value = line.partition(":")
        values[key.strip().lower()] = value.strip()
    return values, extra


def _float(values: dict[str, str], key: str, path: Path, required: bool = True) -> float | None:
    raw = values.get(key)
    if raw is None or raw.lower() == "none":
        if required:
            raise PoniError(f"PONI file {path}: no {key!r} value")
        return None
    try:
        return float(raw)
    except ValueError:
        raise PoniError(f"PONI file {path}: {key} = {raw!r} is not a number") from None


def _detector_from_pyfai(
    name: str, config: dict[str, Any], path: Path
) -> tuple[float, float, tuple | None, int]:
    """Pixel size, shape and orientation of a named detector model, from pyFAI's catalogue."""
    try:
        from pyFAI import detectors
    except ImportError:
        raise PoniError(
            f"PONI file {path}: detector {name!r} gives no pixel size; install pyFAI to look the model "
            "up, or write pixel1/pixel2/max_shape in its Detector_config"
        ) from None
    try:
        det = detectors.detector_factory(name, config or None)
    except Exception as exc:  # pyFAI raises several kinds for unknown names
        raise PoniError(f"PONI file {path}: unknown detector {name!r}: {exc}") from exc
    shape = tuple(det.max_shape) if det.max_shape is not None else None
    return float(det.pixel1), float(det.pixel2), shape, int(det.orientation or 3)


def read_poni(path: str | Path) -> PoniGeometry:
    """Read a PONI file (version 1, 2, 2.1, or 3 without parallax correction)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise PoniError(f"cannot read PONI file {path}: {exc}") from exc
    values, extra = _parse_lines(text)
    version = float(values.get("poni_version", 1))
    if "detector_config" in values:
        version = max(version, 2.0)
    if version not in PONI_VERSIONS:
        raise PoniError(f"PONI file {path}: poni_version {version} is not supported; expected 1, 2, 2.1 or 3")
    if str(values.get("parallax", "false")).lower() == "true":
        raise PoniError(
            f"PONI file {path}: parallax correction is not supported; recalibrate with Parallax: False"
        )

    name = values.get("detector", "Detector")
    if name in ("", "None"):
        name = "Detector"
    config: dict[str, Any] = {}
    if version >= 2 and "detector_config" in values:
        try:
            config = json.loads(values["detector_config"])
        except json.JSONDecodeError as exc:
            raise PoniError(f"PONI file {path}: Detector_config is not JSON: {exc}") from exc
        if not isinstance(config, dict):
            raise PoniError(f"PONI file {path}: Detector_config must be a JSON object, got {config!r}")
    if (
        config.get("splineFile")
        or config.get("splinefile")
        or values.get("splinefile", "none").lower() != "none"
    ):
        raise PoniError(f"PONI file {path}: detectors with a distortion spline file are not supported")

    pixel1 = config.get("pixel1", values.get("pixelsize1"))
    pixel2 = config.get("pixel2", values.get("pixelsize2"))
    shape = config.get("max_shape")
    orientation = int(config.get("orientation", 3) or 3)
    if pixel1 is None or pixel2 is None:
        pixel1, pixel2, model_shape, model_orientation = _detector_from_pyfai(name, config, path)
        shape = shape if shape is not None else model_shape
        orientation = int(config.get("orientation", model_orientation) or 3)
    try:
        pixel1, pixel2 = float(pixel1), float(pixel2)
    except (TypeError, ValueError):
        raise PoniError(
            f"PONI file {path}: pixel size ({pixel1!r}, {pixel2!r}) is not a pair of numbers"
        ) from None

    dist = _float(values, "distance", path, required="dist" not in values)
    if dist is None:
        dist = _float(values, "dist", path)
    return PoniGeometry(
        dist=dist,
        poni1=_float(values, "poni1", path),
        poni2=_float(values, "poni2", path),
        rot1=_float(values, "rot1", path, required=False) or 0.0,
        rot2=_float(values, "rot2", path, required=False) or 0.0,
        rot3=_float(values, "rot3", path, required=False) or 0.0,
        wavelength=_float(values, "wavelength", path, required=False),
        pixel1=pixel1,
        pixel2=pixel2,
        shape=tuple(shape) if shape is not None else None,
        orientation=orientation,
        detector=name,
        detector_config=config,
        extra=extra,
    )


def write_poni(geometry: PoniGeometry, path: str | Path, version: float = 2.1) -> None:
    """Write ``geometry`` as a PONI file that pyFAI (and :func:`read_poni`) read back."""
    if version not in (1, 2, 2.1):
        raise PoniError(f"PONI version = {version!r} cannot be written; expected 1, 2 or 2.1")
    g = geometry
    lines = [
        "# Nota: C-Order, 1 refers to the Y axis, 2 to the X axis",
        f"# Calibration done on {time.ctime()}",
        f"poni_version: {version}",
        "Detector: Detector",
    ]
    if version == 1:
        lines += [f"PixelSize1: {g.pixel1!r}", f"PixelSize2: {g.pixel2!r}"]
    else:
        config: dict[str, Any] = {"pixel1": g.pixel1, "pixel2": g.pixel2}
        if version >= 2.1:
            config["orientation"] = g.orientation
        if g.shape is not None:
            config["max_shape"] = list(g.shape)
        lines.append(f"Detector_config: {json.dumps(config)}")
    lines += [
        f"Distance: {g.dist!r}",
        f"Poni1: {g.poni1!r}",
        f"Poni2: {g.poni2!r}",
        f"Rot1: {g.rot1!r}",
        f"Rot2: {g.rot2!r}",
        f"Rot3: {g.rot3!r}",
    ]
    if g.wavelength is not None:
        lines.append(f"Wavelength: {g.wavelength!r}")
    lines += [f"# {key}: {value}" for key, value in g.extra.items()]
    Path(path).write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- pixel geometry


def _shape_of(geometry: PoniGeometry, shape: tuple[int, int] | None) -> tuple[int, int]:
    shape = shape if shape is not None else geometry.shape
    if shape is None:
        raise PoniError("the detector shape is unknown: the PONI file has no max_shape, give the frame shape")
    return int(shape[0]), int(shape[1])


def _detector_positions(
    geometry: PoniGeometry, shape: tuple[int, int], corners: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centre (or corner grid) positions relative to the PONI, in the detector plane (metres).

    Orientation only renumbers pixels (pyFAI's ``Detector._reorder_indexes_from_orientation``).
    """
    n1, n2 = shape
    if corners:
        i1 = np.arange(n1 + 1, dtype=np.float64)
        i2 = np.arange(n2 + 1, dtype=np.float64)
        flip1, flip2, offset = float(n1), float(n2), 0.0
    else:
        i1 = np.arange(n1, dtype=np.float64)
        i2 = np.arange(n2, dtype=np.float64)
        flip1, flip2, offset = float(n1 - 1), float(n2 - 1), 0.5
    if geometry.orientation in (1, 2):
        i1 = flip1 - i1
    if geometry.orientation in (1, 4):
        i2 = flip2 - i2
    p1 = geometry.pixel1 * (i1 + offset) - geometry.poni1
    p2 = geometry.pixel2 * (i2 + offset) - geometry.poni2
    return p1, p2


def lab_coordinates(
    geometry: PoniGeometry, shape: tuple[int, int] | None = None, corners: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel positions in the sample frame: (t1 vertical, t2 horizontal, t3 along the beam), metres.

    With ``corners`` the positions of the (rows+1, columns+1) pixel-corner grid.
    The rotation is pyFAI's ``rotation_matrix`` (rot1 and rot2 left-handed about
    the detector axes 1 and 2, then rot3 right-handed about the beam).
    """
    shape = _shape_of(geometry, shape)
    p1, p2 = _detector_positions(geometry, shape, corners)
    p1 = p1[:, None]
    p2 = p2[None, :]
    L = geometry.dist
    s1, c1 = math.sin(geometry.rot1), math.cos(geometry.rot1)
    s2, c2 = math.sin(geometry.rot2), math.cos(geometry.rot2)
    s3, c3 = math.sin(geometry.rot3), math.cos(geometry.rot3)
    t1 = p1 * (c2 * c3) + p2 * (c3 * s1 * s2 - c1 * s3) - L * (c1 * c3 * s2 + s1 * s3)
    t2 = p1 * (c2 * s3) + p2 * (c1 * c3 + s1 * s2 * s3) - L * (-(c3 * s1) + c1 * s2 * s3)
    t3 = p1 * s2 - p2 * (c2 * s1) + L * (c1 * c2)
    return t1, t2, np.broadcast_to(t3, t1.shape)


def _radial_from_lab(
    t1: np.ndarray, t2: np.ndarray, t3: np.ndarray, space: str, wavelength: float | None
) -> np.ndarray:
    tth = np.arctan2(np.sqrt(t1 * t1 + t2 * t2), t3)
    if space == "2th":
        return tth
    if wavelength is None:
        raise PoniError("the PONI file has no wavelength: q units need one (use a 2th unit)")
    return 4.0e-9 * math.pi * np.sin(tth / 2.0) / wavelength


def radial_array(
    geometry: PoniGeometry, unit: str = "2th_deg", shape: tuple[int, int] | None = None, scale: bool = True
) -> np.ndarray:
    """Radial position of each pixel centre in ``unit`` (internal unit if not ``scale``), float64."""
    u = radial_unit(unit)
    values = _radial_from_lab(*lab_coordinates(geometry, shape), u.space, geometry.wavelength)
    return values * u.scale if scale and u.scale != 1.0 else values


def two_theta_array(geometry: PoniGeometry, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Scattering angle 2theta of each pixel centre, radians."""
    return radial_array(geometry, "2th_rad", shape)


def q_array(geometry: PoniGeometry, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Scattering vector modulus q = 4 pi sin(theta) / lambda of each pixel centre, inverse nm."""
    return radial_array(geometry, "q_nm^-1", shape)


def chi_array(geometry: PoniGeometry, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Azimuthal angle chi = atan2(t1, t2) of each pixel centre, radians in [-pi, pi]."""
    t1, t2, _ = lab_coordinates(geometry, shape)
    return np.arctan2(t1, t2)


def corner_arrays(
    geometry: PoniGeometry, unit: str, shape: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Radial (internal unit) and chi values on the (rows+1, columns+1) corner grid, float64."""
    u = radial_unit(unit)
    t1, t2, t3 = lab_coordinates(geometry, shape, corners=True)
    return _radial_from_lab(t1, t2, t3, u.space, geometry.wavelength), np.arctan2(t1, t2)


def _four_corners(grid: np.ndarray) -> np.ndarray:
    """(rows, cols, 4) corner values in pyFAI's order, stored as float32 like pyFAI's corner cache."""
    out = np.empty(grid[:-1, :-1].shape + (4,), dtype=np.float32)
    out[..., 0] = grid[:-1, :-1]
    out[..., 1] = grid[1:, :-1]
    out[..., 2] = grid[1:, 1:]
    out[..., 3] = grid[:-1, 1:]
    return out


def radial_delta_array(
    geometry: PoniGeometry, unit: str, shape: tuple[int, int] | None = None, center: np.ndarray | None = None
) -> np.ndarray:
    """Largest |corner - centre| radial distance of each pixel (internal unit): its bounding-box half-width.

    Corners are rounded to float32 first, as pyFAI's ``delta_array`` does, so the
    bounding boxes (and the split weights) are the same as pyFAI's.
    """
    if center is None:
        center = radial_array(geometry, unit, shape, scale=False)
    radial_grid, _ = corner_arrays(geometry, unit, shape)
    corners = _four_corners(radial_grid)
    return np.abs(corners - center[..., None]).max(axis=-1)


def chi_delta_array(
    geometry: PoniGeometry, shape: tuple[int, int] | None = None, center: np.ndarray | None = None
) -> np.ndarray:
    """Largest |corner - centre| azimuthal distance of each pixel, radians, across the +-pi cut."""
    if center is None:
        center = chi_array(geometry, shape)
    _, chi_grid = corner_arrays(geometry, "2th_rad", shape)
    delta = np.abs(_four_corners(chi_grid) - center[..., None])
    np.minimum(delta, 2.0 * math.pi - delta, out=delta)
    return delta.max(axis=-1)


def solid_angle_array(geometry: PoniGeometry, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Solid angle of each pixel relative to a pixel at the PONI: cos(incidence)^3, float32.

    This is pyFAI's ``solidAngleArray()`` (order 3, not absolute): the flat-detector
    incidence angle uses only the distance and the position in the detector plane.
    """
    shape = _shape_of(geometry, shape)
    p1, p2 = _detector_positions(geometry, shape, corners=False)
    L = geometry.dist
    cos_incidence = L / np.sqrt(L * L + (p1[:, None] ** 2 + p2[None, :] ** 2))
    return (cos_incidence**3).astype(np.float32)


def polarization_array(
    geometry: PoniGeometry, factor: float, shape: tuple[int, int] | None = None, axis_offset: float = 0.0
) -> np.ndarray:
    """Polarisation factor of each pixel (divide intensities by it), float32.

    ``factor`` = (Ih - Iv) / (Ih + Iv): 0 unpolarised, +1 linear horizontal (the
    usual synchrotron case), -1 linear vertical. pyFAI's formula:
    P = (1 + cos^2 2theta - factor cos(2 (chi + offset)) sin^2 2theta) / 2.
    """
    if not (isinstance(factor, int | float) and -1.0 <= factor <= 1.0):
        raise ValueError(f"polarization_factor = {factor!r} must be a number in [-1, 1]")
    t1, t2, t3 = lab_coordinates(geometry, shape)
    tth = np.arctan2(np.sqrt(t1 * t1 + t2 * t2), t3)
    chi = np.arctan2(t1, t2)
    cos2_tth = np.cos(tth) ** 2
    pol = 0.5 * (1.0 + cos2_tth - factor * np.cos(2.0 * (chi + axis_offset)) * (1.0 - cos2_tth))
    return pol.astype(np.float32)


def deg_to_chi(angle_deg: float) -> float:
    """An azimuth in degrees as radians in [-pi, pi), exactly as pyFAI normalises azimuth ranges."""
    turns = (angle_deg / 180.0) % 2.0
    if turns >= 1.0:
        turns -= 2.0
    return turns * math.pi


def upper_bound(maximum: float) -> float:
    """pyFAI's upper edge of a bin range: just above the largest value, so it falls in the last bin."""
    return maximum * EPS32 if maximum > 0 else maximum / EPS32
