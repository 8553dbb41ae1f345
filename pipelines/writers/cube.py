"""The cube: results binned by a scan variable, written as one light file at scan end.

As LCLS smalldata's cube: a pump-probe delay scan, an energy scan... is reduced
to one row per bin of the scan variable (``by``): the number of frames in the bin,
the sum of each chosen result over those frames and their mean. Images become one
image per bin, so the file is small whatever the number of frames.

The value binned by is, for each frame, the scalar result ``by``, else the motor
``by`` of the frame's ``positions``, else the frame's metadata ``by``. A frame
without it, or outside the bins, is counted (``without_value``, ``out_of_range``)
and not binned. Bins are half-open ``[edge_i, edge_i+1)``, the last one closed.

Layout: ``/entry/cube`` (NXdata, the default) with ``<by>`` (bin centres, the
axis), ``bin_edges``, ``frames`` (count per bin), and per result ``<name>`` (mean,
NaN for an empty bin), ``<name>_sum`` and ``<name>_count``.
"""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import message as m

if TYPE_CHECKING:
    from . import WriterSettings


def frame_value(msg: m.Message, by: str) -> float | None:
    """The value of the scan variable ``by`` for one frame (see the module docstring)."""
    for source in (msg.scalars, msg.meta.get("positions") or {}, msg.meta):
        value = source.get(by) if isinstance(source, dict) else None
        if isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value):
            return float(value)
    return None


class Cube:
    """Sums and counts per bin, for any number of named results."""

    def __init__(self, edges: list[float], names: list[str] | None = None):
        self.edges = np.asarray(edges, dtype=np.float64)
        self.nbins = len(self.edges) - 1
        self.names = list(names) if names else None  # None: every numeric result of the first frame
        self.frames = np.zeros(self.nbins, dtype=np.int64)
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}
        self.out_of_range = 0
        self.without_value = 0

    def bin_of(self, value: float) -> int | None:
        if not self.edges[0] <= value <= self.edges[-1]:
            return None
        return min(int(np.searchsorted(self.edges, value, side="right")) - 1, self.nbins - 1)

    def add(self, value: float | None, results: dict[str, Any]) -> int | None:
        """Add one frame's results to the bin of ``value``; returns the bin (None: not binned)."""
        if value is None:
            self.without_value += 1
            return None
        b = self.bin_of(value)
        if b is None:
            self.out_of_range += 1
            return None
        if self.names is None:
            self.names = [k for k, v in results.items() if "/" not in k and _numeric(v)]
        self.frames[b] += 1
        for name in self.names:
            value_of = results.get(name)
            if not _numeric(value_of):
                continue
            array = np.asarray(value_of, dtype=np.float64)
            total = self.sums.get(name)
            if total is None:
                total = self.sums[name] = np.zeros((self.nbins, *array.shape))
                self.counts[name] = np.zeros(self.nbins, dtype=np.int64)
            elif total.shape[1:] != array.shape:
                raise ValueError(
                    f"cube: result {name!r} changed shape from {total.shape[1:]} to {array.shape}"
                )
            total[b] += array
            self.counts[name][b] += 1
        return b

    def mean(self, name: str) -> np.ndarray:
        counts = self.counts[name].reshape((-1,) + (1,) * (self.sums[name].ndim - 1))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counts > 0, self.sums[name] / np.maximum(counts, 1), np.nan)

    @property
    def centres(self) -> np.ndarray:
        return 0.5 * (self.edges[:-1] + self.edges[1:])


def _numeric(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, int | float):
        return True
    return isinstance(value, np.ndarray) and value.dtype.kind in "biuf"


class CubeScanWriter:
    """Bins one scan's results and writes the cube file when the scan ends."""

    def __init__(self, settings: WriterSettings, start: m.Message):
        self.settings = settings
        self.scan = start.scan
        self.stream = start.stream
        self.by = settings.by
        self.meta = {k: v for k, v in start.meta.items() if k not in ("processing", "source")}
        self.processing = start.meta.get("processing", {})
        self.cube = Cube(settings.bins, settings.results or None)
        self.path = settings.scan_file(start)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.written = 0
        self.closed = False

    def write(self, msg: m.Message) -> None:
        if msg.kind != m.RESULT:
            return
        results: dict[str, Any] = dict(msg.scalars)
        results.update(msg.arrays)
        self.cube.add(frame_value(msg, self.by), results)
        self.written += 1

    def flush(self, every_s: float = 1.0, force: bool = False) -> bool:
        return False  # the cube is written once, at scan end

    def close(self, end: m.Message | None = None) -> None:
        import h5py

        from . import unique_path
        from .nexus import tangopipe_version

        if self.closed:
            return
        cube = self.cube
        self.path = unique_path(self.path)
        try:
            with h5py.File(self.path, "x") as f:
                f.attrs["NX_class"] = "NXroot"
                f.attrs["creator"] = "tangopipe"
                f.attrs["default"] = "entry"
                entry = f.create_group("entry")
                entry.attrs["NX_class"] = "NXentry"
                entry.attrs["default"] = "cube"
                entry["title"] = f"scan {self.scan} binned by {self.by}"
                entry["scan_id"] = str(self.scan)
                entry["end_time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
                entry["scan_metadata_json"] = json.dumps(self.meta, default=str, sort_keys=True)
                proc = entry.create_group("process")
                proc.attrs["NX_class"] = "NXprocess"
                proc["program"] = "tangopipe"
                proc["version"] = tangopipe_version()
                proc["configuration_json"] = json.dumps(self.processing, default=str, sort_keys=True)
                data = entry.create_group("cube")
                data.attrs["NX_class"] = "NXdata"
                axis = self.by.replace("/", "_")
                data[axis] = cube.centres
                data["bin_edges"] = cube.edges
                data["frames"] = cube.frames
                data.attrs["frames_binned"] = int(cube.frames.sum())
                data.attrs["out_of_range"] = cube.out_of_range
                data.attrs["without_value"] = cube.without_value
                names = [n for n in (cube.names or []) if n in cube.sums]
                for name in names:
                    key = name.replace("/", "_")
                    data[key] = cube.mean(name)
                    data[f"{key}_sum"] = cube.sums[name]
                    data[f"{key}_count"] = cube.counts[name]
                signal = names[0].replace("/", "_") if names else "frames"
                data.attrs["signal"] = signal
                data.attrs["axes"] = [axis] + ["."] * (data[signal].ndim - 1)
                data.attrs[f"{axis}_indices"] = 0
        except FileExistsError:
            raise
        except BaseException:
            self.path.unlink(missing_ok=True)  # made by this call ('x'): no half cube left behind
            raise
        os.chmod(self.path, 0o644)
        self.closed = True
