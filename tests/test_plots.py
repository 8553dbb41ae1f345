"""Headless PNG plots (pipelines/plots.py) and ``tangopipe plot`` on scan files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pipelines import message as m  # noqa: E402
from pipelines.plots import plot_map, plot_profile, quick_look, scan_axes  # noqa: E402
from pipelines.writers.nexus import NexusScanFile  # noqa: E402


def pixels(path) -> np.ndarray:
    """The PNG as an (height, width, 3) uint8 array, read by Qt."""
    from pyqtgraph.Qt import QtGui

    image = QtGui.QImage(str(path))
    assert not image.isNull(), f"{path} is not a readable PNG"
    image = image.convertToFormat(QtGui.QImage.Format_RGB888)
    ptr = image.constBits()
    ptr.setsize(image.sizeInBytes())
    rows = np.frombuffer(ptr, np.uint8).reshape(image.height(), image.bytesPerLine())
    return rows[:, : image.width() * 3].reshape(image.height(), image.width(), 3).copy()


def colour_count(rgb: np.ndarray) -> int:
    return len(np.unique(rgb.reshape(-1, 3), axis=0))


def test_profile_png_has_the_size_asked_and_shows_the_curve(tmp_path):
    x = np.linspace(0.0, 40.0, 400)
    y = np.exp(-((x - 20.0) ** 2) / 4.0)
    y[10:20] = np.nan  # a gap, not an error
    path = plot_profile(x, y, tmp_path / "p.png", "2theta (deg)", "intensity", "scan 3 #7", size=(640, 360))
    rgb = pixels(path)
    assert rgb.shape == (360, 640, 3)
    blue = (rgb[..., 2] > 120) & (rgb[..., 0] < 80)  # the curve's pen, #1f4e9c
    assert blue.sum() > 200
    white = (rgb == 255).all(axis=-1)
    assert 0.5 < white.mean() < 0.99  # a white page with axes, text and a curve on it
    # the peak is drawn higher (smaller row) than the flat tails
    columns = np.nonzero(blue.any(axis=0))[0]
    peak_col = columns[len(columns) // 2]
    tail_col = columns[-5]
    assert np.nonzero(blue[:, peak_col])[0].min() < np.nonzero(blue[:, tail_col])[0].min()


def test_map_png_draws_the_array_with_a_colour_scale(tmp_path):
    data = np.outer(np.arange(30.0), np.ones(50))  # grows along rows only
    path = plot_map(data, tmp_path / "m.png", axes=(np.linspace(0, 2.9, 30), np.linspace(10, 14.9, 50)),
                    title="map", labels=("samy (mm)", "samx (mm)"), size=(700, 560))  # fmt: skip
    rgb = pixels(path)
    assert rgb.shape == (560, 700, 3)
    assert colour_count(rgb) > 40  # a colour map, not a blank or a flat picture
    # with motor axes the first row is at the bottom: colours change from bottom to top, not across
    centre_col = rgb[:, 300]
    assert colour_count(rgb[280:281, 100:600]) < colour_count(centre_col[None, 60:500])
    image = plot_map(data, tmp_path / "i.png", size=(300, 200))
    assert pixels(image).shape == (200, 300, 3)


def test_bad_arguments_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="x has 3 points and y 4"):
        plot_profile([1, 2, 3], [1, 2, 3, 4], tmp_path / "x.png")
    with pytest.raises(ValueError, match="array must be a non-empty 2D"):
        plot_map(np.zeros(5), tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"axes\[1\] \(column positions\) has 4 values for 3 pixels"):
        plot_map(np.zeros((2, 3)), tmp_path / "x.png", axes=([0, 1], [0, 1, 2, 3]))
    with pytest.raises(ValueError, match="size = "):
        plot_profile([1, 2], [1, 2], tmp_path / "x.png", size=(0, 10))


def test_scan_axes_from_motors():
    axes = scan_axes(2, 3, {"samy": {"start": 1.0, "stop": 2.0, "unit": "mm"}, "samx": [0.0, 0.5, 1.0]})
    assert axes.rows == [1.0, 2.0] and axes.cols == [0.0, 0.5, 1.0] and axes.from_motors
    assert axes.labels() == ("samy (mm)", "samx")
    assert scan_axes(2, 3, {"samy": [1.0]}).labels() == ("row", "column")
    # files sort the keys of their JSON: an explicit axis (or a list) keeps slow and fast apart
    tagged = json.loads(json.dumps({"y": {"start": 0, "stop": 1, "axis": "slow"}, "x": {"start": 5, "stop": 6,
                                    "axis": "fast"}}, sort_keys=True))  # fmt: skip
    assert list(tagged) == ["x", "y"]
    axes = scan_axes(3, 2, tagged)
    assert (axes.row_label, axes.rows, axes.col_label, axes.cols) == ("y", [0.0, 0.5, 1.0], "x", [5.0, 6.0])
    listed = scan_axes(3, 2, [{"name": "y", "positions": [0, 1, 2]}, {"name": "x", "start": 5, "stop": 6}])
    assert (listed.row_label, listed.col_label, listed.rows) == ("y", "x", [0.0, 1.0, 2.0])


def write_scan(path, frames: int, meta: dict, valid=lambda i: True):
    rng = np.random.default_rng(3)
    start = m.Message(m.SCAN_START, scan=4, stream="main", meta=meta)
    f = NexusScanFile(path, start, pipeline="t")
    for i in range(frames):
        if not valid(i):
            f.write(m.Message(m.GAP, scan=4, index=i, stream="main"))
            continue
        f.write(m.Message(m.RESULT, scan=4, index=i, stream="main",
                          arrays={"profile": rng.random(16).astype(np.float32),
                                  "image": rng.random((6, 9)).astype(np.float32)},
                          scalars={"roi_sum": float(i * i)}))  # fmt: skip
    f.close()


def test_quick_look_picks_the_default_and_maps_a_grid_scan(tmp_path):
    scan = tmp_path / "scan.h5"
    motors = [{"name": "y", "start": 0.0, "stop": 1.0}, {"name": "x", "start": 5.0, "stop": 6.5}]
    write_scan(scan, 12, {"scan_shape": [3, 4], "motors": motors}, lambda i: i != 5)
    with h5py.File(scan) as f:
        signal = f["entry/main"].attrs["signal"]
    out = quick_look(scan)
    assert out == tmp_path / f"scan_{signal}.png" and pixels(out).shape[:2] == (640, 800)
    for dataset, index in (("profile", None), ("profile", 3), ("image", None), ("/entry/main/roi_sum", None)):
        png = quick_look(
            scan, dataset, tmp_path / f"{dataset.strip('/').replace('/', '_')}_{index}.png", index
        )
        assert colour_count(pixels(png)) > 3
    with pytest.raises(ValueError, match="frame 5 of /entry/main/image has no result"):
        quick_look(scan, "image", tmp_path / "gap.png", 5)


def test_plot_command_writes_the_png_and_names_it(tmp_path):
    scan = tmp_path / "line.h5"
    write_scan(scan, 8, {})
    out = tmp_path / "roi.png"
    proc = subprocess.run([sys.executable, "-m", "devices.cli", "plot", str(scan), "--dataset", "roi_sum",
                           "--out", str(out)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    assert pixels(out).shape[:2] == (500, 800)
    bad = subprocess.run([sys.executable, "-m", "devices.cli", "plot", str(scan), "--dataset", "nothing"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 1 and "nothing" in bad.stderr
