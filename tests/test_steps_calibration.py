"""Calibration step and calibration folder: kernels against the numpy reference, files, validity ranges."""

import os

import h5py
import numpy as np
import pytest
import tifffile

from pipelines.calibration_store import CalibrationStore, load_array, load_mask
from pipelines.steps import StepConfigError, load_step
from pipelines.steps.calibration import (
    common_mode_kernel,
    common_mode_segments,
    correct_kernel,
    correct_reference,
)


@pytest.fixture(scope="module")
def detector():
    """A 2048 x 2048 uint16 frame with its pedestal, gain and bad pixels."""
    rng = np.random.default_rng(1)
    shape = (2048, 2048)
    dark = rng.normal(100.0, 5.0, shape).astype(np.float32)
    gain = rng.uniform(8.0, 12.0, shape).astype(np.float32)
    photons = rng.poisson(0.3, shape)
    raw = np.clip(dark + photons * gain + rng.normal(0, 2, shape), 0, 65535).astype(np.uint16)
    bad = rng.random(shape) < 0.01
    return raw, dark, gain, bad


@pytest.mark.parametrize("fill", [np.nan, 0.0])
def test_correct_kernel_matches_reference(detector, fill):
    raw, dark, gain, bad = detector
    scale = np.where(bad, 0, 1 / gain).astype(np.float32)
    out = np.empty(raw.shape, np.float32)
    correct_kernel(raw, dark, scale, bad, np.float32(fill), out)
    expected = correct_reference(raw, dark, scale, bad, fill)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-5, equal_nan=True)
    assert np.isnan(out[bad]).all() if np.isnan(fill) else (out[bad] == 0).all()


@pytest.mark.parametrize("per_row", [False, True])
def test_common_mode_kernel_matches_reference_on_odd_shape(per_row):
    rng = np.random.default_rng(2)
    shape = (1023, 517)
    frame = rng.normal(0, 3, shape).astype(np.float32)
    frame[rng.random(shape) < 0.02] = np.nan
    frame[rng.random(shape) < 0.01] += 500  # photons, left out of the median by max_value
    segments = common_mode_segments(shape, (256, 128), per_row)
    scale = rng.uniform(0.5, 2, shape).astype(np.float32)
    expected = correct_reference(
        frame, np.zeros(shape, np.float32), scale, np.isnan(frame), np.nan, segments, 50.0
    )
    out = frame.copy()
    common_mode_kernel(out, segments, np.float32(50.0), scale, np.float32(np.nan))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4, equal_nan=True)


def test_common_mode_segments_tile_the_frame():
    segments = common_mode_segments((1023, 517), (256, 128), per_row=False)
    covered = np.zeros((1023, 517), int)
    for r0, r1, c0, c1 in segments:
        covered[r0:r1, c0:c1] += 1
    assert (covered == 1).all()
    rows = common_mode_segments((1023, 517), (256, 128), per_row=True)
    assert len(rows) == 1023 * 5 and (rows[:, 1] - rows[:, 0] == 1).all()


def test_common_mode_removes_panel_offsets_and_keeps_photons():
    rng = np.random.default_rng(3)
    shape = (512, 512)
    dark = np.full(shape, 50.0, np.float32)
    offsets = rng.uniform(-20, 20, (4, 4))
    raw = dark + np.kron(offsets, np.ones((128, 128))) + rng.normal(0, 1, shape)
    raw[100, 100] += 400.0
    step = load_step(
        {
            "calibration": {
                "dark": 50.0,
                "common_mode": "panel",
                "panel_shape": [128, 128],
                "common_mode_max": 100.0,
            }
        }
    )
    out = step(raw.astype(np.float32), {"scan": 1})["frame"]
    medians = [
        np.median(out[r : r + 128, c : c + 128]) for r in range(0, 512, 128) for c in range(0, 512, 128)
    ]
    assert np.max(np.abs(medians)) < 0.1
    assert out[100, 100] == pytest.approx(400.0, abs=5.0)


