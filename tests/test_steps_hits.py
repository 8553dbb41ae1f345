"""Hit finding: the numba peak finder against numpy/scipy, and planted peaks found where they are."""

import numpy as np
import pytest

from pipelines.steps import StepConfigError, load_step
from pipelines.steps.hits import HitFinder, find_peaks_reference

RULES = {"min_snr": 6.0, "min_adc": 0.0, "min_pix": 2, "max_pix": 200, "iterations": 5}


def diffraction_frame(shape, n_spots, seed, centre=None):
    """Poisson background falling off from the beam centre, with Gaussian spots at known places."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    centre = centre or ((rows - 1) / 2, (cols - 1) / 2)
    r = np.hypot(np.arange(rows)[:, None] - centre[0], np.arange(cols)[None, :] - centre[1])
    frame = rng.poisson(20 + 60 * np.exp(-r / 300)).astype(np.float32)
    spots = []
    while len(spots) < n_spots:
        spot = rng.uniform([10, 10], [rows - 10, cols - 10])
        if all(np.hypot(*(spot - s)) > 12 for s in spots):
            spots.append(spot)
    y, x = np.mgrid[-4:5, -4:5]
    for sr, sc in spots:
        ir, ic = int(sr), int(sc)
        fr, fc = sr - ir, sc - ic
        frame[ir - 4 : ir + 5, ic - 4 : ic + 5] += 600 * np.exp(-((y - fr) ** 2 + (x - fc) ** 2) / 2.0)
    for _ in range(20):  # hot pixels: too small to be peaks
        frame[rng.integers(0, rows), rng.integers(0, cols)] += 5000
    return frame, np.array(spots)


@pytest.fixture(scope="module")
def crystal():
    return diffraction_frame((2048, 2048), 40, seed=11)


def test_kernels_match_reference_and_find_every_spot(crystal):
    frame, spots = crystal
    finder = HitFinder(**RULES, min_peaks=10)
    n, peaks = finder.find_peaks(frame)
    bins, n_bins = finder.bins(frame.shape)
    expected = find_peaks_reference(frame, bins, n_bins, **RULES)
    assert n == len(expected) == len(spots)
    np.testing.assert_allclose(peaks, expected, rtol=1e-5)
    for sr, sc in spots:
        distance = np.hypot(peaks[:, 0] - sr, peaks[:, 1] - sc)
        assert distance.min() < 0.3
    assert (peaks[:, 3] >= 2).all()
    assert np.median(peaks[:, 2]) == pytest.approx(600 * 2 * np.pi, rel=0.15)  # integrated Gaussian


def test_hit_emits_derived_stream_and_a_blank_frame_does_not(crystal):
    frame, spots = crystal
    step = load_step({"hit_finder": {"min_peaks": 10}})
    out = step(frame, {"scan": 1, "index": 0})
    assert out["hit"] == 1 and out["n_peaks"] == len(spots)
    assert out["hits/peaks"].shape == (len(spots), 4) and out["hits/frame"] is frame
    blank, _ = diffraction_frame((2048, 2048), 0, seed=12)
    out = step(blank, {"scan": 1, "index": 1})
    assert out == {"n_peaks": 0, "hit": 0}
    few = load_step({"hit_finder": {"min_peaks": 41, "stream": "xtal", "keep_frame": False}})
    assert few(frame, {})["hit"] == 0
    lenient = load_step({"hit_finder": {"min_peaks": 40, "stream": "xtal", "keep_frame": False}})
    assert set(lenient(frame, {})) == {"n_peaks", "hit", "xtal/peaks"}


def test_odd_shape_global_background_nan_and_mask(tmp_path):
    frame, spots = diffraction_frame((1023, 517), 12, seed=13)
    frame[np.random.default_rng(14).random(frame.shape) < 0.01] = np.nan
    mask = np.zeros(frame.shape, np.uint8)
    hidden = spots[0].astype(int)
    mask[hidden[0] - 5 : hidden[0] + 6, hidden[1] - 5 : hidden[1] + 6] = 1
    np.save(tmp_path / "mask.npy", mask)
    for background in ("radial", "global"):
        finder = HitFinder(**RULES, background=background, mask=str(tmp_path / "mask.npy"), bin_width=3.0)
        n, peaks = finder.find_peaks(frame)
        bins, n_bins = finder.bins(frame.shape)
        expected = find_peaks_reference(frame, bins, n_bins, **RULES)
        assert n == len(expected)
        np.testing.assert_allclose(peaks, expected, rtol=1e-5)
        assert np.hypot(peaks[:, 0] - spots[0][0], peaks[:, 1] - spots[0][1]).min() > 4  # masked away
    assert n >= 9  # a NaN may split or shrink a spot, but most remain


def test_max_peaks_truncates_list_but_not_count(crystal):
    frame, spots = crystal
    n, peaks = HitFinder(max_peaks=5).find_peaks(frame)
    assert n == len(spots) and peaks.shape == (5, 4)
    assert HitFinder(max_pix=3).find_peaks(frame)[0] < len(spots)  # spots have more pixels than that


def test_bad_parameters():
    with pytest.raises(StepConfigError, match="min_snr = 0"):
        load_step({"hit_finder": {"min_snr": 0}})
    with pytest.raises(StepConfigError, match="max_pix = 1; expected an int >= min_pix"):
        load_step({"hit_finder": {"min_pix": 2, "max_pix": 1}})
    with pytest.raises(StepConfigError, match="stream = 'a/b'"):
        load_step({"hit_finder": {"stream": "a/b"}})
    with pytest.raises(StepConfigError, match="background"):
        load_step({"hit_finder": {"background": "local"}})
