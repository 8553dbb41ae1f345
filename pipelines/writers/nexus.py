"""One NeXus/HDF5 file per scan, in the "small data" layout, readable while it is written.

Layout (``/entry`` is the default NXentry, its default NXdata is the group's stream)::

    /entry                      NXentry: title, start_time, end_time, scan_id, frames_*
        scan/                   NXcollection: StartScan metadata; positions/<motor>[index]
        sample/                 NXsample (from the ``sample`` / ``sample_*`` metadata)
        instrument/detector/    NXdetector: the source's settings; ``data`` = raw frames
        process/                NXprocess: program, version, configuration (JSON), per group
        <stream>/               NXdata: index, valid, processing_version, every result
        <derived>/              NXdata of a derived stream ("hits/peaks"), ragged

Every per-frame result is a dataset whose first dimension is the acquisition index,
so row ``i`` of every dataset belongs to frame ``i``; a gap leaves a row of NaN (or
0) and ``valid[i] = False``. Results of a derived stream exist only for some frames
and may change length from frame to frame (a list of peaks): each derived stream
gets its own NXdata group with ``index`` (the frames that have it), scalars one row
per entry, and arrays concatenated along their first axis with ``<name>_count``
saying how many rows each entry added (the CXI "ragged" layout).

SWMR (others read while the scan is written). HDF5 forbids creating groups,
datasets or attributes once a file is in SWMR mode, so the structure is made in two
moments: the metadata at scan start, the per-frame datasets from the first result
(its names, dtypes and shapes); then the file switches to SWMR and rows are only
appended. What appears later cannot go into that file:

- a derived stream is written, live, to a companion file ``<stem>-<stream>.h5``
  (its own structure made from its first entry, then SWMR); when the scan ends the
  main file gets an external link ``/entry/<stream>`` to it, so after the scan one
  tree shows everything;
- motor positions first known at scan end (reported after their frame left) are
  added to the main file when it is closed;
- a result name of the group's own stream first seen after the switch is not
  written (counted in :attr:`NexusScanFile.skipped`): a step returns the same
  names for every frame, or puts sparse results in a derived stream.

Without SWMR (``swmr=False``) everything is created as it comes, in one file.

Storage faults (full disk, unwritable folder): the file keeps the messages written
since its last flush; :meth:`NexusScanFile.recover` reopens the file, cuts every
dataset back to that flush and writes them again, so a failed write neither loses
nor corrupts rows.
"""

from __future__ import annotations

import gc
import importlib.metadata
import json
import os
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .. import message as m
from . import COMPRESSIONS, SPACE_MARGIN, StorageFull, check_space

RAW_RESULT = "image"  # the passthrough step's result: the raw frame
_ROW_CHUNK_BYTES = 1 << 20  # chunks of profiles stay within HDF5's default chunk cache
_MAX_SCALAR_CHUNK = 1024
_TIME_BYTES = 32


def tangopipe_version() -> str:
    """The installed tangopipe version (setup.cfg), or "unknown" when run from a bare tree."""
    try:
        return importlib.metadata.version("tangopipe")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def compression_options(compression: str) -> dict[str, Any]:
    """``create_dataset`` keywords for ``none``, ``gzip`` or ``bslz4`` (bitshuffle + LZ4)."""
    if compression == "none":
        return {}
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    if compression == "bslz4":
        import hdf5plugin

        return dict(hdf5plugin.Bitshuffle(cname="lz4"))
    raise ValueError(f"compression {compression!r}: expected one of {', '.join(COMPRESSIONS)}")


def _fill_value(dtype: np.dtype) -> Any:
    if dtype.kind in "fc":
        return np.nan
    if dtype.kind == "b":
        return False
    if dtype.kind in "OSU":
        return None
    return 0


def _json(value: Any) -> str:
    return json.dumps(value, default=str, sort_keys=True)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _put(group: h5py.Group, key: str, value: Any) -> None:
    """One metadata value as a dataset (numbers, strings, numeric lists; JSON otherwise)."""
    key = str(key).replace("/", "_") or "_"
    if key in group:
        return
    if isinstance(value, bool | int | float | str):
        group[key] = value
    elif (
        isinstance(value, list)
        and value
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ):
        group[key] = np.asarray(value)
    else:
        group[key] = _json(value)


def result_values(msg: m.Message) -> dict[str, np.ndarray]:
    """A result's arrays and storable scalars (numbers, booleans, strings) as numpy values."""
    values: dict[str, np.ndarray] = {k: np.asarray(v) for k, v in msg.arrays.items()}
    for k, v in msg.scalars.items():
        if isinstance(v, bool):
            values[k] = np.asarray(v, dtype=np.bool_)
        elif isinstance(v, int):
            values[k] = np.asarray(v, dtype=np.int64)
        elif isinstance(v, float):
            values[k] = np.asarray(v, dtype=np.float64)
        elif isinstance(v, str):
            values[k] = np.asarray(v, dtype=object)
    return values


