"""PONI files and per-pixel geometry, checked against pyFAI on the same files."""

import logging
import math
from pathlib import Path

import numpy as np
import pyFAI
import pytest

from pipelines import geometry as G

logging.getLogger("pyFAI").setLevel(logging.ERROR)

DEMO = Path(__file__).resolve().parent.parent / "config" / "geometry" / "demo.poni"
SHAPE = (50, 60)


def tilted(orientation: int = 3, **changes) -> G.PoniGeometry:
    """A small detector with all three rotations, non-square pixels and an off-centre PONI."""
    values = dict(
        dist=0.2, poni1=0.002, poni2=0.0015, rot1=0.05, rot2=-0.03, rot3=0.2, wavelength=1.0e-10,
        pixel1=75e-6, pixel2=70e-6, shape=SHAPE, orientation=orientation,
    )  # fmt: skip
    values.update(changes)
    return G.PoniGeometry(**values)


def test_demo_poni_is_a_2048_detector_at_12_4_kev():
    g = G.read_poni(DEMO)
    assert g.shape == (2048, 2048)
    assert g.pixel1 == g.pixel2 == 75e-6
    assert 0.19 < g.dist < 0.21
    assert g.energy_kev == pytest.approx(12.4, rel=1e-6)
    x, y = g.beam_center
    assert 900 < x < 1100 and 900 < y < 1100
    assert g.extra == {"Calibrant": "CeO2"}


def test_demo_poni_reads_the_same_in_pyfai():
    g = G.read_poni(DEMO)
    ai = pyFAI.load(str(DEMO))
    assert (ai.dist, ai.poni1, ai.poni2, ai.rot1, ai.rot2, ai.rot3) == (
        g.dist,
        g.poni1,
        g.poni2,
        g.rot1,
        g.rot2,
        g.rot3,
    )
    assert ai.wavelength == g.wavelength
    assert (ai.detector.pixel1, ai.detector.pixel2) == (g.pixel1, g.pixel2)
    assert tuple(ai.detector.max_shape) == g.shape


@pytest.mark.parametrize("version", [1, 2, 2.1])
def test_written_files_read_back_here_and_in_pyfai(tmp_path, version):
    g = tilted(orientation=3)
    path = tmp_path / "g.poni"
    G.write_poni(g, path, version=version)
    back = G.read_poni(path)
    for name in ("dist", "poni1", "poni2", "rot1", "rot2", "rot3", "wavelength", "pixel1", "pixel2"):
        assert getattr(back, name) == getattr(g, name), name
    assert back.shape == (g.shape if version != 1 else None)
    ai = pyFAI.load(str(path))
    assert (ai.dist, ai.rot3, ai.detector.pixel1, ai.detector.pixel2) == (g.dist, g.rot3, g.pixel1, g.pixel2)


def test_version_1_file_with_comments_and_repeated_keys(tmp_path):
    path = tmp_path / "old.poni"
    path.write_text(
        "# Nota: C-Order\n# Calibrant: LaB6\nPixelSize1: 1e-4\nPixelSize2: 1.2e-4\nDistance: 0.5\n"
        "Poni1: 0.01\nPoni2: 0.02\nRot1: 0.0\nRot2: 0.0\nRot3: 0.0\nDistance: 0.3\n"
        "SplineFile: None\nWavelength: 1e-10\n"
    )
    g = G.read_poni(path)
    assert g.dist == 0.3  # the last value wins, as in pyFAI
    assert (g.pixel1, g.pixel2) == (1e-4, 1.2e-4)
    assert g.extra == {"Calibrant": "LaB6"}
    assert pyFAI.load(str(path)).dist == g.dist


def test_named_detector_takes_its_pixel_size_from_pyfai(tmp_path):
    path = tmp_path / "pilatus.poni"
    path.write_text(
        'poni_version: 2.1\nDetector: Pilatus1M\nDetector_config: {"orientation": 3}\n'
        "Distance: 0.3\nPoni1: 0.08\nPoni2: 0.09\nRot1: 0\nRot2: 0\nRot3: 0\nWavelength: 1e-10\n"
    )
    g = G.read_poni(path)
    assert (g.pixel1, g.pixel2) == (172e-6, 172e-6)
    assert g.shape == (1043, 981)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Poni1: 0.1\nPoni2: 0.1\nPixelSize1: 1e-4\nPixelSize2: 1e-4\n", "distance"),
        ("Distance: 0.1\nPoni1: abc\nPoni2: 0.1\nPixelSize1: 1e-4\nPixelSize2: 1e-4\n", "poni1"),
        ("Distance: -0.1\nPoni1: 0\nPoni2: 0.1\nPixelSize1: 1e-4\nPixelSize2: 1e-4\n", "distance"),
        ('poni_version: 3\nDetector: Detector\nDetector_config: {"pixel1": 1e-4, "pixel2": 1e-4}\n'
         "Distance: 0.1\nPoni1: 0\nPoni2: 0\nParallax: True\n", "parallax"),
        ('poni_version: 4\nDistance: 0.1\nPoni1: 0\nPoni2: 0\n', "poni_version"),
        ("Distance: 0.1\nPoni1: 0\nPoni2: 0\nPixelSize1: 1e-4\nPixelSize2: 1e-4\nSplineFile: d.spline\n", "spline"),
    ],
)  # fmt: skip
def test_bad_files_raise_errors_that_name_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.poni"
    path.write_text(text)
    with pytest.raises(G.PoniError, match=message):
        G.read_poni(path)


