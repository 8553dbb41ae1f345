"""The modality simulators: deterministic frames, their metadata, the physics they simulate,
and clear errors for bad parameters."""

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from pipelines.calibration_store import load_mask
from pipelines.definition import DefinitionError, PipelineDefinition
from pipelines.geometry import chi_array, two_theta_array
from pipelines.sources import SOURCES, SourceError, load_source
from pipelines.sources.simulators import (
    K_LINES,
    SimulatedDiffraction,
    SimulatedDPC,
    SimulatedHits,
    SimulatedMCA,
    SimulatedTomography,
)
from pipelines.steps.maps import grid_position
from pipelines.steps.tomo import fbp

ROOT = Path(__file__).resolve().parent.parent

#: kind -> (small parameters for fast tests, frame shape, dtype)
SMALL = {
    "simulator_mca": (
        {"n_channels": 512, "energy_gain": 0.04, "n_detectors": 3, "scan_shape": [4, 5]},
        (3, 512),
        "uint32",
    ),
    "simulator_dpc": ({"shape": [64, 80], "disc_radius": 10, "scan_shape": [5, 6]}, (64, 80), "uint16"),
    "simulator_hits": ({"shape": [96, 128], "hit_fraction": 0.5, "frames": 12}, (96, 128), "uint16"),
    "simulator_tomo": ({"shape": [24, 40], "frames": 12, "angle_step": 15.0}, (24, 40), "uint16"),
}


def collect(source, scan):
    return list(source.frames(scan))


@pytest.fixture(scope="module")
def xrd():
    return SimulatedDiffraction(textured=[2])


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_frames_are_deterministic_from_seed_and_index_and_recomputable(kind):
    params, shape, dtype = SMALL[kind]
    source = load_source({"kind": kind, "rate_hz": 0, **params})
    frames = collect(source, {})
    assert len(frames) == source.scan_defaults()["frames"] > 0
    for i, (frame, meta) in enumerate(frames):
        assert frame.shape == shape and frame.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(frame, source.frame(i))
        assert meta["exposure_time"] == 0.0
    again = load_source({"kind": kind, "rate_hz": 0, **params})
    np.testing.assert_array_equal(again.frame(3), frames[3][0])
    other_seed = load_source({"kind": kind, "rate_hz": 0, "seed": 8, **params})
    assert not np.array_equal(other_seed.frame(3), frames[3][0])
    assert not np.array_equal(frames[2][0], frames[3][0])
    assert source.describe()["detector"] == kind


def test_every_simulator_is_registered_and_stops_when_asked():
    assert {"simulator_xrd", "simulator_mca", "simulator_dpc", "simulator_hits", "simulator_tomo"} <= set(
        SOURCES
    )
    source = SimulatedTomography(shape=[16, 24], rate_hz=1000, frames=10_000)
    got = []
    for frame, _ in source.frames({}):
        got.append(frame)
        if len(got) == 3:
            source.stop()
    assert len(got) == 3


def test_xrd_frames_rings_at_the_bragg_angles_of_the_poni_geometry(xrd):
    frame = xrd.frame(0)
    assert frame.shape == (2048, 2048) and frame.dtype == np.uint16
    tth = np.degrees(two_theta_array(xrd.geometry, xrd.shape))
    mean_counts = xrd.expected_image(0)
    good = ~xrd.bad_pixel_mask()
    # within a ring's width the pixels are far brighter than half-way to the next ring
    for n, angle in enumerate(xrd.two_theta_deg):
        on = good & (np.abs(tth - angle) < xrd.ring_width_deg)
        off = good & (np.abs(tth - angle - 0.25) < xrd.ring_width_deg)
        assert mean_counts[on].mean() > 3 * mean_counts[off].mean(), n
        assert frame[on].mean() > 3 * frame[off].mean(), n
    # the Bragg angles are those of the d-spacings at the PONI wavelength
    wavelength = xrd.geometry.wavelength * 1e10
    np.testing.assert_allclose(
        np.sin(np.radians(xrd.two_theta_deg) / 2) * 2 * np.asarray(xrd.d_spacings), wavelength
    )


