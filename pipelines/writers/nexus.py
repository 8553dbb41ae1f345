"""One NeXus/HDF5 file per scan, in the "small data" layout.

Every per-frame result is a dataset whose first dimension is the acquisition
index, so row ``i`` of every dataset belongs to frame ``i``; a gap leaves a row
of NaN (or 0 for integers) and ``valid[i] = False``. The scan's metadata, the
detector settings and the processing configuration are stored beside the data.

Results of a derived stream (``"hits/peaks"``) exist only for some frames and
may change length from frame to frame (a list of peaks): each derived stream
gets its own NXdata group with ``index`` (the frames that have it), scalars one
row per entry, and arrays concatenated along their first axis with ``<name>_count``
saying how many rows each entry added (the CXI/"ragged" layout).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .. import message as m

_CHUNK_ROWS = 64


def _fill_value(dtype: np.dtype) -> Any:
    return np.nan if dtype.kind in "fc" else 0


def _json(value: Any) -> str:
    return json.dumps(value, default=str, sort_keys=True)


class NexusScanFile:
    """Writes one scan; call :meth:`write` with the ordered results, then :meth:`close`."""

    def __init__(self, path: Path, start: m.Message, pipeline: str = "", swmr: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            raise FileExistsError(f"{self.path} exists; tangopipe never overwrites a scan file")
        self.file = h5py.File(self.path, "w", libver="latest")
        self.scan = start.scan
        self.rows = 0
        self.written = 0
        self.gaps: list[int] = []
        f = self.file
        f.attrs["NX_class"] = "NXroot"
        f.attrs["creator"] = "tangopipe"
        f.attrs["file_time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        entry = f.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        entry["title"] = f"{pipeline} scan {start.scan}"
        entry["start_time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        entry["scan_id"] = str(start.scan)
        meta = dict(start.meta)
        processing = meta.pop("processing", {})
        source = meta.pop("source", {})
        scan = entry.create_group("scan")
        scan.attrs["NX_class"] = "NXcollection"
        scan["metadata_json"] = _json(meta)
        for key, value in meta.items():
            self._put(scan, key, value)
        det = entry.create_group("instrument/detector")
        entry["instrument"].attrs["NX_class"] = "NXinstrument"
        det.attrs["NX_class"] = "NXdetector"
        for key, value in source.items():
            self._put(det, key, value)
        proc = entry.create_group("process")
        proc.attrs["NX_class"] = "NXprocess"
        proc["program"] = "tangopipe"
        proc["configuration_json"] = _json(processing)
        self.derived: dict[str, h5py.Group] = {}
        self.data = entry.create_group(start.stream or "results")
        self.data.attrs["NX_class"] = "NXdata"
        entry.attrs["default"] = self.data.name.rsplit("/", 1)[-1]
        self.index = self._new_dataset("index", np.dtype("int64"), ())
        self.valid = self._new_dataset("valid", np.dtype("bool"), ())
        self.version = self._new_dataset("processing_version", np.dtype("int32"), ())
        if swmr:
            self.file.swmr_mode = True
        self._last_flush = time.monotonic()

    @staticmethod
    def _put(group: h5py.Group, key: str, value: Any) -> None:
        key = str(key).replace("/", "_")
        if isinstance(value, bool | int | float | str) and value is not None:
            group[key] = value
        elif isinstance(value, list) and value and all(isinstance(v, int | float) for v in value):
            group[key] = np.asarray(value)
        else:
            group[key] = _json(value)

    def _new_dataset(self, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> h5py.Dataset:
        chunk_rows = max(1, min(_CHUNK_ROWS, (4 << 20) // max(1, int(np.prod(shape)) * dtype.itemsize)))
        ds = self.data.create_dataset(
            name,
            shape=(self.rows, *shape),
            maxshape=(None, *shape),
            dtype=dtype,
            chunks=(chunk_rows, *shape) if shape else (max(chunk_rows, 1024),),
            fillvalue=_fill_value(dtype) if dtype.kind != "b" else False,
        )
        return ds

    def _dataset_for(self, name: str, value: np.ndarray) -> h5py.Dataset:
        key = name.replace("/", "__")
        ds = self.data.get(key)
        if ds is None:
            ds = self._new_dataset(key, value.dtype, value.shape)
            if "signal" not in self.data.attrs and value.ndim <= 1:
                self.data.attrs["signal"] = key
                self.data.attrs["axes"] = ["index"] + ["."] * value.ndim
        elif ds.shape[1:] != value.shape:
            raise ValueError(f"result {name!r} changed shape from {ds.shape[1:]} to {value.shape} within scan")
        return ds

    def write(self, msg: m.Message) -> None:
        """Write one ordered result or gap as row ``msg.index``."""
        assert msg.index is not None
        row = msg.index
        if row < self.rows:
            raise ValueError(f"index {row} written twice or out of order (next row {self.rows})")
        self.rows = row + 1
        for ds in self.data.values():
            if isinstance(ds, h5py.Dataset) and ds.shape[0] < self.rows:
                ds.resize(self.rows, axis=0)
        self.index[row] = row
        if msg.kind == m.GAP:
            self.gaps.append(row)
            return
        self.valid[row] = True
        self.version[row] = msg.version
        values: dict[str, np.ndarray] = {k: np.asarray(v) for k, v in msg.arrays.items()}
        for k, v in msg.scalars.items():
            if isinstance(v, bool | int | float):
                values[k] = np.asarray(v, dtype=np.float64 if isinstance(v, float) else None)
        derived: dict[str, dict[str, np.ndarray]] = {}
        for name in [n for n in values if "/" in n]:
            stream, _, key = name.partition("/")
            derived.setdefault(stream, {})[key] = values.pop(name)
        for stream, results in derived.items():
            self._write_derived(stream, row, results)
        for name, value in values.items():
            ds = self._dataset_for(name, value)
            if ds.shape[0] < self.rows:
                ds.resize(self.rows, axis=0)
            ds[row] = value
        self.written += 1

    @staticmethod
    def _append(group: h5py.Group, name: str, value: np.ndarray) -> None:
        """Append ``value`` along axis 0 of dataset ``name`` (created on first use)."""
        ds = group.get(name)
        if ds is None:
            rows = max(1, min(1024, (1 << 20) // max(1, value[0].nbytes if value.ndim else value.nbytes)))
            ds = group.create_dataset(
                name, shape=(0, *value.shape[1:]), maxshape=(None, *value.shape[1:]), dtype=value.dtype,
                chunks=(rows, *value.shape[1:]),
            )
        elif ds.shape[1:] != value.shape[1:]:
            raise ValueError(f"result {group.name}/{name} changed shape from {ds.shape[1:]} to {value.shape[1:]}")
        start = ds.shape[0]
        ds.resize(start + value.shape[0], axis=0)
        ds[start:] = value

    def _write_derived(self, stream: str, row: int, results: dict[str, np.ndarray]) -> None:
        group = self.derived.get(stream)
        if group is None:
            group = self.derived[stream] = self.file["entry"].create_group(stream)
            group.attrs["NX_class"] = "NXdata"
        self._append(group, "index", np.asarray([row], dtype=np.int64))
        for key, value in results.items():
            if value.ndim == 0:
                self._append(group, key, value.reshape(1))
            else:
                self._append(group, key, value)
                self._append(group, f"{key}_count", np.asarray([value.shape[0]], dtype=np.int64))

    def flush(self, every_s: float = 1.0) -> None:
        now = time.monotonic()
        if now - self._last_flush >= every_s:
            self._last_flush = now
            self.file.flush()

    def close(self, end: m.Message | None = None) -> None:
        entry = self.file["entry"]
        entry["end_time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        entry["frames_written"] = self.written
        entry["gaps"] = np.asarray(self.gaps, dtype=np.int64)
        if end is not None:
            entry["scan/end_json"] = _json(end.meta)
        self.file.flush()
        self.file.close()
        os.chmod(self.path, 0o644)
