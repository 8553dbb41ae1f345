"""Pixel binning: kernel against numpy (exact on integer frames), NaN, the step in a chain."""

import numpy as np
import pytest

from pipelines.steps import StepChain, StepConfigError, load_step
from pipelines.steps.basic import bin_pixels_reference, roi_stats
from pipelines.steps.binning import bin_pixels, bin_reference


@pytest.fixture(scope="module")
def frame():
    rng = np.random.default_rng(6)
    return rng.integers(0, 65535, (2048, 2048), dtype=np.uint16)


@pytest.mark.parametrize("factor", [2, 3, 4, 7, (2, 5)])
@pytest.mark.parametrize("mean", [False, True])
def test_kernel_equals_numpy_on_uint16(frame, factor, mean):
    got = bin_pixels(frame, factor, mean=mean)
    expected = bin_reference(frame, factor, mean=mean)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


def test_odd_shape_cuts_edges_and_sums_exactly():
    frame = np.random.default_rng(7).integers(0, 4096, (1023, 517), dtype=np.uint32)
    got = bin_pixels(frame, 4)
    assert got.shape == (255, 129)
    assert got[0, 0] == frame[:4, :4].sum()
    assert got[-1, -1] == frame[1016:1020, 512:516].sum()
    np.testing.assert_array_equal(got, bin_reference(frame, 4))


def test_nan_pixels_are_skipped():
    rng = np.random.default_rng(8)
    frame = rng.normal(10, 2, (1023, 517)).astype(np.float32)
    frame[rng.random(frame.shape) < 0.1] = np.nan
    frame[:3, :3] = np.nan  # a block with no valid pixel
    for mean in (False, True):
        got = bin_pixels(frame, 3, mean=mean)
        np.testing.assert_allclose(got, bin_reference(frame, 3, mean=mean), rtol=1e-6, equal_nan=True)
    assert bin_pixels(frame, 3)[0, 0] == 0.0 and np.isnan(bin_pixels(frame, 3, mean=True)[0, 0])
    assert not np.isnan(bin_pixels(frame, 3, mean=True)[1:, 1:]).any()


def test_roi_stats_preview_is_unchanged(frame):
    binned = roi_stats(frame, {}, bin=4)["binned"]
    np.testing.assert_array_equal(binned, bin_pixels_reference(frame, 4))


def test_binning_replaces_the_frame_for_later_steps():
    frame = np.ones((64, 48), np.uint16)
    chain = StepChain(
        [
            {"binning": {"factor": [4, 2], "mode": "sum", "output": "frame"}},
            {"roi": {"rois": {"all": [0, 16, 0, 24]}}},
        ]
    )
    out = chain(frame, {})
    assert out["all_sum"] == 64 * 48 and out["all_mean"] == 8.0
    assert load_step({"binning": {"mode": "mean"}})(frame, {})["binned"].shape == (32, 24)


def test_bad_parameters():
    with pytest.raises(StepConfigError, match="factor = 0"):
        load_step({"binning": {"factor": 0}})
    with pytest.raises(StepConfigError, match="factor = \\[2, 2, 2\\]"):
        load_step({"binning": {"factor": [2, 2, 2]}})
    with pytest.raises(StepConfigError, match="mode"):
        load_step({"binning": {"mode": "median"}})
    with pytest.raises(ValueError, match="expected a 2D frame"):
        bin_pixels(np.zeros(10), 2)
