"""ROI statistics: the kernel against numpy on rectangles and arcs, masks, NaN, errors."""

import numpy as np
import pytest

from pipelines.steps import StepConfigError, load_step
from pipelines.steps.roi import roi_selection, roi_stats_kernel, roi_stats_reference


@pytest.fixture(scope="module")
def frame():
    from pipelines.sources.simulator import SimulatedDetector

    return SimulatedDetector(shape=(2048, 2048), dtype="uint16").frame(3)


def full_selection(shape, r0, c0, member):
    selection = np.zeros(shape, bool)
    selection[r0 : r0 + member.shape[0], c0 : c0 + member.shape[1]] = member
    return selection


@pytest.mark.parametrize("rect", [[0, 2048, 0, 2048], [100, 357, 1200, 1717], [2047, 2048, 0, 1]])
def test_rectangle_kernel_matches_numpy_exactly_on_integers(frame, rect):
    r0, c0, member = roi_selection("r", rect, frame.shape)
    got = roi_stats_kernel(frame, r0, c0, member)
    expected = roi_stats_reference(frame, full_selection(frame.shape, r0, c0, member))
    assert got[0] == expected[0] == member.size
    assert got[1] == expected[1]  # sum: exact
    assert got[2] == expected[2]  # mean: exact (same sum / same count)
    assert got[4:] == expected[4:]  # min, max
    assert got[3] == pytest.approx(expected[3], rel=1e-9)


def independent_arc(shape, centre, radius, chi=None):
    rows, cols = np.indices(shape)
    dr, dc = rows - centre[0], cols - centre[1]
    r = np.sqrt(dr**2 + dc**2)
    inside = (r >= radius[0]) & (r < radius[1])
    if chi is not None:
        angle = np.degrees(np.arctan2(dr, dc))
        lo, hi = chi
        inside &= ((angle >= lo) & (angle < hi)) if lo < hi else ((angle >= lo) | (angle < hi))
    return inside


def test_arcs_on_odd_frame_with_nan_match_numpy():
    rng = np.random.default_rng(5)
    shape = (1023, 517)
    frame = rng.normal(50, 10, shape).astype(np.float32)
    frame[rng.random(shape) < 0.05] = np.nan
    rois = {
        "ring": {"centre": [600.5, 250.0], "radius": [100, 180]},
        "sector": {"centre": [600.5, 250.0], "radius": [50, 400], "chi": [-30, 60]},
        "wrap": {"center": [300, 100], "radius": [20, 250], "chi": [170, -170]},
        "box": [10, 20, 500, 517],
    }
    step = load_step({"roi": {"rois": rois, "stats": ["sum", "mean", "std", "min", "max", "npix"]}})
    out = step(frame, {})
    selections = {
        "ring": independent_arc(shape, (600.5, 250.0), (100, 180)),
        "sector": independent_arc(shape, (600.5, 250.0), (50, 400), (-30, 60)),
        "wrap": independent_arc(shape, (300, 100), (20, 250), (170, -170)),
        "box": full_selection(shape, 10, 500, np.ones((10, 17), bool)),
    }
    for name, selection in selections.items():
        npix, total, mean, std, low, high = roi_stats_reference(frame, selection)
        assert npix > 0
        assert out[f"{name}_npix"] == npix
        assert out[f"{name}_sum"] == pytest.approx(total, rel=1e-12)
        assert out[f"{name}_mean"] == pytest.approx(mean, rel=1e-12)
        assert out[f"{name}_std"] == pytest.approx(std, rel=1e-9)
        assert (out[f"{name}_min"], out[f"{name}_max"]) == (low, high)


def test_arc_area_is_the_sector_area():
    r0, c0, member = roi_selection(
        "a", {"centre": [1000, 1000], "radius": [300, 400], "chi": [10, 100]}, (2048, 2048)
    )
    assert member.sum() == pytest.approx(np.pi * (400**2 - 300**2) * 90 / 360, rel=0.005)
    r0, c0, member = roi_selection("clipped", {"centre": [0, 0], "radius": [0, 100]}, (2048, 2048))
    assert (r0, c0) == (0, 0) and member.sum() == pytest.approx(np.pi * 100**2 / 4, rel=0.02)


def test_mask_file_and_empty_roi(tmp_path):
    frame = np.arange(100, dtype=np.uint16).reshape(10, 10)
    mask = np.zeros((10, 10), np.uint8)
    mask[0, :] = 1
    np.save(tmp_path / "mask.npy", mask)
    step = load_step(
        {"roi": {"rois": {"top": [0, 2, 0, 10], "gone": [0, 1, 0, 5]}, "mask": str(tmp_path / "mask.npy")}}
    )
    out = step(frame, {})
    assert out["top_sum"] == float(frame[1].sum()) and out["top_min"] == 10.0
    assert out["gone_sum"] == 0.0
    assert all(np.isnan(out[f"gone_{s}"]) for s in ("mean", "std", "min", "max"))


def test_bad_rois_are_reported_by_name():
    step = load_step({"roi": {"rois": {"big": [0, 11, 0, 4]}}})
    with pytest.raises(ValueError, match="roi 'big'.*does not fit a frame of shape \\(10, 10\\)"):
        step(np.zeros((10, 10)), {})
    with pytest.raises(StepConfigError, match="roi 'flat'.*row0 < row1"):
        load_step({"roi": {"rois": {"flat": [3, 3, 0, 4]}}})
    with pytest.raises(StepConfigError, match="roi 'arc'.*r_min < r_max"):
        load_step({"roi": {"rois": {"arc": {"centre": [5, 5], "radius": [4, 2]}}}})
    with pytest.raises(StepConfigError, match="unknown keys \\['phi'\\]"):
        load_step({"roi": {"rois": {"arc": {"centre": [5, 5], "radius": [1, 2], "phi": [0, 1]}}}})
    with pytest.raises(StepConfigError, match="roi 'arc': chi = \\[0\\]"):
        load_step({"roi": {"rois": {"arc": {"centre": [5, 5], "radius": [1, 2], "chi": [0]}}}})
    with pytest.raises(StepConfigError, match="stats \\['median'\\] unknown"):
        load_step({"roi": {"rois": {"a": [0, 1, 0, 1]}, "stats": ["median"]}})
    with pytest.raises(ValueError, match="lies outside the frame"):
        load_step({"roi": {"rois": {"far": {"centre": [500, 500], "radius": [0, 10]}}}})(
            np.zeros((10, 10)), {}
        )