def test_xrd_textured_ring_varies_as_cos_2chi_and_rings_strengthen_frame_by_frame(xrd):
    tables = xrd._tables()
    ring = np.abs(tables["tth"] - xrd.two_theta_deg[2]) < 0.5 * xrd.ring_width_deg
    plain = np.abs(tables["tth"] - xrd.two_theta_deg[0]) < 0.5 * xrd.ring_width_deg
    chi = chi_array(xrd.geometry, xrd.shape)
    seen = xrd.expected_image(0) / tables["response"]  # counts corrected for solid angle and polarisation

    def sector(mask, centre_deg):
        near = mask & (np.abs(np.degrees(np.angle(np.exp(1j * (chi - np.radians(centre_deg)))))) < 10)
        return seen[near].mean()

    along, across = sector(ring, 0) + sector(ring, 180), sector(ring, 90) + sector(ring, -90)
    assert along / across == pytest.approx((1 + xrd.texture) / (1 - xrd.texture), rel=0.1)
    assert (sector(plain, 0) + sector(plain, 180)) / (
        sector(plain, 90) + sector(plain, -90)
    ) == pytest.approx(1, abs=0.03)
    on_ring = ring & ~xrd.bad_pixel_mask()
    totals = [xrd.frame(i)[on_ring].sum(dtype=np.int64) for i in range(3)]
    assert totals[1] / totals[0] == pytest.approx(xrd.ring_gain(1) / xrd.ring_gain(0), rel=0.02)
    assert totals[2] / totals[0] == pytest.approx(xrd.ring_gain(2) / xrd.ring_gain(0), rel=0.02)


def test_xrd_detector_defects_are_what_the_shipped_mask_masks(xrd):
    frame = xrd.frame(1)
    mask = xrd.bad_pixel_mask()
    gaps, hot = xrd._gaps_and_hot()
    assert (frame.flat[gaps] == 0).all() and (frame.flat[hot] == np.iinfo(np.uint16).max).all()
    x, y = xrd.geometry.with_shape(xrd.shape).beam_center
    shadow = frame[int(y) - 10 : int(y) + 10, int(x) - 10 : int(x) + 10]
    assert shadow.mean() < 0.05 * frame[~mask].mean()  # the beamstop shades the direct beam
    # the mask the XRD preset's calibration uses is this detector's
    np.testing.assert_array_equal(load_mask(str(ROOT / "config" / "geometry" / "demo_mask.h5")), mask)


def test_mca_element_windows_follow_the_concentration_maps():
    source = SimulatedMCA(scan_shape=[12, 15], n_detectors=2, snake=True)
    assert source.frame(0).shape == (2, 2048) and source.frame(0).dtype == np.uint32
    windows = {name: (K_LINES[name][0] - 0.15, K_LINES[name][0] + 0.15) for name in source.elements}
    maps = {name: np.full((12, 15), np.nan) for name in source.elements}
    for i in range(12 * 15):
        row, col = grid_position(i, [12, 15], snake=True)
        spectrum = source.frame(i).sum(axis=0)
        for name, (low, high) in windows.items():
            maps[name][row, col] = spectrum[(source.energy >= low) & (source.energy <= high)].sum()
    for name in source.elements:
        truth = source.concentration_map(name)
        assert truth.std() > 0.1  # every element varies across the sample
        assert np.corrcoef(maps[name].ravel(), truth.ravel())[0, 1] > 0.98, name
    # different elements sit in different places
    fe, cu = source.concentration_map("Fe"), source.concentration_map("Cu")
    assert abs(np.corrcoef(fe.ravel(), cu.ravel())[0, 1]) < 0.8


def test_mca_spectrum_has_k_lines_and_scatter_peaks_where_physics_puts_them():
    source = SimulatedMCA(elements=["Fe", "Zn"], scan_shape=[3, 3], counts=5000, scatter=3000)
    mean = source.expected_spectrum(4)  # the centre point
    energy = source.energy

    def peak_at(low, high):
        inside = (energy >= low) & (energy <= high)
        return energy[inside][np.argmax(mean[inside])]

    for name in ("Fe", "Zn"):
        alpha, beta, _ = K_LINES[name]
        assert peak_at(alpha - 0.2, alpha + 0.2) == pytest.approx(alpha, abs=0.011)
        assert peak_at(beta - 0.1, beta + 0.1) == pytest.approx(beta, abs=0.011)
    assert peak_at(11.9, 12.1) == pytest.approx(12.0, abs=0.011)  # elastic
    compton = 12.0 / (1 + 12.0 / 511)  # a shoulder below the elastic peak, none above it
    at = np.interp([compton, 24.0 - compton], energy, mean)
    assert at[0] > 5 * at[1]
    assert mean[energy > 13.0].max() < 1e-3  # nothing well above the beam energy


