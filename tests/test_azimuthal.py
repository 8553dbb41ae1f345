"""Azimuthal integration and caking: against pyFAI on a 2048 x 2048 frame, against the
numpy reference on a small tilted detector, and the behaviour of masks, NaN, dummies,
ranges, dtypes and parameters.

Tolerances against pyFAI (relative, edge bins excluded in 1D): 1e-5 without pixel
splitting, 1e-3 with bounding-box splitting, 1e-5 for caking in both modes (the
pixel -> bin matrix is pyFAI's own, so the cake agrees as closely as the 1D pattern).
"""

import logging
import math
from pathlib import Path

import numpy as np
import pyFAI
import pytest

from pipelines import geometry as G
from pipelines.steps import StepChain, StepConfigError, load_step
from pipelines.steps.azimuthal import ENTRIES, SPLIT_PAIRS, AzimuthalIntegration, Caking

logging.getLogger("pyFAI").setLevel(logging.ERROR)

DEMO = str(Path(__file__).resolve().parent.parent / "config" / "geometry" / "demo.poni")
PYFAI_SPLIT = {"none": "no", "bbox": "bbox"}
TOLERANCE = {"none": 1e-5, "bbox": 1e-3}


@pytest.fixture(scope="module")
def ai():
    return pyFAI.load(DEMO)


@pytest.fixture(scope="module")
def rings():
    """2048 x 2048 uint16 powder pattern: eight rings with a texture, on a background, with noise."""
    g = G.read_poni(DEMO)
    tth = G.radial_array(g, "2th_deg")
    chi = G.chi_array(g)
    peaks = sum(np.exp(-(((tth - c) / 0.05) ** 2)) for c in (8.3, 9.6, 13.6, 16.0, 19.3, 21.0, 24.4, 26.3))
    rng = np.random.default_rng(7)
    return rng.poisson(50 + 2000 * peaks * (1 + 0.3 * np.cos(2 * chi))).astype(np.uint16)


def relative(a, b):
    return np.abs(np.asarray(a, np.float64) / np.asarray(b, np.float64) - 1.0)


# ---------------------------------------------------------------- against pyFAI (2048 x 2048)


@pytest.mark.parametrize(
    ("split", "unit", "polarization"),
    [
        ("none", "2th_deg", None),
        ("none", "q_nm^-1", 0.99),
        ("none", "q_A^-1", None),
        ("bbox", "2th_deg", 0.99),
        ("bbox", "q_A^-1", None),
    ],
)
def test_1d_matches_pyfai_csr_and_uses_the_same_matrix(ai, rings, split, unit, polarization):
    step = AzimuthalIntegration(
        poni=DEMO, npt=1000, unit=unit, pixel_splitting=split, polarization_factor=polarization
    )
    ours = step(rings, {})
    theirs = ai.integrate1d(
        rings, 1000, unit=unit, method=(PYFAI_SPLIT[split], "csr", "cython"),
        correctSolidAngle=True, polarization_factor=polarization,
    )  # fmt: skip
    np.testing.assert_allclose(ours["radial"], theirs.radial, rtol=1e-12)
    assert relative(ours["intensity"], theirs.intensity)[1:-1].max() <= TOLERANCE[split]
    if unit != "2th_deg":
        return  # the matrix comparison below is slow; once per splitting is enough
    engine = ai.engines[theirs.method].engine
    indptr, indices, weights = step.matrix.to_csr()
    np.testing.assert_array_equal(indptr, engine.indptr)
    np.testing.assert_array_equal(indices, engine.indices)
    # shares agree to float32 precision (a split pair stores one share, the other is 1 - it)
    np.testing.assert_allclose(weights, engine.data, rtol=0, atol=2.0**-24)