def test_step_with_files_of_each_type(tmp_path, detector):
    raw, dark, gain, bad = detector
    np.save(tmp_path / "dark.npy", dark)
    tifffile.imwrite(tmp_path / "gain.tif", gain)
    with h5py.File(tmp_path / "mask.h5", "w") as h5:
        h5["entry/mask"] = bad.astype(np.uint8)
        h5["entry/other"] = np.zeros(3)
    step = load_step(
        {
            "calibration": {
                "dark": str(tmp_path / "dark.npy"),
                "gain": str(tmp_path / "gain.tif"),
                "mask": str(tmp_path / "mask.h5") + "::/entry/mask",
            }
        }
    )
    out = step(raw, {"scan": 1})["frame"]
    assert out.dtype == np.float32
    expected = (raw.astype(np.float32) - dark) / gain
    np.testing.assert_allclose(out[~bad], expected[~bad], rtol=1e-5, atol=1e-4)
    assert np.isnan(out[bad]).all()


def test_masked_zero_flat_normalised_and_bad_flat_pixels_masked():
    rng = np.random.default_rng(4)
    raw = rng.poisson(100, (64, 96)).astype(np.uint16)
    flat = np.full((64, 96), 3.0)
    flat[5, 7] = 0.0  # dead in the flat field: masked
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        np.save(f"{folder}/flat.npy", flat)
        step = load_step({"calibration": {"flat": f"{folder}/flat.npy", "dark": 10, "masked": "zero"}})
    out = step(raw, {})["frame"]
    good = np.ones(raw.shape, bool)
    good[5, 7] = False
    np.testing.assert_allclose(out[good], raw[good] - 10.0, rtol=1e-6)  # flat / mean(flat) == 1
    assert out[5, 7] == 0.0


def test_dark_stack_is_averaged(tmp_path):
    stack = np.stack([np.full((8, 8), v, np.uint16) for v in (10, 20, 30)])
    np.save(tmp_path / "darks.npy", stack)
    step = load_step({"calibration": {"dark": str(tmp_path / "darks.npy")}})
    out = step(np.full((8, 8), 25, np.uint16), {})["frame"]
    assert (out == 5.0).all()


def test_detector_pixel_mask_from_meta_follows_changes():
    step = load_step({"calibration": {"dark": 1.0}})
    frame = np.full((32, 32), 11, np.uint16)
    pixel_mask = np.zeros((32, 32), np.uint32)
    pixel_mask[3, 4] = 8  # Eiger flags: nonzero = bad
    out = step(frame, {"pixel_mask": pixel_mask})["frame"]
    assert np.isnan(out[3, 4]) and np.count_nonzero(np.isnan(out)) == 1
    other = np.zeros((32, 32), np.uint32)
    other[0, 0] = 1
    out = step(frame, {"pixel_mask": other})["frame"]
    assert np.isnan(out[0, 0]) and out[3, 4] == 10.0
    assert not np.isnan(step(frame, {})["frame"]).any()
    ignoring = load_step({"calibration": {"detector_mask": False}})
    assert not np.isnan(ignoring(frame, {"pixel_mask": pixel_mask})["frame"]).any()