def test_mapping_sources_take_the_grid_from_start_scan_and_put_it_in_every_frame():
    source = SimulatedDPC(shape=[48, 48], disc_radius=8, scan_shape=[4, 5], rate_hz=0)
    frames = collect(source, {"scan_shape": [2, 3], "snake": True})
    assert len(frames) == 6
    assert all(meta["scan_shape"] == [2, 3] and meta["snake"] is True for _, meta in frames)
    np.testing.assert_array_equal(frames[3][0], source.frame(3, [2, 3], True))
    # point 3 of a 2 x 3 snake is the last column of row 1: the right end of the sample
    assert source.position(3, [2, 3], True) == pytest.approx((0.75, 5 / 6))
    assert len(collect(source, {"frames": 7})) == 7  # part of the default 4 x 5 grid
    with pytest.raises(SourceError, match=r"asks for 30 frames but its grid \[4, 5\] has 20 points"):
        collect(source, {"frames": 30})
    with pytest.raises(SourceError, match="scan_shape"):
        collect(source, {"scan_shape": [0, 3]})
    assert source.scan_defaults() == {"frames": 20, "scan_shape": [4, 5], "snake": False}


def test_dpc_disc_moves_with_the_phase_gradient_and_dims_with_absorption():
    source = SimulatedDPC(scan_shape=[10, 12], max_shift=2.5, absorption=0.4)
    shifts = np.array([source.beam_shift(i) for i in range(120)])
    assert (
        1.5 < np.hypot(shifts[:, 0], shifts[:, 1]).max() <= 2.5 + 1e-9
    )  # at most max_shift, near it somewhere
    for i in (0, 17, 55, 119):
        d_row, d_col = source.beam_shift(i)
        row, col = ndimage.center_of_mass(source.expected_frame(i) - source.background)
        assert row - source.centre[0] == pytest.approx(d_row, abs=0.01)
        assert col - source.centre[1] == pytest.approx(d_col, abs=0.01)
        noisy = source.frame(i).astype(float)
        noisy[noisy < 20] = 0  # as the DPC preset's threshold
        row, col = ndimage.center_of_mass(noisy)
        assert row - source.centre[0] == pytest.approx(d_row, abs=0.15)
        assert col - source.centre[1] == pytest.approx(d_col, abs=0.15)
    totals = np.array([source.frame(i).sum() - source.background * 128 * 128 for i in range(120)])
    transmission = np.array([source.transmission(i) for i in range(120)])
    assert transmission.min() == pytest.approx(np.exp(-0.4), abs=0.05)
    np.testing.assert_allclose(totals, source.counts * transmission, rtol=0.02)
    rows, cols = source.shift_maps()
    assert rows[3, 7] == pytest.approx(source.beam_shift(3 * 12 + 7)[0])
    assert cols[3, 7] == pytest.approx(source.beam_shift(3 * 12 + 7)[1])


def test_hits_are_sparse_bright_peaks_on_a_photon_background():
    source = SimulatedHits(hit_fraction=0.1, frames=400)
    hits = [i for i in range(400) if source.is_hit(i)]
    assert 20 <= len(hits) <= 60
    for i in range(40):
        peaks = source.peaks(i)
        assert (len(peaks) > 0) == source.is_hit(i)
        if len(peaks):
            assert 20 <= len(peaks) <= 60 and (peaks[:, 2] >= 80).all()
            assert (peaks[:, :2] > 5).all() and (peaks[:, :2] < 506).all()
    hit, blank = hits[0], next(i for i in range(400) if not source.is_hit(i))
    frame = source.frame(hit)
    photons = (frame.astype(float) - source.pedestal) / source.gain
    np.testing.assert_allclose(photons, source.photons(hit), atol=0.65)  # read noise of 1 ADU is 0.1 photon
    for row, col, n in source.peaks(hit)[:10]:
        r, c = int(round(row)), int(round(col))
        assert photons[r - 3 : r + 4, c - 3 : c + 4].sum() > 0.8 * n
    blank_photons = source.photons(blank)
    assert blank_photons.max() < 8 and blank_photons.mean() == pytest.approx(
        source.background_photons.mean(), rel=0.05
    )
    assert source.expected_photons(hit).sum() == pytest.approx(
        source.background_photons.sum() + source.peaks(hit)[:, 2].sum()
    )


