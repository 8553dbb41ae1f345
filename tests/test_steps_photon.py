"""Photon counting and thresholding: kernels against numpy, and known photon numbers recovered."""

import numpy as np
import pytest

from pipelines.steps import StepChain, StepConfigError, load_step
from pipelines.steps.photon import photon_kernel, photon_reference, threshold_kernel, threshold_reference


@pytest.fixture(scope="module")
def exposure():
    """Known photons per pixel on a 2048 x 2048 detector with per-pixel pedestal and gain."""
    rng = np.random.default_rng(9)
    shape = (2048, 2048)
    photons = rng.poisson(0.5, shape)
    pedestal = rng.normal(1000, 20, shape)
    gain = rng.uniform(30, 40, shape)
    raw = np.round(pedestal + photons * gain + rng.normal(0, 2, shape)).astype(np.uint16)
    return raw, photons, pedestal, gain


@pytest.mark.parametrize("threshold", [0.5, 0.3, 1.0])
def test_kernel_equals_numpy(exposure, threshold):
    raw, _, pedestal, gain = exposure
    counts = np.empty(raw.shape, np.int32)
    total = photon_kernel(raw, pedestal, gain, threshold, counts)
    expected = photon_reference(raw, pedestal, gain, threshold)
    np.testing.assert_array_equal(counts, expected)
    assert total == expected.sum(dtype=np.int64)


def test_counts_the_photons_that_were_there(tmp_path, exposure):
    raw, photons, pedestal, gain = exposure
    np.save(tmp_path / "pedestal.npy", pedestal)
    np.save(tmp_path / "gain.npy", gain)
    step = load_step(
        {"photon_count": {"pedestal": str(tmp_path / "pedestal.npy"), "gain": str(tmp_path / "gain.npy")}}
    )
    out = step(raw, {})
    assert out["photons"].dtype == np.int32
    np.testing.assert_array_equal(out["photons"], photons)
    assert out["total_photons"] == photons.sum()


def test_threshold_rule_nan_and_dead_gain():
    frame = np.array([[0.0, 4.9, 5.0, 14.9, 15.0, np.nan]], np.float32)
    step = load_step({"photon_count": {"gain": 10.0, "threshold": 0.5}})
    assert step(frame, {})["photons"].tolist() == [[0, 0, 1, 1, 2, 0]]
    gain = np.full(frame.shape, 10.0)
    gain[0, 4] = 0.0  # no valid gain: counts nothing
    counts = np.empty(frame.shape, np.int32)
    photon_kernel(frame, np.zeros(frame.shape), gain, 0.5, counts)
    assert counts.tolist() == [[0, 0, 1, 1, 0, 0]]
    assert counts.tolist() == photon_reference(frame, np.zeros(frame.shape), gain, 0.5).tolist()
    only_total = load_step({"photon_count": {"gain": 10.0, "output": ""}})(frame, {})
    assert only_total == {"total_photons": 4}


def test_threshold_kernel_and_chain():
    rng = np.random.default_rng(10)
    frame = rng.normal(0, 5, (1023, 517)).astype(np.float32)
    frame[rng.random(frame.shape) < 0.01] = np.nan
    out = np.empty(frame.shape, np.float32)
    threshold_kernel(frame, np.float32(2.0), np.float32(9.0), out)
    np.testing.assert_array_equal(out, threshold_reference(frame, 2.0, 9.0))
    frame = np.zeros((40, 40), np.float32)
    frame[10, 30] = 100.0
    frame += np.float32(3.0)  # a pedestal the threshold removes
    chain = StepChain([{"threshold": {"low": 50.0}}, "centre_of_mass"])
    result = chain(frame, {})
    assert (result["com_row"], result["com_col"], result["com_total"]) == (10.0, 30.0, 103.0)


def test_bad_parameters():
    with pytest.raises(StepConfigError, match="gain = 0"):
        load_step({"photon_count": {"gain": 0}})
    with pytest.raises(StepConfigError, match="missing required parameter.*gain"):
        load_step("photon_count")
    with pytest.raises(StepConfigError, match="threshold = 1.5"):
        load_step({"photon_count": {"gain": 10, "threshold": 1.5}})
    with pytest.raises(StepConfigError, match="high = 1"):
        load_step({"threshold": {"low": 2, "high": 1}})
    step = load_step({"photon_count": {"gain": 10, "pedestal": 0}})
    with pytest.raises(ValueError, match="expected a 2D frame"):
        step(np.zeros(5), {})