def test_1d_without_splitting_matches_pyfai_histogram(ai, rings):
    ours = AzimuthalIntegration(poni=DEMO, unit="2th_deg")(rings, {})
    theirs = ai.integrate1d(rings, 1000, unit="2th_deg", method=("no", "histogram", "cython"))
    np.testing.assert_allclose(ours["radial"], theirs.radial, rtol=1e-12)
    assert relative(ours["intensity"], theirs.intensity)[1:-1].max() <= 1e-5


@pytest.mark.parametrize("split", ["none", "bbox"])
def test_mask_and_ranges_match_pyfai(ai, rings, tmp_path, split):
    mask = np.zeros(rings.shape, np.int8)
    mask[1000:1060, :] = 1  # a gap between modules
    mask[:, 1500:1530] = 1
    mask[1020:1030, 1010:1040] = 1  # the beam stop
    np.save(tmp_path / "mask.npy", mask)
    step = AzimuthalIntegration(
        poni=DEMO, unit="q_nm^-1", pixel_splitting=split, mask=str(tmp_path / "mask.npy"),
        azimuth_range=[-30, 60], radial_range=[5.0, 25.0],
    )  # fmt: skip
    ours = step(rings, {})
    theirs = ai.integrate1d(
        rings, 1000, unit="q_nm^-1", method=(PYFAI_SPLIT[split], "csr", "cython"), mask=mask,
        azimuth_range=(-30, 60), radial_range=(5.0, 25.0),
    )  # fmt: skip
    np.testing.assert_allclose(ours["radial"], theirs.radial, rtol=1e-12)
    filled = theirs.intensity != 0
    assert np.array_equal(ours["intensity"] != 0, filled)
    assert relative(ours["intensity"][filled], theirs.intensity[filled])[1:-1].max() <= TOLERANCE[split]


@pytest.mark.parametrize("split", ["none", "bbox"])
def test_caking_matches_pyfai_integrate2d(ai, rings, split):
    step = Caking(
        poni=DEMO, npt=1000, npt_azim=360, unit="2th_deg", pixel_splitting=split, polarization_factor=0.95
    )
    ours = step(rings, {})
    theirs = ai.integrate2d(
        rings,
        1000,
        360,
        unit="2th_deg",
        method=(PYFAI_SPLIT[split], "csr", "cython"),
        polarization_factor=0.95,
    )
    assert ours["cake"].shape == theirs.intensity.shape == (360, 1000)
    assert ours["cake"].dtype == np.float32
    np.testing.assert_allclose(ours["radial"], theirs.radial, rtol=1e-12)
    np.testing.assert_allclose(ours["azimuthal"], theirs.azimuthal, rtol=1e-12, atol=1e-12)
    filled = theirs.intensity != 0
    assert np.array_equal(ours["cake"] != 0, filled)
    assert relative(ours["cake"][filled], theirs.intensity[filled]).max() <= 1e-5


