"""Centre of mass for DPC: the kernel against scipy.ndimage.center_of_mass."""

import numpy as np
import pytest
from scipy import ndimage

from pipelines.steps import StepConfigError, load_step
from pipelines.steps.dpc import com_kernel, com_reference


@pytest.fixture(scope="module")
def frame():
    from pipelines.sources.simulator import SimulatedDetector

    return SimulatedDetector(shape=(2048, 2048), dtype="uint16").frame(2)


def test_whole_frame_matches_scipy(frame):
    total, row, col = com_kernel(frame, 0, 2048, 0, 2048, -np.inf)
    expected_row, expected_col = ndimage.center_of_mass(frame.astype(np.float64))
    assert total == frame.sum(dtype=np.int64)  # exact for integers
    assert row == pytest.approx(expected_row, rel=1e-12)
    assert col == pytest.approx(expected_col, rel=1e-12)


@pytest.mark.parametrize("roi", [(100, 1123, 7, 524), (0, 1, 0, 2048), (2000, 2048, 2000, 2048)])
@pytest.mark.parametrize("threshold", [-np.inf, 25.0, 400.0])
def test_roi_and_threshold_match_reference(frame, roi, threshold):
    got = com_kernel(frame, *roi, threshold)
    expected = com_reference(frame, roi, threshold)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_step_follows_a_moving_beam_and_skips_nan():
    rows, cols = np.mgrid[0:256, 0:300]
    step = load_step({"centre_of_mass": {"roi": [0, 256, 0, 300], "threshold": 1.0, "prefix": "beam"}})
    for centre in [(128.0, 150.0), (120.25, 161.5)]:
        beam = 1000 * np.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / (2 * 6.0**2))
        beam = beam.astype(np.float32)
        beam[5, 5] = np.nan
        out = step(beam, {})
        assert out["beam_row"] == pytest.approx(centre[0], abs=1e-3)
        assert out["beam_col"] == pytest.approx(centre[1], abs=1e-3)
        assert out["beam_total"] == pytest.approx(1000 * 2 * np.pi * 36, rel=1e-3)


def test_empty_frame_gives_nan_centre():
    out = load_step("centre_of_mass")(np.zeros((10, 10), np.uint16), {})
    assert out["com_total"] == 0.0 and np.isnan(out["com_row"]) and np.isnan(out["com_col"])


def test_bad_roi():
    with pytest.raises(StepConfigError, match="roi = \\[5, 5, 0, 3\\]"):
        load_step({"centre_of_mass": {"roi": [5, 5, 0, 3]}})
    step = load_step({"centre_of_mass": {"roi": [0, 20, 0, 3]}})
    with pytest.raises(ValueError, match="does not fit"):
        step(np.zeros((10, 10)), {})
