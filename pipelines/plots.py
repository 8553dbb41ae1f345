"""PNG plots of results, drawn headless with pyqtgraph: 1D profiles and 2D maps.

Usable anywhere (a graph writer, ``tangopipe plot``, a notebook): no Tango, and
no display needed, since without one Qt draws offscreen. Each call renders a
widget of exactly the requested size and saves what it shows.

    plot_profile(radial, intensity, "profile.png", "2theta (deg)", "intensity", "scan 12 #40")
    plot_map(cake, "cake.png", axes=(chi, radial), labels=("chi (deg)", "2theta (deg)"))

:func:`quick_look` picks the default plot of a NeXus scan file written by the
NeXus writer (``/entry@default`` -> NXdata ``@signal``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_PROFILE_SIZE = (800, 500)
DEFAULT_MAP_SIZE = (800, 640)
COLORMAP = "viridis"


def _application() -> Any:
    """The Qt application pyqtgraph draws with (offscreen when there is no display)."""
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    import pyqtgraph as pg

    return pg.mkQApp()


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    if not (
        isinstance(size, Sequence)
        and len(size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and 16 <= v <= 10000 for v in size)
    ):
        raise ValueError(f"size = {size!r}; expected (width, height) in pixels, each 16..10000")
    return int(size[0]), int(size[1])


def _save(widget: Any, path: str | os.PathLike, size: tuple[int, int]) -> Path:
    """Lay ``widget`` out at ``size`` and save it as PNG."""
    app = _application()
    widget.resize(*size)
    widget.setAttribute(0x20, True)  # Qt.WA_DontShowOnScreen: laid out and drawn, never shown
    widget.show()
    app.processEvents()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = widget.grab().toImage()
    widget.close()
    widget.deleteLater()
    if image.width() != size[0] or image.height() != size[1]:  # a high-DPI screen
        image = image.scaled(size[0], size[1])
    if not image.save(str(path), "PNG"):
        raise OSError(f"cannot write the PNG file {path}")
    return path


def _finite_1d(name: str, values: Any) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1 or array.size == 0 or array.dtype.kind not in "biuf":
        raise ValueError(
            f"{name} must be a non-empty 1D numeric array, got shape {array.shape} {array.dtype}"
        )
    return array.astype(np.float64)


def plot_profile(
    x: Any,
    y: Any,
    path: str | os.PathLike,
    xlabel: str = "",
    ylabel: str = "",
    title: str = "",
    *,
    size: Sequence[int] = DEFAULT_PROFILE_SIZE,
) -> Path:
    """A line plot of ``y`` against ``x`` (``x=None``: point numbers) saved as PNG ``path``.

    NaN points leave a gap. Returns the path written.
    """
    import pyqtgraph as pg

    size = _check_size(size)
    y = _finite_1d("y", y)
    x = np.arange(y.size, dtype=np.float64) if x is None else _finite_1d("x", x)
    if x.shape != y.shape:
        raise ValueError(f"x has {x.size} points and y {y.size}: they must match")
    _application()
    widget = pg.PlotWidget(background="w")
    item = widget.getPlotItem()
    item.plot(x, y, pen=pg.mkPen("#1f4e9c", width=2), connect="finite")
    item.showGrid(x=True, y=True, alpha=0.25)
    item.setLabel("bottom", xlabel)
    item.setLabel("left", ylabel)
    if title:
        item.setTitle(title, color="k")
    for axis in ("bottom", "left"):
        item.getAxis(axis).setTextPen("k")
        item.getAxis(axis).setPen("k")
    return _save(widget, path, size)


def _axis_extent(name: str, values: Any, n: int) -> tuple[float, float]:
    """(start, end) of ``n`` evenly spaced pixel centres ``values``, as pixel edges."""
    v = _finite_1d(name, values)
    if v.size != n:
        raise ValueError(f"{name} has {v.size} values for {n} pixels along that axis")
    step = float(v[1] - v[0]) if n > 1 else 1.0
    if n > 1 and (step == 0 or not np.allclose(np.diff(v), step, rtol=1e-3, atol=1e-12)):
        raise ValueError(f"{name} must be evenly spaced and not constant to scale a map axis")
    return float(v[0]) - step / 2, float(v[-1]) + step / 2


def plot_map(
    array: Any,
    path: str | os.PathLike,
    axes: tuple[Any, Any] | None = None,
    title: str = "",
    *,
    labels: tuple[str, str] = ("", ""),
    size: Sequence[int] = DEFAULT_MAP_SIZE,
    colormap: str = COLORMAP,
) -> Path:
    """A 2D ``array`` (rows, columns) as a colour image with a colour bar, saved as PNG.

    ``axes`` = (row positions, column positions), one evenly spaced value per
    row/column (motor positions, bin centres): the map is drawn on those
    scales, first row at the bottom. Without ``axes`` it is drawn as a detector
    image: pixel numbers, first row at the top. ``labels`` = (row axis label,
    column axis label). NaN (not measured) is drawn transparent.
    """
    import pyqtgraph as pg

    size = _check_size(size)
    data = np.asarray(array)
    if data.ndim != 2 or data.size == 0 or data.dtype.kind not in "biuf":
        raise ValueError(f"array must be a non-empty 2D numeric array, got shape {data.shape} {data.dtype}")
    data = data.astype(np.float64)
    finite = data[np.isfinite(data)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if high <= low:
        high = low + 1.0
    _application()
    widget = pg.GraphicsLayoutWidget()
    widget.setBackground("w")
    plot = widget.addPlot()
    image = pg.ImageItem(data, axisOrder="row-major", levels=(low, high))
    image.setColorMap(pg.colormap.get(colormap))
    plot.addItem(image)
    rows, cols = data.shape
    if axes is None:
        plot.invertY(True)
        rect = (0.0, 0.0, float(cols), float(rows))
    else:
        if not (isinstance(axes, Sequence) and len(axes) == 2):
            raise ValueError(f"axes must be (row positions, column positions), got {type(axes).__name__}")
        y0, y1 = _axis_extent("axes[0] (row positions)", axes[0], rows)
        x0, x1 = _axis_extent("axes[1] (column positions)", axes[1], cols)
        rect = (x0, y0, x1 - x0, y1 - y0)
    image.setRect(*rect)
    plot.setLabel("left", labels[0])
    plot.setLabel("bottom", labels[1])
    if title:
        plot.setTitle(title, color="k")
    for axis in ("bottom", "left"):
        plot.getAxis(axis).setTextPen("k")
        plot.getAxis(axis).setPen("k")
    bar = pg.ColorBarItem(values=(low, high), colorMap=pg.colormap.get(colormap), interactive=False)
    bar.setImageItem(image, insert_in=plot)
    bar.axis.setTextPen("k")
    bar.axis.setWidth(60)  # room for labels like 22516
    return _save(widget, path, size)


# -- a scan file at a glance -------------------------------------------------------------------
def _default_group(f: Any) -> Any:
    entry = f["entry"] if "entry" in f else f
    name = entry.attrs.get("default")
    if isinstance(name, bytes):
        name = name.decode()
    if name and name in entry:
        return entry[name]
    for child in entry.values():
        nx_class = child.attrs.get("NX_class", b"")
        if (nx_class.decode() if isinstance(nx_class, bytes) else nx_class) == "NXdata":
            return child
    raise KeyError(f"{f.filename}: no NXdata group under /entry; name one with --dataset")


def _scan_metadata(f: Any) -> dict[str, Any]:
    try:
        return json.loads(f["entry/scan/metadata_json"][()])
    except (KeyError, ValueError, TypeError):
        return {}


def quick_look(
    path: str | os.PathLike,
    dataset: str | None = None,
    out: str | os.PathLike | None = None,
    index: int | None = None,
) -> Path:
    """Plot one dataset of a NeXus scan file as PNG and return the PNG's path.

    ``dataset``: a path in the file (``/entry/main/center_sum``) or a name in the
    default NXdata group; default: that group's ``signal``. Rows are frames:
    a per-frame scalar is a profile over the frame index, or a map when the scan
    announced a 2D ``scan_shape`` (axes from its ``motors``); a per-frame 1D
    result is an image of frame against bin (or the profile of frame ``index``);
    a per-frame image is frame ``index`` (default: the last valid one). Frames
    without a result (``valid`` false) are left out. ``out`` defaults to
    ``<file>_<dataset>.png`` beside the file.
    """
    import h5py

    from pipelines.steps.maps import MapAssembler, grid_shape

    path = Path(path)
    with h5py.File(path, "r") as f:
        group = _default_group(f)
        if dataset is None:
            signal = group.attrs.get("signal")
            if signal is None:
                raise KeyError(
                    f"{path}: {group.name} has no 'signal' attribute; name a dataset with --dataset"
                )
            dataset = signal.decode() if isinstance(signal, bytes) else str(signal)
        ds = f[dataset] if dataset.startswith("/") else group[dataset]
        group = ds.parent
        data = ds[()]
        ds_name = ds.name
        name = ds_name.rsplit("/", 1)[-1]
        n = data.shape[0] if data.ndim else 0
        valid = group["valid"][:n].astype(bool) if "valid" in group else np.ones(n, bool)
        frames = group["index"][:n] if "index" in group else np.arange(n)
        meta = _scan_metadata(f)
        scan = f["entry/scan_id"][()].decode() if "entry/scan_id" in f else ""
    out = Path(out) if out is not None else path.with_name(f"{path.stem}_{name}.png")
    title = f"{path.name}: {name}" + (f" (scan {scan})" if scan else "")
    if data.ndim == 0 or not valid.any():
        raise ValueError(f"{path}: {ds_name} has no valid frame to plot")
    if data.ndim == 1:
        shape = meta.get("scan_shape")
        try:
            n_slow, n_fast = grid_shape(shape) if shape is not None else (1, 0)
        except ValueError:
            n_slow, n_fast = 1, 0
        if n_slow > 1 and n_fast > 1:
            grid = MapAssembler([n_slow, n_fast], bool(meta.get("snake", False)))
            for i, v in zip(frames[valid], data[valid], strict=True):
                if 0 <= i < n_slow * n_fast:
                    grid.add(int(i), float(v))
            axes = scan_axes(n_slow, n_fast, meta.get("motors"))
            try:
                return plot_map(grid.map, out, (axes.rows, axes.cols), title, labels=axes.labels())
            except ValueError:  # positions not evenly spaced: point numbers
                return plot_map(grid.map, out, None, title, labels=("row", "column"))
        y = np.where(valid, data.astype(np.float64), np.nan)
        return plot_profile(frames, y, out, "frame", name, title)
    if data.ndim == 2 and index is None:  # one row per frame; frames without a result left blank
        rows = np.where(valid[:, None], data.astype(np.float64), np.nan)
        return plot_map(rows, out, None, title, labels=("frame", name))
    frame = int(index) if index is not None else int(np.nonzero(valid)[0][-1])
    if not 0 <= frame < n or not valid[frame]:
        raise ValueError(f"{path}: frame {frame} of {ds_name} has no result (frames 0..{n - 1})")
    title = f"{title} #{frame}"
    if data.ndim == 2:
        return plot_profile(None, data[frame], out, "bin", name, title)
    if data.ndim == 3:
        return plot_map(data[frame], out, None, title, labels=("row", "column"))
    raise ValueError(f"{path}: {ds_name} has shape {data.shape}; plots show 1D or 2D results per frame")


# -- scan grids ---------------------------------------------------------------------------------
@dataclass
class ScanAxes:
    """Positions and names of a scan grid's rows and columns (see :func:`scan_axes`)."""

    rows: list[float]
    cols: list[float]
    row_label: str
    col_label: str
    row_unit: str = ""
    col_unit: str = ""
    from_motors: bool = False

    def labels(self) -> tuple[str, str]:
        """(row label, column label) with units, for plot axes."""
        return tuple(f"{t} ({u})" if u else t for t, u in ((self.row_label, self.row_unit),
                                                            (self.col_label, self.col_unit)))  # fmt: skip