def write_index(folder, text):
    (folder / "index.yaml").write_text(text)
    stat = (folder / "index.yaml").stat()
    os.utime(folder / "index.yaml", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a visible change


def test_calibration_folder_picks_constants_by_scan(tmp_path):
    np.save(tmp_path / "dark_a.npy", np.full((16, 16), 10.0))
    np.save(tmp_path / "dark_b.npy", np.full((16, 16), 20.0))
    mask = np.zeros((16, 16), np.uint8)
    mask[2, 2] = 1
    tifffile.imwrite(tmp_path / "mask.tif", mask)
    write_index(
        tmp_path,
        "dark:\n  - {file: dark_a.npy, scans: [1, 99]}\n  - {file: dark_b.npy, scans: [100, null]}\n"
        "mask:\n  - {file: mask.tif, scans: [1, null]}\n",
    )
    step = load_step({"calibration": {"folder": str(tmp_path)}})
    frame = np.full((16, 16), 50, np.uint16)
    early = step(frame, {"scan": 5})["frame"]
    late = step(frame, {"scan": "150"})["frame"]
    assert early[0, 0] == 40.0 and late[0, 0] == 30.0
    assert np.isnan(early[2, 2]) and np.isnan(late[2, 2])
    # an explicit parameter wins over the folder for its kind
    explicit = load_step({"calibration": {"folder": str(tmp_path), "dark": 0.0}})
    assert explicit(frame, {"scan": 5})["frame"][0, 0] == 50.0
    with pytest.raises(LookupError, match="no dark valid for scan 0"):
        step(frame, {"scan": 0})
    with pytest.raises(ValueError, match="not a scan number"):
        step(frame, {"scan": "scan_a"})
    # a constant added during the beamtime is used from the next scan on
    np.save(tmp_path / "dark_c.npy", np.full((16, 16), 30.0))
    write_index(
        tmp_path,
        "dark:\n  - {file: dark_a.npy, scans: [1, 99]}\n  - {file: dark_b.npy, scans: [100, 199]}\n"
        "  - {file: dark_c.npy, scans: [200, null]}\n",
    )
    assert step(frame, {"scan": 200})["frame"][0, 0] == 20.0
    assert not np.isnan(step(frame, {"scan": 200})["frame"]).any()  # the mask kind is gone from the index


def test_calibration_folder_errors(tmp_path):
    with pytest.raises(StepConfigError, match="no index.yaml"):
        load_step({"calibration": {"folder": str(tmp_path)}})
    write_index(tmp_path, "dark:\n  - {file: a.npy, scans: [1, null]}\n  - {file: b.npy, scans: [50, 60]}\n")
    with pytest.raises(ValueError, match="overlap"):
        CalibrationStore(tmp_path)
    write_index(tmp_path, "pedestal:\n  - {file: a.npy, scans: [1, 2]}\n")
    with pytest.raises(ValueError, match="unknown kind 'pedestal'"):
        CalibrationStore(tmp_path)
    write_index(tmp_path, "dark:\n  - {file: a.npy, scans: [5]}\n")
    with pytest.raises(ValueError, match="scans: \\[first, last or null\\]"):
        CalibrationStore(tmp_path)


def test_array_files_and_their_errors(tmp_path):
    with h5py.File(tmp_path / "one.h5", "w") as h5:
        h5["data"] = np.arange(6).reshape(2, 3)
    with h5py.File(tmp_path / "two.h5", "w") as h5:
        h5["a"] = np.zeros(2)
        h5["b"] = np.zeros(2)
    assert load_array(tmp_path / "one.h5").tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match="holds 2 datasets"):
        load_array(tmp_path / "two.h5")
    with pytest.raises(ValueError, match="no dataset"):
        load_array(str(tmp_path / "one.h5") + "::/missing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_array(tmp_path / "none.npy")
    (tmp_path / "mask.txt").write_text("0 1")
    with pytest.raises(ValueError, match="unknown type '.txt'"):
        load_array(tmp_path / "mask.txt")
    np.save(tmp_path / "m1.npy", np.eye(3))
    np.save(tmp_path / "m2.npy", np.fliplr(np.eye(3)))
    union = load_mask([str(tmp_path / "m1.npy"), str(tmp_path / "m2.npy")])
    assert union.dtype == bool and union.sum() == 5


def test_bad_parameters_name_themselves(tmp_path):
    with pytest.raises(StepConfigError, match="common_mode.*'median'"):
        load_step({"calibration": {"common_mode": "median"}})
    with pytest.raises(StepConfigError, match="panel_shape"):
        load_step({"calibration": {"panel_shape": [0, 4]}})
    with pytest.raises(StepConfigError, match="gain = -1"):
        load_step({"calibration": {"gain": -1}})
    np.save(tmp_path / "dark.npy", np.zeros((4, 4)))
    step = load_step({"calibration": {"dark": str(tmp_path / "dark.npy")}})
    with pytest.raises(ValueError, match="dark has shape \\(4, 4\\), the frame has \\(5, 5\\)"):
        step(np.zeros((5, 5), np.uint16), {})