def test_version_3_without_parallax_is_read(tmp_path):
    path = tmp_path / "v3.poni"
    path.write_text(
        'poni_version: 3\nDetector: Detector\nDetector_config: {"pixel1": 1e-4, "pixel2": 1e-4, "orientation": 3}\n'
        "Distance: 0.1\nPoni1: 0.01\nPoni2: 0.02\nRot1: 0\nRot2: 0\nRot3: 0\nWavelength: 1e-10\nParallax: False\n"
    )
    assert G.read_poni(path).poni2 == 0.02


def _pyfai(g: G.PoniGeometry, tmp_path: Path):
    path = tmp_path / f"o{g.orientation}.poni"
    G.write_poni(g, path)
    return pyFAI.load(str(path))


@pytest.mark.parametrize("orientation", [1, 2, 3, 4])
def test_pixel_positions_match_pyfai_for_every_orientation(tmp_path, orientation):
    g = tilted(orientation)
    ai = _pyfai(g, tmp_path)
    for unit in ("2th_deg", "2th_rad", "q_nm^-1", "q_A^-1"):
        ours = G.radial_array(g, unit)
        theirs = ai.center_array(SHAPE, unit=unit)
        np.testing.assert_allclose(ours, theirs, rtol=1e-13, err_msg=unit)
        ours = G.radial_delta_array(g, unit)
        theirs = ai.array_from_unit(SHAPE, "delta", unit, scale=False)
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-12, err_msg=unit)
    np.testing.assert_allclose(
        G.chi_array(g), ai.center_array(SHAPE, unit="chi_rad", scale=False), atol=1e-14
    )
    np.testing.assert_allclose(G.chi_delta_array(g), ai.deltaChi(SHAPE), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("orientation", [1, 3])
def test_solid_angle_and_polarisation_match_pyfai(tmp_path, orientation):
    g = tilted(orientation)
    ai = _pyfai(g, tmp_path)
    np.testing.assert_allclose(G.solid_angle_array(g), ai.solidAngleArray(SHAPE), rtol=1e-6)
    for factor in (-1.0, 0.0, 0.5, 0.99):
        np.testing.assert_allclose(G.polarization_array(g, factor), ai.polarization(SHAPE, factor), rtol=1e-6)
    with pytest.raises(ValueError, match="polarization_factor"):
        G.polarization_array(g, 1.5)


def test_q_follows_from_two_theta_and_wavelength():
    g = tilted()
    q = G.q_array(g)
    tth = G.two_theta_array(g)
    np.testing.assert_allclose(q, 4 * math.pi / (g.wavelength * 1e9) * np.sin(tth / 2), rtol=1e-13)
    with pytest.raises(G.PoniError, match="wavelength"):
        G.q_array(tilted(wavelength=None))


def test_beam_centre_and_direct_distance_match_pyfai_fit2d(tmp_path):
    for rot1, rot2 in ((0.0, 0.0), (0.05, -0.03), (-0.1, 0.2)):
        g = tilted(rot1=rot1, rot2=rot2)
        fit2d = _pyfai(g, tmp_path).getFit2D()
        assert g.beam_center == pytest.approx((fit2d["centerX"], fit2d["centerY"]), abs=1e-9)
        assert g.direct_beam_distance * 1e3 == pytest.approx(fit2d["directDist"], rel=1e-12)


def test_beam_centre_is_where_two_theta_vanishes():
    g = tilted(rot3=0.0, shape=(400, 400), poni1=0.015, poni2=0.014)
    x, y = g.beam_center
    tth = G.two_theta_array(g)
    row, col = np.unravel_index(np.argmin(tth), tth.shape)
    assert abs((col + 0.5) - x) <= 1.0 and abs((row + 0.5) - y) <= 1.0


def test_flipped_orientation_mirrors_the_beam_centre():
    x3, y3 = tilted(3).beam_center
    x1, y1 = tilted(1).beam_center
    assert (x1, y1) == pytest.approx((SHAPE[1] - x3, SHAPE[0] - y3))


def test_unknown_unit_is_named():
    with pytest.raises(ValueError, match="'r_mm'.*2th_deg"):
        G.radial_unit("r_mm")