def _motor_positions(spec: Any, n: int) -> tuple[list[float], str] | None:
    """Positions of ``n`` points and the unit of one ``motors`` entry, or None if unusable."""
    unit = ""
    if isinstance(spec, Mapping):
        unit = str(spec.get("unit", ""))
        if "positions" in spec:
            spec = spec["positions"]
        elif "start" in spec and "stop" in spec:
            spec = [spec["start"], spec["stop"]]
        else:
            return None
    if not isinstance(spec, list | tuple) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in spec
    ):
        return None
    if len(spec) == n:
        return [float(v) for v in spec], unit
    if len(spec) == 2:  # the end points
        return [float(v) for v in np.linspace(spec[0], spec[1], n)], unit
    return None


def _motor_entries(motors: Any) -> list[tuple[str, Any]]:
    """(name, spec) of the slow and the fast motor, or fewer when they cannot be told."""
    if isinstance(motors, Mapping):
        entries = [(str(k), v) for k, v in motors.items()]
    elif isinstance(motors, list | tuple):
        entries = [
            (str(e.get("name", f"motor {i}")), e) for i, e in enumerate(motors) if isinstance(e, Mapping)
        ]
    else:
        return []
    by_axis = {e[1].get("axis"): e for e in entries if isinstance(e[1], Mapping) and "axis" in e[1]}
    if "slow" in by_axis and "fast" in by_axis:
        return [by_axis["slow"], by_axis["fast"]]
    return entries[:2]


def scan_axes(n_slow: int, n_fast: int, motors: Any = None) -> ScanAxes:
    """The axes of a [n_slow, n_fast] scan grid from the StartScan ``motors``.

    ``motors`` names the slow motor (map rows) and the fast motor (columns):
    a list ``[{"name", ...}, {"name", ...}]`` in that order, or a mapping
    ``{name: spec}`` whose entries say ``"axis": "slow"``/``"fast"`` (else its
    order is taken: first slow, then fast; JSON files that sort their keys lose
    that order). A spec is a list of positions (one per point of its axis), the
    end points ``[start, stop]``, or a mapping with ``positions`` or
    ``start``/``stop``, and optionally ``unit``. Without two usable motors the
    axes are point numbers.
    """
    entries = _motor_entries(motors)
    if len(entries) == 2:
        (row_name, row_spec), (col_name, col_spec) = entries
        rows, cols = _motor_positions(row_spec, n_slow), _motor_positions(col_spec, n_fast)
        if rows is not None and cols is not None:
            return ScanAxes(rows[0], cols[0], row_name, col_name, rows[1], cols[1], True)
    return ScanAxes([float(i) for i in range(n_slow)], [float(i) for i in range(n_fast)], "row", "column")