def _storable_dtype(value: np.ndarray) -> np.dtype:
    return h5py.string_dtype() if value.dtype.kind in "OU" else value.dtype


_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def restore_end_of_file(path: Path) -> None:
    """Give back a file the length its superblock records.

    A write that failed for lack of space can leave the superblock's end-of-file
    address beyond the file's real end (the space was reserved, the bytes never
    written); HDF5 then refuses to open it ("truncated file"). Extending the file to
    that length (with zeros, over space never used by any flushed object) makes it
    open again; the rows after the last flush are written again anyway.
    """
    with open(path, "rb") as fh:
        head = fh.read(48)
    # superblock version 2/3 (libver "latest"): base address at 12, end-of-file at 28
    if len(head) < 36 or not head.startswith(_SIGNATURE) or head[8] not in (2, 3) or head[9] != 8:
        return
    base, end = int.from_bytes(head[12:20], "little"), int.from_bytes(head[28:36], "little")
    if os.path.getsize(path) < base + end:
        os.truncate(path, base + end)


def _lookup3(data: bytes) -> int:
    """Bob Jenkins' lookup3 hash (``hashlittle``, initial value 0): HDF5's metadata checksum."""
    mask = 0xFFFFFFFF

    def rot(x: int, k: int) -> int:
        return ((x << k) | (x >> (32 - k))) & mask

    def word(j: int) -> int:
        return int.from_bytes(data[j : j + 4], "little")

    length = len(data)
    a = b = c = (0xDEADBEEF + length) & mask
    i = 0
    while length > 12:
        a, b, c = (a + word(i)) & mask, (b + word(i + 4)) & mask, (c + word(i + 8)) & mask
        a = ((a - c) & mask) ^ rot(c, 4)
        c = (c + b) & mask
        b = ((b - a) & mask) ^ rot(a, 6)
        a = (a + c) & mask
        c = ((c - b) & mask) ^ rot(b, 8)
        b = (b + a) & mask
        a = ((a - c) & mask) ^ rot(c, 16)
        c = (c + b) & mask
        b = ((b - a) & mask) ^ rot(a, 19)
        a = (a + c) & mask
        c = ((c - b) & mask) ^ rot(b, 4)
        b = (b + a) & mask
        length -= 12
        i += 12
    if length == 0:
        return c
    tail = data[i:] + bytes(12 - length)
    a = (a + int.from_bytes(tail[0:4], "little")) & mask
    b = (b + int.from_bytes(tail[4:8], "little")) & mask
    c = (c + int.from_bytes(tail[8:12], "little")) & mask
    c = ((c ^ b) - rot(b, 14)) & mask
    a = ((a ^ c) - rot(c, 11)) & mask
    b = ((b ^ a) - rot(a, 25)) & mask
    c = ((c ^ b) - rot(b, 16)) & mask
    a = ((a ^ c) - rot(c, 4)) & mask
    b = ((b ^ a) - rot(a, 14)) & mask
    c = ((c ^ b) - rot(b, 24)) & mask
    return c


def clear_write_flags(path: Path) -> bool:
    """Clear the "open for writing" marks a writer killed while writing leaves in the
    superblock (what ``h5clear -s`` does), so the file can be opened for writing again.

    Only superblock versions 2/3 (libver "latest", what tangopipe writes) carry them;
    returns True if they were set.
    """
    with open(path, "r+b") as fh:
        head = bytearray(fh.read(48))
        if len(head) < 48 or not head.startswith(_SIGNATURE) or head[8] not in (2, 3) or head[9] != 8:
            return False
        if int.from_bytes(head[44:48], "little") != _lookup3(bytes(head[:44])):
            raise OSError(f"{path}: the superblock checksum does not match; not touching the file")
        if head[11] == 0:
            return False
        head[11] = 0
        head[44:48] = _lookup3(bytes(head[:44])).to_bytes(4, "little")
        fh.seek(0)
        fh.write(head)
    return True


class _Part:
    """One HDF5 file of a scan (the main file or a derived stream's companion)."""

    def __init__(self, path: Path, create: bool = True):
        self.path = path
        self.live = False  # in SWMR mode: no new objects
        self.file = h5py.File(path, "x" if create else "r+", libver="latest")

    def start_swmr(self) -> None:
        self.file.flush()
        self.file.swmr_mode = True
        self.live = True

    def reopen(self, swmr: bool) -> None:
        """Close the (possibly broken) handle and open the file again for writing."""
        try:
            self.file.close()
        except Exception:  # a handle that failed to write may fail to close; the reopen tells
            pass
        restore_end_of_file(self.path)
        self.file = h5py.File(self.path, "r+", libver="latest")
        self.live = False
        if swmr:
            try:
                self.file.swmr_mode = True
            except (ValueError, RuntimeError, OSError) as exc:
                # a handle that died while writing leaves the file marked for SWMR writing
                if "already in SWMR writing mode" not in str(exc):
                    raise
            self.live = True

    def close(self) -> None:
        if self.file.id.valid:
            self.file.flush()
            self.file.close()