# ---------------------------------------------------------------- against the numpy reference


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 256 x 240 detector, tilted and rotated, the beam off-centre, and a mask file."""
    folder = tmp_path_factory.mktemp("small")
    g = G.PoniGeometry(
        dist=0.08, poni1=0.011, poni2=0.012, rot1=0.03, rot2=-0.02, rot3=0.4, wavelength=0.7e-10,
        pixel1=1.0e-4, pixel2=1.1e-4, shape=(256, 240),
    )  # fmt: skip
    G.write_poni(g, folder / "small.poni")
    mask = np.zeros(g.shape, np.uint8)
    mask[100:110, :] = 1
    np.save(folder / "mask.npy", mask)
    return {"poni": str(folder / "small.poni"), "mask": str(folder / "mask.npy"), "geometry": g}


def small_frame(dtype=np.float32, nan_fraction=0.0, seed=3):
    rng = np.random.default_rng(seed)
    frame = rng.integers(0, 5000, (256, 240)).astype(dtype)
    if nan_fraction:
        frame[rng.random(frame.shape) < nan_fraction] = np.nan
    return frame


def result(out):
    return out["cake"] if "cake" in out else out["intensity"]


@pytest.mark.parametrize("split", ["none", "bbox"])
@pytest.mark.parametrize("cls", [AzimuthalIntegration, Caking])
@pytest.mark.parametrize("azimuth_range", [None, [-45, 30], [100, 250]])
def test_kernel_matches_numpy_reference(small, split, cls, azimuth_range):
    extra = {"npt_azim": 24} if cls is Caking else {}
    step = cls(
        poni=small["poni"], npt=120, unit="q_A^-1", pixel_splitting=split, azimuth_range=azimuth_range,
        mask=small["mask"], polarization_factor=0.9, **extra,
    )  # fmt: skip
    frame = small_frame(nan_fraction=0.01)
    pixel_mask = np.zeros(frame.shape, bool)
    pixel_mask[:, 200:203] = True
    for meta in ({}, {"pixel_mask": pixel_mask}):
        got = result(step(frame, meta))
        expected = step.reference(frame, meta)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)
        assert np.count_nonzero(got) > 0.3 * got.size


@pytest.mark.parametrize("cls", [AzimuthalIntegration, Caking])
@pytest.mark.parametrize("layout", [SPLIT_PAIRS, ENTRIES])
def test_every_matrix_layout_gives_the_reference(small, cls, layout):
    extra = {"npt_azim": 24} if cls is Caking else {}
    step = cls(poni=small["poni"], npt=150, pixel_splitting="bbox", radial_range=[1.0, 9.0], **extra)
    step.rebuild(layout)
    assert step.matrix.layout == layout
    if layout == SPLIT_PAIRS:
        assert step.matrix.extra_weights.size > 0  # pixels cut by the radial range, over three bins...
    frame = small_frame(nan_fraction=0.002)
    pixel_mask = np.zeros(frame.shape, bool)
    pixel_mask[30:40, 30:40] = True
    for meta in ({}, {"pixel_mask": pixel_mask}):
        np.testing.assert_allclose(result(step(frame, meta)), step.reference(frame, meta), rtol=1e-6, atol=0)
    rows, pixels, weights = step.matrix.entries()
    assert rows.size == step.matrix.nnz


def test_every_dtype_gives_the_same_pattern(small):
    step = AzimuthalIntegration(poni=small["poni"], npt=200, pixel_splitting="none")
    frame = small_frame(np.uint16)
    expected = result(step(frame, {}))
    variants = [frame.astype(t) for t in (np.uint32, np.int32, np.int64, np.float32, np.float64)]
    variants += [frame.astype(">u2"), np.asfortranarray(frame), frame.astype(bool)]
    for variant in variants[:-1]:
        np.testing.assert_array_equal(result(step(variant, {})), expected, err_msg=str(variant.dtype))
    np.testing.assert_allclose(result(step(variants[-1], {})), step.reference(variants[-1]), rtol=1e-6)
    with pytest.raises(TypeError, match="numeric"):
        step(frame.astype(np.complex64), {})


@pytest.mark.parametrize("split", ["none", "bbox"])
def test_nan_dummy_and_masked_pixels_are_left_out_alike(small, split):
    frame = small_frame(np.float32)
    bad = np.random.default_rng(5).random(frame.shape) < 0.05
    with_nan = frame.copy()
    with_nan[bad] = np.nan
    with_dummy = frame.copy()
    with_dummy[bad] = -7.1  # stored as float32(-7.1), which is not the float -7.1
    plain = AzimuthalIntegration(poni=small["poni"], npt=150, pixel_splitting=split)
    dummy = AzimuthalIntegration(poni=small["poni"], npt=150, pixel_splitting=split, dummy=-7.1)
    from_nan = result(plain(with_nan, {}))
    np.testing.assert_allclose(
        result(plain(frame, {"pixel_mask": bad.astype(np.uint8)})), from_nan, rtol=1e-12
    )
    np.testing.assert_allclose(result(dummy(with_dummy, {})), from_nan, rtol=1e-12)
    assert not np.allclose(result(plain(frame, {})), from_nan, rtol=1e-6)  # the bad pixels did matter


def test_empty_bins_hold_zero_or_the_dummy(small):
    q = G.radial_array(small["geometry"], "q_nm^-1")
    beyond = [float(q.max()) * 0.9, float(q.max()) * 1.5]
    frame = small_frame()
    zero = result(
        AzimuthalIntegration(poni=small["poni"], npt=50, unit="q_nm^-1", radial_range=beyond)(frame, {})
    )
    flagged = AzimuthalIntegration(
        poni=small["poni"], npt=50, unit="q_nm^-1", radial_range=beyond, dummy=-1.0
    )
    minus = result(flagged(frame, {}))
    empty = minus == -1.0
    assert empty[-10:].all() and not empty[:5].any()
    assert (zero[empty] == 0).all()
    np.testing.assert_array_equal(zero[~empty], minus[~empty])


def test_azimuth_range_across_180_degrees_is_the_whole_sector(small):
    chi = np.degrees(G.chi_array(small["geometry"]))
    outside = (chi > -90) & (chi < 90)  # the sector [90, 270] is the left half
    frame = small_frame()
    sector = AzimuthalIntegration(poni=small["poni"], npt=100, azimuth_range=[90, 270])
    everything = AzimuthalIntegration(poni=small["poni"], npt=100)
    np.testing.assert_allclose(
        result(sector(frame, {})), result(everything(frame, {"pixel_mask": outside})), rtol=1e-12
    )
    cake = Caking(poni=small["poni"], npt=100, npt_azim=30, azimuth_range=[90, 270])
    assert cake.azimuthal[0] == pytest.approx(93) and cake.azimuthal[-1] == pytest.approx(267)


@pytest.mark.parametrize("split", ["none", "bbox"])
@pytest.mark.parametrize("cls", [AzimuthalIntegration, Caking])
def test_isotropic_scatterer_integrates_to_a_constant(small, split, cls):
    """A frame proportional to solid angle x polarisation is a flat pattern once normalised."""
    g = small["geometry"]
    frame = 123.0 * G.solid_angle_array(g) * G.polarization_array(g, 0.8)
    step = cls(poni=small["poni"], npt=80, pixel_splitting=split, polarization_factor=0.8)
    got = result(step(frame, {}))
    assert np.allclose(got[got != 0], 123.0, rtol=1e-5)
    unnormalised = result(
        cls(poni=small["poni"], npt=80, pixel_splitting=split, correct_solid_angle=False)(frame, {})
    )
    assert np.abs(unnormalised[unnormalised != 0] / 123.0 - 1).max() > 0.05


# ---------------------------------------------------------------- configuration, results and metadata


def test_results_axes_and_lavue_metadata(small):
    g = small["geometry"]
    cake = Caking(poni=small["poni"], npt=100, npt_azim=36, unit="2th_deg")
    out = cake(small_frame(), {})
    assert set(out) == {"cake", "radial", "azimuthal"}
    assert out["cake"].shape == (36, 100) and out["radial"].dtype == np.float64
    meta = cake.lavue_metadata()
    x0, y0, dx, dy = meta["axisscales"]
    np.testing.assert_allclose(out["radial"], x0 + dx * (np.arange(100) + 0.5), rtol=1e-9)
    np.testing.assert_allclose(out["azimuthal"], y0 + dy * (np.arange(36) + 0.5), rtol=1e-9, atol=1e-9)
    assert meta["axislabels"] == ["2theta", "chi", "deg", "deg"]
    assert meta["wavelength"] == pytest.approx(0.7)
    assert meta["energy"] == pytest.approx(12398.42 / 0.7, rel=1e-6)
    assert meta["detector_distance"] == pytest.approx(80.0)
    assert (meta["beam_center_x"], meta["beam_center_y"]) == pytest.approx(g.beam_center)
    assert (meta["pixel_size_x"], meta["pixel_size_y"]) == pytest.approx((110.0, 100.0))
    one_d = AzimuthalIntegration(poni=small["poni"], npt=100, unit="q_A^-1")
    assert one_d.lavue_metadata()["axislabels"][::2] == ["q", "A^-1"]


def test_steps_load_by_name_and_share_a_chain_with_prefixes(small):
    chain = StepChain(
        [
            {"azimuthal": {"poni": small["poni"], "npt": 64, "unit": "q_nm^-1", "prefix": "saxs_"}},
            {"azimuthal2d": {"poni": small["poni"], "npt": 64, "npt_azim": 16, "pixel_splitting": "bbox"}},
        ]
    )
    out = chain(small_frame(), {"scan": 1, "index": 0})
    assert set(out) == {"saxs_radial", "saxs_intensity", "cake", "radial", "azimuthal"}


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"unit": "q"}, "unit = 'q'"),
        ({"pixel_splitting": "full"}, "pixel_splitting = 'full'"),
        ({"npt": 0}, "npt = 0"),
        ({"polarization_factor": 2.0}, "polarization_factor = 2.0"),
        ({"radial_range": [5, 1]}, "radial_range = \\[5, 1\\]"),
        ({"azimuth_range": [0, 400]}, "azimuth_range"),
        ({"mask": "/nonexistent/mask.npy"}, "mask = '/nonexistent/mask.npy'"),
        ({"poni": "/nonexistent/g.poni"}, "poni = '/nonexistent/g.poni'"),
        ({"shape": [10]}, "shape = \\[10\\]"),
        ({"npts": 10}, "unknown parameter 'npts'"),
    ],
)
def test_bad_parameters_are_named(small, params, message):
    spec = {"poni": small["poni"], **params}
    with pytest.raises(StepConfigError, match=message):
        load_step({"azimuthal": spec})


def test_frames_and_masks_of_the_wrong_shape_are_errors(small):
    step = AzimuthalIntegration(poni=small["poni"], npt=32)
    with pytest.raises(ValueError, match=r"frame shape \(240, 256\).*\(256, 240\)"):
        step(np.zeros((240, 256), np.uint16), {})
    with pytest.raises(ValueError, match="pixel_mask"):
        step(small_frame(), {"pixel_mask": np.zeros((10, 10), bool)})


def test_tables_are_built_from_the_first_frame_when_the_poni_has_no_shape(small, tmp_path):
    g = small["geometry"]
    G.write_poni(g, tmp_path / "v1.poni", version=1)  # version 1 files carry no detector shape
    lazy = AzimuthalIntegration(poni=str(tmp_path / "v1.poni"), npt=90)
    assert lazy.shape is None
    given = AzimuthalIntegration(poni=str(tmp_path / "v1.poni"), npt=90, shape=[256, 240])
    frame = small_frame()
    reference = AzimuthalIntegration(poni=small["poni"], npt=90)(frame, {})
    np.testing.assert_array_equal(lazy(frame, {})["intensity"], reference["intensity"])
    np.testing.assert_array_equal(given(frame, {})["intensity"], reference["intensity"])
    assert lazy.shape == (256, 240)


def test_unit_conversions_between_results(small):
    frame = small_frame()
    nm = AzimuthalIntegration(poni=small["poni"], npt=70, unit="q_nm^-1")(frame, {})
    angstrom = AzimuthalIntegration(poni=small["poni"], npt=70, unit="q_A^-1")(frame, {})
    np.testing.assert_allclose(angstrom["radial"], nm["radial"] / 10, rtol=1e-12)
    np.testing.assert_array_equal(angstrom["intensity"], nm["intensity"])
    deg = AzimuthalIntegration(poni=small["poni"], npt=70, unit="2th_deg")(frame, {})
    tth = np.radians(deg["radial"])
    wavelength_nm = small["geometry"].wavelength * 1e9
    assert 4 * math.pi / wavelength_nm * math.sin(tth[-1] / 2) == pytest.approx(nm["radial"][-1], rel=0.02)