def test_tomography_projections_mirror_at_180_degrees_and_reconstruct_the_phantom():
    source = SimulatedTomography(shape=[64, 96], angle_step=2.0, frames=90)
    p0, p180, p90 = source.projection(0), source.projection(180), source.projection(90)
    np.testing.assert_allclose(p180, p0[:, ::-1], atol=1e-9)
    assert not np.allclose(p90, p0)
    # each projection conserves the slice's total attenuation
    row = 32
    assert p0[row].sum() == pytest.approx(source.slice_image(row).sum(), rel=0.02)
    assert p90[row].sum() == pytest.approx(p0[row].sum(), rel=0.005)
    frames = collect(source, {"rate_hz": 0})
    assert [meta["angle"] for _, meta in frames] == [2.0 * i for i in range(90)]
    sinogram = np.stack([-np.log(frame[row] / source.flat) for frame, _ in frames])
    assert np.abs(sinogram[45] - p90[row]).mean() < 0.03  # Poisson noise of up to 10000 counts
    image = fbp(sinogram, [meta["angle"] for _, meta in frames], source.centre)
    truth = source.slice_image(row)
    assert np.corrcoef(image.ravel(), truth.ravel())[0, 1] > 0.95


BAD_PARAMETERS = [
    (
        "simulator_xrd",
        {"d_spacings": [0.01]},
        "d_spacings = \\[0.01\\]; expected .*above half the wavelength",
    ),
    ("simulator_xrd", {"textured": [6]}, "textured = \\[6\\]; expected a list of ring numbers 0..5"),
    ("simulator_xrd", {"intensities": [1, 2]}, "intensities = \\[1, 2\\]; expected 6 counts"),
    ("simulator_xrd", {"dtype": "float32"}, "dtype = 'float32'; expected an unsigned integer type"),
    ("simulator_mca", {"elements": ["Fe", "Xx"]}, "elements = \\['Fe', 'Xx'\\]; expected .*element symbols"),
    (
        "simulator_mca",
        {"elements": ["Sr"], "beam_energy_kev": 12.0},
        "elements = \\['Sr'\\]; expected elements the beam excites: the K edge of Sr \\(16.105 keV\\) is above 12.0",
    ),
    ("simulator_mca", {"scan_shape": [3, 0]}, "scan_shape = \\[3, 0\\]; expected \\[n_slow, n_fast\\]"),
    ("simulator_mca", {"energy_gain": 0}, "energy_gain = 0; expected keV per channel > 0"),
    ("simulator_dpc", {"disc_radius": 60}, "disc_radius = 60; expected a disc that stays on the"),
    ("simulator_dpc", {"snake": "yes"}, "snake = 'yes'; expected true or false"),
    (
        "simulator_hits",
        {"peaks_per_hit": [30, 10]},
        "peaks_per_hit = \\[30, 10\\]; expected \\[fewest, most\\]",
    ),
    ("simulator_hits", {"hit_fraction": 1.5}, "hit_fraction = 1.5; expected a number in \\[0, 1\\]"),
    ("simulator_tomo", {"angle_step": 0}, "angle_step = 0; expected degrees per frame, not 0"),
    ("simulator_tomo", {"centre": 2}, "centre = 2; expected the rotation axis' column"),
    ("simulator_tomo", {"rate_hz": -1}, "rate_hz = -1; expected a number >= 0"),
]


@pytest.mark.parametrize("kind,params,message", BAD_PARAMETERS)
def test_bad_parameters_name_source_parameter_value_and_expectation(kind, params, message):
    with pytest.raises(ValueError, match=f"^{kind}: {message}"):
        load_source({"kind": kind, **params})


def test_definition_rejects_unknown_and_mistyped_simulator_parameters():
    base = {"name": "t", "groups": {"main": {"steps": []}}}
    with pytest.raises(
        DefinitionError, match="master.source: source 'simulator_mca': unknown parameter 'grid'"
    ):
        PipelineDefinition({**base, "master": {"source": {"kind": "simulator_mca", "grid": [2, 2]}}})
    with pytest.raises(DefinitionError, match="parameter 'frames' = 'many' is not a int"):
        PipelineDefinition({**base, "master": {"source": {"kind": "simulator_tomo", "frames": "many"}}})