class _Ragged:
    """A derived stream: entries for some frames, arrays concatenated with per-entry counts."""

    def __init__(self, part: _Part, group: h5py.Group, options: dict[str, Any]):
        self.part = part
        self.group = group
        self.options = options

    def dataset(self, name: str, value: np.ndarray) -> h5py.Dataset | None:
        ds = self.group.get(name)
        if ds is None:
            if self.part.live:
                return None
            inner = value.shape[1:]
            row_bytes = max(1, int(np.prod(inner)) * value.dtype.itemsize)
            rows = max(1, min(1024, (1 << 20) // row_bytes))
            extra = self.options if inner and value.dtype.kind not in "OSU" else {}
            ds = self.group.create_dataset(
                name,
                shape=(0, *inner),
                maxshape=(None, *inner),
                dtype=_storable_dtype(value),
                chunks=(rows, *inner),
                **extra,
            )
        elif ds.shape[1:] != value.shape[1:]:
            raise ValueError(
                f"result {self.group.name}/{name} changed shape from {ds.shape[1:]} to {value.shape[1:]}"
            )
        return ds

    def append(self, name: str, value: np.ndarray) -> bool:
        ds = self.dataset(name, value)
        if ds is None:
            return False
        start = ds.shape[0]
        ds.resize(start + value.shape[0], axis=0)
        ds[start:] = value
        return True

    def add(self, row: int, results: dict[str, np.ndarray]) -> list[str]:
        """Append one entry; returns the names that could not be written (new after SWMR)."""
        skipped = []
        self.append("index", np.asarray([row], dtype=np.int64))
        for key, value in results.items():
            if value.ndim == 0:
                ok = self.append(key, value.reshape(1))
            else:
                count = np.asarray([value.shape[0]], dtype=np.int64)
                ok = self.dataset(key, value) is not None and self.dataset(f"{key}_count", count) is not None
                if ok:
                    self.append(key, value)
                    self.append(f"{key}_count", count)
            if not ok:
                skipped.append(key)
        if "signal" not in self.group.attrs and not self.part.live:
            self.group.attrs["signal"] = self._signal()
            self.group.attrs["axes"] = ["index"]
            self.group.attrs["index_indices"] = 0
        return skipped

    def _signal(self) -> str:
        for name, ds in self.group.items():
            if name != "index" and not name.endswith("_count") and ds.ndim == 1 and ds.dtype.kind in "biuf":
                return name
        return "index"

    def lengths(self) -> dict[str, int]:
        return {name: ds.shape[0] for name, ds in self.group.items() if isinstance(ds, h5py.Dataset)}

    def truncate(self, lengths: dict[str, int]) -> None:
        for name, ds in self.group.items():
            if isinstance(ds, h5py.Dataset):
                ds.resize(lengths.get(name, 0), axis=0)


class NexusScanFile:
    """Writes one scan; call :meth:`write` with the ordered results, then :meth:`close`.

    ``swmr``: readers may open the file while it is written (see the module
    docstring); ``compression``: ``none``, ``gzip`` or ``bslz4`` for array results;
    ``save_raw``: write the raw frame (result ``image``) as the detector's ``data``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        start: m.Message,
        pipeline: str = "",
        *,
        swmr: bool = True,
        compression: str = "none",
        save_raw: bool = True,
        max_unflushed_bytes: int = 64 << 20,
        space_margin: int | None = SPACE_MARGIN,
    ):
        self.path = Path(path)
        self.swmr = swmr
        self.options = compression_options(compression)
        self.compression = compression
        self.save_raw = save_raw
        self.max_unflushed_bytes = max_unflushed_bytes
        self.space_margin = space_margin  # None: no check (tests of the recovery itself)
        self.scan = start.scan
        self.stream = start.stream or "results"
        self.start_meta = dict(start.meta)
        self.version_base = int(start.meta.get("processing_version_base", 0) or 0)
        self.rows = 0
        self.written = 0
        self.gaps: list[int] = []
        self.skipped: set[str] = set()  # result names that came too late for the SWMR file
        self.broken = False  # a write failed: call recover() before writing again
        self.closed = False
        self.resumed = False  # opened again after a writer was killed (see resume)
        self.lost_rows: list[int] = []  # rows skipped over: lost with a killed writer
        self.declared = False
        self.motors: list[str] = []
        self.derived: dict[str, _Ragged] = {}
        self._log: list[m.Message] = []  # written since the last flush (replayed by recover)
        self._log_bytes = 0
        self._last_flush = time.monotonic()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            raise FileExistsError(f"{self.path} exists; tangopipe never overwrites a scan file")
        self._check_space(0)
        self.main = _Part(self.path)
        try:
            self._make_structure(pipeline, start)
            self.main.file.flush()
        except BaseException:
            self._discard()
            raise
        self._snapshot = self._state()

    @classmethod
    def resume(
        cls,
        path: str | os.PathLike,
        start: m.Message,
        *,
        swmr: bool = True,
        compression: str = "none",
        save_raw: bool = True,
        max_unflushed_bytes: int = 64 << 20,
        space_margin: int | None = SPACE_MARGIN,
    ) -> NexusScanFile:
        """Carry on writing the file of ``start``'s scan that a killed writer left.

        Rows on disk stay as they are; replayed rows already there are skipped by the
        caller (:attr:`rows`); rows the killed writer had not flushed become gap rows
        when a later row is written, so the file says exactly which frames it lacks.
        Raises FileExistsError if the file belongs to another scan.
        """
        self = cls.__new__(cls)
        self.path = Path(path)
        self.swmr = swmr
        self.options = compression_options(compression)
        self.compression = compression
        self.save_raw = save_raw
        self.max_unflushed_bytes = max_unflushed_bytes
        self.space_margin = space_margin
        self.scan = start.scan
        self.stream = start.stream or "results"
        self.start_meta = dict(start.meta)
        self.version_base = int(start.meta.get("processing_version_base", 0) or 0)
        self.skipped, self.broken, self.closed = set(), False, False
        self.derived, self.motors = {}, []
        self._log, self._log_bytes, self._last_flush = [], 0, time.monotonic()
        self.resumed = True
        self.lost_rows: list[int] = []
        restore_end_of_file(self.path)
        clear_write_flags(self.path)
        self.main = _Part(self.path, create=False)
        f = self.main.file
        try:
            scan_id = f["entry/scan_id"][()]
            scan_id = scan_id.decode() if isinstance(scan_id, bytes) else str(scan_id)
            uid = start.meta.get("scan_uid")
            file_uid = f["entry/scan"].get("scan_uid")
            file_uid = file_uid[()].decode() if file_uid is not None and isinstance(file_uid[()], bytes) else None
            if scan_id != str(start.scan) or (uid and file_uid and file_uid != uid):
                raise FileExistsError(f"{self.path} holds scan {scan_id}, not scan {start.scan}: not resumed")
            self.data = f[f"entry/{self.stream}"]
            self.row_sets, self._results = {}, {}
            self.rows = min(ds.shape[0] for ds in self.data.values() if isinstance(ds, h5py.Dataset))
            self.index = self._row_dataset(self.data, "index", np.dtype("int64"), ())
            self.valid = self._row_dataset(self.data, "valid", np.dtype("bool"), ())
            self.version = self._row_dataset(self.data, "processing_version", np.dtype("int32"), ())
            for name, ds in self.data.items():
                if isinstance(ds, h5py.Dataset) and name not in ("index", "valid", "processing_version"):
                    self._results[name] = self._row_dataset(self.data, name, ds.dtype, ds.shape[1:])
            self.declared = bool(self._results)
            positions = f["entry/scan"].get("positions")
            if positions is not None:
                self.motors = [n for n in self._motor_names(start) if n.replace("/", "_") in positions]
                for motor in self.motors:
                    self._row_dataset(positions, motor.replace("/", "_"), np.dtype("float64"), ())
            for ds in self.row_sets.values():
                ds.resize(self.rows, axis=0)
            self.written = int(np.count_nonzero(self.valid[:]))
            self.gaps = [int(g) for g in f["entry/gaps"][:] if g < self.rows]
            f["entry/gaps"].resize(len(self.gaps), axis=0)
            f.flush()
            if self.declared and swmr:
                self.main.start_swmr()
        except BaseException:
            self.main.file.close()
            raise
        self._snapshot = self._state()
        return self

    # -- structure -----------------------------------------------------------------------
    def _make_structure(self, pipeline: str, start: m.Message) -> None:
        f = self.main.file
        f.attrs["NX_class"] = "NXroot"
        f.attrs["creator"] = "tangopipe"
        f.attrs["creator_version"] = tangopipe_version()
        f.attrs["file_time"] = _now()
        f.attrs["default"] = "entry"
        entry = f.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        entry.attrs["default"] = self.stream
        meta = dict(start.meta)
        processing = meta.pop("processing", {})
        source = meta.pop("source", {})
        origin = {k: meta.pop(k) for k in ("reprocessed_from", "original_processing_json") if k in meta}
        title = (
            meta.get("title") or meta.get("command") or meta.get("macro") or f"{pipeline} scan {start.scan}"
        )
        entry["title"] = str(title)
        entry["start_time"] = _now()
        entry["scan_id"] = str(start.scan)
        entry.create_dataset("end_time", data=np.bytes_(b""), dtype=f"S{_TIME_BYTES}")
        for name in ("frames_written", "frames_acquired", "frames_dropped", "frames_expected"):
            entry.create_dataset(name, data=np.int64(0 if name == "frames_written" else -1))
        entry.create_dataset("gaps", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(1024,))
        entry["program_name"] = "tangopipe"
        entry["program_name"].attrs["version"] = tangopipe_version()

        scan = entry.create_group("scan")
        scan.attrs["NX_class"] = "NXcollection"
        scan["metadata_json"] = _json(meta)
        for key, value in meta.items():
            _put(scan, key, value)
        self._make_sample(entry, meta)

        instrument = entry.create_group("instrument")
        instrument.attrs["NX_class"] = "NXinstrument"
        det = instrument.create_group("detector")
        det.attrs["NX_class"] = "NXdetector"
        for key, value in source.items():
            _put(det, key, value)
        if isinstance(source.get("pixel_size_um"), int | float):
            for axis in ("x_pixel_size", "y_pixel_size"):
                det[axis] = float(source["pixel_size_um"]) * 1e-6
                det[axis].attrs["units"] = "m"
        if "detector" in source:
            _put(det, "description", source["detector"])

        proc = entry.create_group("process")
        proc.attrs["NX_class"] = "NXprocess"
        proc["program"] = "tangopipe"
        proc["version"] = tangopipe_version()
        proc["date"] = _now()
        proc["configuration_json"] = _json(processing)
        if self.version_base:
            proc["processing_version_base"] = self.version_base
        for key, value in origin.items():  # a reprocessing: what it started from
            _put(proc, key, value)
        if isinstance(processing, dict):
            for group_name, config in processing.items():
                note = proc.create_group(str(group_name).replace("/", "_"))
                note.attrs["NX_class"] = "NXparameters"
                note["configuration_json"] = _json(config)
                if isinstance(config, dict) and isinstance(config.get("version"), int):
                    note["version"] = config["version"]

        data = entry.create_group(self.stream)
        data.attrs["NX_class"] = "NXdata"
        self.data = data
        self.row_sets: dict[str, h5py.Dataset] = {}
        self._results: dict[str, h5py.Dataset] = {}
        self.index = self._row_dataset(data, "index", np.dtype("int64"), ())
        self.valid = self._row_dataset(data, "valid", np.dtype("bool"), ())
        self.version = self._row_dataset(data, "processing_version", np.dtype("int32"), ())
        proc["processing_version"] = self.version  # a hard link: the version of every frame

    @staticmethod
    def _make_sample(entry: h5py.Group, meta: dict[str, Any]) -> None:
        fields = {k[len("sample_") :]: v for k, v in meta.items() if k.startswith("sample_")}
        sample = meta.get("sample")
        if isinstance(sample, dict):
            fields.update(sample)
        elif sample is not None:
            fields["name"] = sample
        if not fields:
            return
        group = entry.create_group("sample")
        group.attrs["NX_class"] = "NXsample"
        for key, value in fields.items():
            _put(group, key, value)

    def _row_dataset(
        self, group: h5py.Group, name: str, dtype: np.dtype, shape: tuple[int, ...]
    ) -> h5py.Dataset:
        """A dataset with one row per frame (made, or found again after a reopen)."""
        ds = group.get(name)
        if ds is None:
            row_bytes = max(1, int(np.prod(shape)) * dtype.itemsize)
            if not shape:
                rows = _MAX_SCALAR_CHUNK
            elif len(shape) >= 2:
                rows = 1  # one image per chunk, as detectors write them: compressed and read frame by frame
            else:
                rows = max(1, min(64, _ROW_CHUNK_BYTES // row_bytes))
            extra = self.options if shape and dtype.kind not in "OSU" else {}
            fill = _fill_value(dtype)
            ds = group.create_dataset(
                name,
                shape=(self.rows, *shape),
                maxshape=(None, *shape),
                dtype=dtype,
                chunks=(rows, *shape),
                **({"fillvalue": fill} if fill is not None else {}),
                **extra,
            )
        self.row_sets[ds.name] = ds
        return ds

    def _declare(self, msg: m.Message) -> None:
        """Make the per-frame datasets from the first result, then go SWMR."""
        values = result_values(msg)
        main = {
            k: v for k, v in values.items() if "/" not in k and not (k == RAW_RESULT and not self.save_raw)
        }
        for name, value in main.items():
            self._result_dataset(name, value)
        motors = self._motor_names(msg)
        if motors:
            positions = self.main.file["entry/scan"].require_group("positions")
            positions.attrs["NX_class"] = "NXcollection"
            for motor in motors:
                self._row_dataset(positions, motor.replace("/", "_"), np.dtype("float64"), ())
            self.motors = motors
        self._set_signal(main)
        self.declared = True
        if self.swmr and not self.main.live:
            self.main.start_swmr()

    def _result_dataset(self, name: str, value: np.ndarray) -> h5py.Dataset | None:
        """The row dataset of result ``name``: made from its first value, None once too late (SWMR)."""
        ds = self._results.get(name)
        if ds is not None:
            return ds
        if name in self.data:  # found again after a reopen
            ds = self._row_dataset(self.data, name, self.data[name].dtype, self.data[name].shape[1:])
        elif self.main.live:
            return None
        elif name == RAW_RESULT and value.ndim == 2:
            det = self.main.file["entry/instrument/detector"]
            ds = self._row_dataset(det, "data", value.dtype, value.shape)
            self.data[name] = ds  # a hard link: the raw frames seen from the NXdata group too
        else:
            ds = self._row_dataset(self.data, name, _storable_dtype(value), value.shape)
        self._results[name] = ds
        return ds

    def _motor_names(self, msg: m.Message) -> list[str]:
        names: list[str] = []
        declared = self.start_meta.get("motors")
        if isinstance(declared, dict):
            names += [str(k) for k in declared]
        elif isinstance(declared, list):
            names += [str(k) for k in declared if isinstance(k, str)]
        positions = msg.meta.get("positions")
        if isinstance(positions, dict):
            names += [str(k) for k in positions]
        return list(dict.fromkeys(names))

    def _set_signal(self, main: dict[str, np.ndarray]) -> None:
        """NXdata ``signal``/``axes`` so that h5py users and silx plot something useful."""
        by_rank: dict[int, list[str]] = {}
        for name, value in main.items():
            if value.dtype.kind in "biuf" and not (name == RAW_RESULT and not self.save_raw):
                by_rank.setdefault(value.ndim, []).append(name.replace("/", "__"))
        for rank in (0, 1, 2, 3):
            names = [n for n in by_rank.get(rank, []) if n != RAW_RESULT] or by_rank.get(rank, [])
            if names:
                self.data.attrs["signal"] = names[0]
                self.data.attrs["axes"] = ["index"] + ["."] * rank
                if rank == 0 and len(names) > 1:
                    self.data.attrs["auxiliary_signals"] = names[1:16]
                break
        else:
            self.data.attrs["signal"] = "valid"
            self.data.attrs["axes"] = ["index"]
        self.data.attrs["index_indices"] = 0

    def _derived(self, stream: str) -> _Ragged:
        ragged = self.derived.get(stream)
        if ragged is not None:
            return ragged
        if not self.swmr:
            group = self.main.file["entry"].create_group(stream)
            group.attrs["NX_class"] = "NXdata"
            ragged = _Ragged(self.main, group, self.options)
        else:
            part = _Part(self.companion_path(stream))
            f = part.file
            f.attrs["NX_class"] = "NXroot"
            f.attrs["creator"] = "tangopipe"
            f.attrs["default"] = "entry"
            entry = f.create_group("entry")
            entry.attrs["NX_class"] = "NXentry"
            entry.attrs["default"] = stream
            entry["scan_id"] = str(self.scan)
            entry["main_file"] = self.path.name
            group = entry.create_group(stream)
            group.attrs["NX_class"] = "NXdata"
            ragged = _Ragged(part, group, self.options)
        self.derived[stream] = ragged
        return ragged

    def companion_path(self, stream: str) -> Path:
        """The file of derived stream ``stream`` when writing with SWMR."""
        return self.path.with_name(f"{self.path.stem}-{stream}{self.path.suffix}")

    def _check_space(self, nbytes: int) -> None:
        """Room for ``nbytes`` more, what is not flushed yet and the margin (see :func:`check_space`)."""
        if self.space_margin is None:
            return
        size = None
        main = getattr(self, "main", None)
        if main is not None and main.file.id.valid:
            size = main.file.id.get_filesize()  # HDF5's end of allocation: ahead of the bytes on disk
        try:
            check_space(self.path, nbytes + self._log_bytes + self.space_margin, size)
        except StorageFull:
            if nbytes and self._log:  # no room for more: readers should at least see what is written
                try:
                    check_space(self.path, self._log_bytes + self.space_margin, size)
                except StorageFull:
                    pass
                else:
                    self.flush(force=True)
            raise

    def _parts(self) -> list[_Part]:
        return [self.main] + [r.part for r in self.derived.values() if r.part is not self.main]

    @property
    def paths(self) -> list[Path]:
        """Every file of this scan (main first)."""
        return [part.path for part in self._parts()]

    # -- rows ----------------------------------------------------------------------------
    def write(self, msg: m.Message) -> None:
        """Write one ordered result or gap as row ``msg.index``."""
        assert msg.index is not None
        if self.broken:
            raise RuntimeError(f"{self.path}: a write failed; recover() before writing again")
        row = msg.index
        if row < self.rows:
            raise ValueError(f"index {row} written twice or out of order (next row {self.rows})")
        self._check_space(msg.nbytes())
        if msg.kind == m.RESULT and not self.declared:
            self._declare(msg)
        for ds in self.row_sets.values():
            if ds.shape[0] < row + 1:
                ds.resize(row + 1, axis=0)
        if row > self.rows:  # rows never given to this file (lost with a killed writer): say so
            skipped = list(range(self.rows, row))
            self.index[self.rows : row] = skipped
            self.valid[self.rows : row] = False
            gaps = self.main.file["entry/gaps"]
            gaps.resize(len(self.gaps) + len(skipped), axis=0)
            gaps[len(self.gaps) :] = skipped
            self.gaps += skipped
            self.lost_rows += skipped
        self.index[row] = row
        if msg.kind == m.GAP:
            self.valid[row] = False
            gaps = self.main.file["entry/gaps"]
            gaps.resize(len(self.gaps) + 1, axis=0)
            gaps[len(self.gaps)] = row
            self.gaps.append(row)
        else:
            self._write_result(row, msg)
            self.written += 1
        self.rows = row + 1
        self._log.append(msg)
        self._log_bytes += msg.nbytes() + 256

    def _write_result(self, row: int, msg: m.Message) -> None:
        self.valid[row] = True
        self.version[row] = msg.version + self.version_base
        derived: dict[str, dict[str, np.ndarray]] = {}
        for name, value in result_values(msg).items():
            if "/" in name:
                stream, _, key = name.partition("/")
                derived.setdefault(stream, {})[key] = value
                continue
            if name == RAW_RESULT and not self.save_raw:
                continue
            ds = self._result_dataset(name, value)
            if ds is None:
                self.skipped.add(name)
                continue
            if ds.shape[1:] != value.shape:
                raise ValueError(
                    f"result {name!r} changed shape from {ds.shape[1:]} to {value.shape} within scan"
                )
            ds[row] = value
        positions = msg.meta.get("positions")
        if self.motors and isinstance(positions, dict):
            group = self.main.file["entry/scan/positions"]
            for motor in self.motors:
                value = positions.get(motor)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    group[motor.replace("/", "_")][row] = value
        for stream, results in derived.items():
            ragged = self._derived(stream)
            self.skipped.update(f"{stream}/{key}" for key in ragged.add(row, results))
            if ragged.part is not self.main and not ragged.part.live:
                ragged.part.start_swmr()

    # -- durability ----------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "written": self.written,
            "gaps": len(self.gaps),
            "declared": self.declared,
            "live": self.main.live,
            "motors": list(self.motors),
            "derived": {s: (r.lengths(), r.part.live) for s, r in self.derived.items()},
        }

    def flush(self, every_s: float = 1.0, force: bool = False) -> bool:
        """Flush when ``every_s`` passed since the last flush (readers see rows after a
        flush), or when the rows written since hold ``max_unflushed_bytes``."""
        now = time.monotonic()
        due = now - self._last_flush >= every_s or self._log_bytes >= self.max_unflushed_bytes
        if not force and not (due and self._log):
            return False
        self._last_flush = now
        for part in self._parts():
            part.file.flush()
        self._snapshot = self._state()
        self._log.clear()
        self._log_bytes = 0
        return True

    def recover(self) -> None:
        """After a failed write: reopen, go back to the last flush, write the rest again."""
        snap = self._snapshot
        # Closing a broken handle flushes what it holds; without room for that HDF5 (2.0,
        # with h5py 3.16) may crash the process. So: only once there is room, checked
        # even when the checks before writing are off.
        try:
            size = self.main.file.id.get_filesize() if self.main.file.id.valid else None
        except Exception:
            size = None
        check_space(self.path, self._log_bytes + (self.space_margin or SPACE_MARGIN), size)
        # Let go of every object of the old handles before closing them: an h5py object
        # freed after its file was closed and opened again would release the new one's ids.
        self.data = self.index = self.valid = self.version = None  # type: ignore[assignment]
        self.row_sets, self._results = {}, {}
        for ragged in self.derived.values():
            ragged.group = None
        gc.collect()
        self.main.reopen(swmr=snap["live"])
        for stream, ragged in list(self.derived.items()):
            if ragged.part is self.main:
                continue
            if stream in snap["derived"]:
                ragged.part.reopen(swmr=snap["derived"][stream][1])
            else:  # made after the last flush: start it again from nothing
                try:
                    ragged.part.file.close()
                except Exception:
                    pass
                ragged.part.path.unlink(missing_ok=True)
                del self.derived[stream]
        f = self.main.file
        self.data = f[f"entry/{self.stream}"]
        self.rows = snap["rows"]
        self.index = self._row_dataset(self.data, "index", np.dtype("int64"), ())
        self.valid = self._row_dataset(self.data, "valid", np.dtype("bool"), ())
        self.version = self._row_dataset(self.data, "processing_version", np.dtype("int32"), ())
        self.declared = snap["declared"]
        self.motors = list(snap["motors"])
        if self.declared:
            for name, ds in self.data.items():
                if isinstance(ds, h5py.Dataset) and name not in ("index", "valid", "processing_version"):
                    self._results[name] = self._row_dataset(self.data, name, ds.dtype, ds.shape[1:])
            for motor in self.motors:
                ds = f["entry/scan/positions"][motor.replace("/", "_")]
                self.row_sets[ds.name] = ds
        else:  # the first result came after the last flush: drop what was made of it
            for name in list(self.data):
                if name not in ("index", "valid", "processing_version"):
                    del self.data[name]
            det = f["entry/instrument/detector"]
            if "data" in det and isinstance(det["data"], h5py.Dataset) and det["data"].maxshape[0] is None:
                del det["data"]
            if "positions" in f["entry/scan"]:
                del f["entry/scan/positions"]
            for attr in ("signal", "axes", "auxiliary_signals", "index_indices"):
                if attr in self.data.attrs:
                    del self.data.attrs[attr]
        for ds in self.row_sets.values():
            ds.resize(self.rows, axis=0)
        self.written = snap["written"]
        del self.gaps[snap["gaps"] :]
        f["entry/gaps"].resize(len(self.gaps), axis=0)
        for stream, ragged in self.derived.items():
            group = ragged.part.file[ragged.group.name]
            ragged.group = group
            ragged.truncate(snap["derived"].get(stream, ({}, False))[0])
        replay, self._log, self._log_bytes = self._log, [], 0
        self.broken = False
        for msg in replay:
            self.write(msg)
        self.flush(force=True)

    # -- end -----------------------------------------------------------------------------
    def close(self, end: m.Message | None = None) -> None:
        """Write the scan's end (times, counts, late positions), flush and close every file."""
        if self.closed:
            return
        if self.broken:
            raise RuntimeError(f"{self.path}: a write failed; recover() before closing")
        entry = self.main.file["entry"]
        entry["end_time"][()] = np.bytes_(_now().encode()[:_TIME_BYTES])
        entry["frames_written"][()] = self.written
        late: dict[str, np.ndarray] = {}
        if end is not None:
            for key, name in (
                ("frames", "frames_acquired"),
                ("dropped", "frames_dropped"),
                ("expected", "frames_expected"),
            ):
                value = end.meta.get(key)
                if isinstance(value, int) and not isinstance(value, bool):
                    entry[name][()] = value
            late = self._end_positions(end.meta.get("positions"))
        self.flush(force=True)
        for ragged in self.derived.values():
            if ragged.part is not self.main:
                ragged.part.close()
        links = [s for s, r in self.derived.items() if r.part is not self.main]
        if self.main.live and (links or late):
            self.main.close()
            self.main.file = h5py.File(self.path, "r+", libver="latest")
            self.main.live = False
        if late:
            self._add_late_positions(late)
        if links:
            entry = self.main.file["entry"]
            for stream in links:
                if stream not in entry:
                    entry[stream] = h5py.ExternalLink(self.companion_path(stream).name, f"/entry/{stream}")
        self.main.close()
        for path in self.paths:
            os.chmod(path, 0o644)
        self.closed = True

    def _end_positions(self, table: Any) -> dict[str, np.ndarray]:
        """Fill positions reported after their frame; return the columns of undeclared motors."""
        if not isinstance(table, dict):
            return {}
        late = {}
        for motor, column in table.items():
            if not isinstance(column, list):
                continue
            values = np.asarray([np.nan if v is None else v for v in column], dtype=np.float64)[
                : max(self.rows, 0)
            ]
            if motor in self.motors:
                ds = self.main.file["entry/scan/positions"][motor.replace("/", "_")]
                current = ds[: len(values)]
                fill = np.isnan(current) & ~np.isnan(values)
                if fill.any():
                    current[fill] = values[fill]
                    ds[: len(values)] = current
            elif not self.main.live:
                self.motors.append(motor)
                group = self.main.file["entry/scan"].require_group("positions")
                group.attrs["NX_class"] = "NXcollection"
                ds = self._row_dataset(group, motor.replace("/", "_"), np.dtype("float64"), ())
                ds.resize(self.rows, axis=0)
                ds[: len(values)] = values
            else:
                late[motor] = values
        return late

    def _add_late_positions(self, late: dict[str, np.ndarray]) -> None:
        group = self.main.file["entry/scan"].require_group("positions")
        group.attrs["NX_class"] = "NXcollection"
        for motor, values in late.items():
            column = np.full(self.rows, np.nan)
            column[: len(values)] = values
            key = motor.replace("/", "_")
            if key not in group:
                group.create_dataset(key, data=column)

    def _discard(self) -> None:
        """Remove a file whose creation failed half way (it never held data)."""
        try:
            self.main.file.close()
        except Exception:
            pass
        self.path.unlink(missing_ok=True)
