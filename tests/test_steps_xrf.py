"""XRF: summed spectra and element windows against numpy, energy calibration, running sums."""

import numpy as np
import pytest

from pipelines.steps import StepConfigError, load_step
from pipelines.steps.xrf import RunningSum, channel_window, xrf_kernel, xrf_reference

OFFSET, GAIN = -0.02, 0.01  # keV: channel c is at -0.02 + 0.01 c


def spectra(n_detectors=7, n_channels=4096, seed=15):
    """Fe K-alpha (6.40 keV) and Cu K-alpha (8.05 keV) lines on a flat background, per detector element."""
    rng = np.random.default_rng(seed)
    energy = OFFSET + GAIN * np.arange(n_channels)
    shape = (
        5 + 800 * np.exp(-(((energy - 6.40) / 0.07) ** 2)) + 300 * np.exp(-(((energy - 8.05) / 0.08) ** 2))
    )
    return rng.poisson(shape, (n_detectors, n_channels)).astype(np.uint32)


def test_kernel_equals_numpy_exactly():
    data = spectra()
    detectors = np.array([0, 2, 3, 6])
    windows = [(600, 700), (0, 4096), (4095, 4096), (10, 10)]
    total, sums = xrf_kernel(
        data, detectors, np.array([w[0] for w in windows]), np.array([w[1] for w in windows])
    )
    expected_total, expected_sums = xrf_reference(data, detectors, windows)
    np.testing.assert_array_equal(total, expected_total)
    np.testing.assert_array_equal(sums, expected_sums)


def test_element_windows_in_energy():
    data = spectra()
    step = load_step(
        {
            "xrf": {
                "elements": {"Fe": [6.253, 6.557], "Cu": [7.903, 8.197]},
                "energy_offset": OFFSET,
                "energy_gain": GAIN,
                "detectors": [0, 1, 2, 3, 4, 5],  # element 6 is dead
            }
        }
    )
    out = step(data, {"scan": 1})
    energy = OFFSET + GAIN * np.arange(4096)
    summed = data[:6].sum(axis=0, dtype=np.int64)
    assert out["Fe"] == summed[(energy >= 6.253) & (energy <= 6.557)].sum()
    assert out["Cu"] == summed[(energy >= 7.903) & (energy <= 8.197)].sum()
    assert out["Fe"] > 2 * out["Cu"] > 0
    np.testing.assert_array_equal(out["spectrum"], summed)


def test_channel_window_edges():
    assert channel_window(10, 20, 100, 0.0, 1.0) == (10, 21)  # inclusive of both channel energies
    assert channel_window(-5, -1, 100, 0.0, 1.0) == (0, 0)  # nothing inside
    assert channel_window(0.5, 0.7, 100, 0.0, 0.01) == (50, 71)


def test_single_spectrum_and_running_sum_per_scan():
    step = load_step({"xrf": {"elements": {"all": [0, 4095]}, "running_sum": True}})
    one = spectra(1)[0]
    first = step(one, {"scan": 7, "index": 0})
    assert first["all"] == one.sum() and first["spectrum"].shape == (4096,)
    second = step(one * 2, {"scan": 7, "index": 1})
    np.testing.assert_array_equal(second["sum_spectrum"], one * 3)
    other = step(one, {"scan": 8, "index": 0})
    np.testing.assert_array_equal(other["sum_spectrum"], one)
    np.testing.assert_array_equal(first["sum_spectrum"], one)  # results emitted earlier do not change


def test_running_sum_keeps_the_last_scans():
    sums = RunningSum(max_scans=2)
    for scan in (1, 2, 1, 3):
        sums.add(scan, np.ones(4))
    assert sums.scans() == [1, 3] and sums.count(1) == 2 and sums.total(2) is None
    np.testing.assert_array_equal(sums.total(1), [2, 2, 2, 2])
    with pytest.raises(ValueError, match="sums shape \\(4,\\)"):
        sums.add(1, np.ones(5))
    sums.drop(1)
    assert sums.scans() == [3]


def test_bad_parameters():
    with pytest.raises(StepConfigError, match="element 'Fe' window \\[7, 6\\]"):
        load_step({"xrf": {"elements": {"Fe": [7, 6]}}})
    with pytest.raises(StepConfigError, match="energy_gain = 0"):
        load_step({"xrf": {"energy_gain": 0}})
    step = load_step({"xrf": {"detectors": [0, 9]}})
    with pytest.raises(ValueError, match="frame has 7 detector"):
        step(spectra(), {})
    with pytest.raises(ValueError, match="expected a spectrum or"):
        step(np.zeros((2, 3, 4)), {})
