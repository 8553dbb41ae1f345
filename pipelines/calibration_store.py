"""Calibration constants on disk: array files and a folder indexed by scan number.

One folder serves the online pipeline and offline reprocessing alike. Its
``index.yaml`` lists, per kind of constant, which file is valid for which scans::

    dark:
      - file: dark_0001.npy
        scans: [1, 119]
      - file: pedestal.h5::/entry/data/data   # HDF5 file :: dataset
        scans: [120, null]                    # null: no upper end (yet)
    gain:
      - file: gain.tif
        scans: [1, null]
    mask:
      - file: mask.npy
        scans: [1, null]

Kinds are ``dark``, ``gain``, ``flat`` and ``mask``. Ranges are inclusive and must
not overlap within a kind (close the old range when adding a newer constant).
The index is read again when it changes on disk, so constants measured during a
beamtime are used from the next scan on without restarting anything.

Array files are ``.npy``, ``.tif``/``.tiff``, or HDF5 as ``file.h5::/path/to/dataset``
(``file.h5`` alone works when the file holds exactly one dataset).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("dark", "gain", "flat", "mask")
INDEX_FILE = "index.yaml"
_HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".nxs", ".cxi")


def _split_hdf5(spec: str) -> tuple[str, str | None]:
    if "::" in spec:
        path, _, dataset = spec.partition("::")
        return path, dataset or None
    return spec, None


def load_array(spec: str | Path, base: str | Path | None = None) -> np.ndarray:
    """Read an array from ``.npy``, ``.tif`` or ``file.h5::/dataset``; relative paths start at ``base``."""
    path_text, dataset = _split_hdf5(str(spec))
    path = Path(path_text).expanduser()
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix in (".tif", ".tiff"):
        import tifffile  # optional dependency (extra "io")

        return tifffile.imread(path)
    if suffix in _HDF5_SUFFIXES:
        import h5py

        with h5py.File(path, "r") as h5:
            if dataset is None:
                names: list[str] = []
                h5.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
                if len(names) != 1:
                    raise ValueError(
                        f"{str(path)!r} holds {len(names)} datasets ({', '.join(names[:5])}); "
                        f"name one as '{path}::/path/to/dataset'"
                    )
                dataset = names[0]
            if dataset not in h5 or not isinstance(h5[dataset], h5py.Dataset):
                raise ValueError(f"{str(path)!r} has no dataset {dataset!r}")
            return h5[dataset][()]
    raise ValueError(
        f"calibration file {str(path)!r}: unknown type {suffix!r}; expected .npy, .tif or .h5::/dataset"
    )


def load_mask(spec: str | Path | list, base: str | Path | None = None) -> np.ndarray:
    """A bad-pixel mask as bool (True = bad) from one file or the union of several; nonzero means bad."""
    specs = spec if isinstance(spec, list | tuple) else [spec]
    mask: np.ndarray | None = None
    for one in specs:
        part = np.asarray(load_array(one, base)) != 0
        if part.ndim != 2:
            raise ValueError(f"mask {one!r} has shape {part.shape}; expected a 2D image")
        if mask is not None and part.shape != mask.shape:
            raise ValueError(f"mask {one!r} has shape {part.shape}, other masks have {mask.shape}")
        mask = part if mask is None else (mask | part)
    if mask is None:
        raise ValueError("mask: no file given")
    return mask


def scan_number(scan: Any) -> int:
    """The scan id as an integer (validity ranges are by scan number)."""
    if isinstance(scan, int) and not isinstance(scan, bool):
        return scan
    if isinstance(scan, str) and scan.strip().lstrip("-").isdigit():
        return int(scan)
    raise ValueError(f"scan id {scan!r} is not a scan number; calibration ranges need an integer scan id")


@dataclass(frozen=True)
class Entry:
    """One constant: its kind, file (as written in the index) and inclusive scan range."""

    kind: str
    file: str
    first: int
    last: int | None

    def covers(self, scan: int) -> bool:
        return self.first <= scan and (self.last is None or scan <= self.last)


def _parse_index(folder: Path, data: Any) -> dict[str, list[Entry]]:
    where = folder / INDEX_FILE
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of kind -> list of entries, got {type(data).__name__}")
    entries: dict[str, list[Entry]] = {}
    for kind, items in data.items():
        if kind not in KINDS:
            raise ValueError(f"{where}: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
        if not isinstance(items, list):
            raise ValueError(f"{where}: {kind} must be a list of {{file, scans}} entries")
        parsed = []
        for item in items:
            scans = item.get("scans") if isinstance(item, dict) else None
            ok = (
                isinstance(item, dict)
                and isinstance(item.get("file"), str)
                and isinstance(scans, list)
                and len(scans) == 2
                and isinstance(scans[0], int)
                and (scans[1] is None or (isinstance(scans[1], int) and scans[1] >= scans[0]))
            )
            if not ok:
                raise ValueError(
                    f"{where}: {kind} entry {item!r} must be {{file: name, scans: [first, last or null]}}"
                )
            parsed.append(Entry(kind, item["file"], scans[0], scans[1]))
        parsed.sort(key=lambda e: e.first)
        for before, after in zip(parsed, parsed[1:], strict=False):
            if before.last is None or before.last >= after.first:
                raise ValueError(
                    f"{where}: {kind} ranges of {before.file!r} [{before.first}, {before.last}] and "
                    f"{after.file!r} [{after.first}, {after.last}] overlap; close the older range"
                )
        entries[kind] = parsed
    return entries


class CalibrationStore:
    """A calibration folder: which constant file is valid for which scan, and loading it (cached)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()
        if not (self.folder / INDEX_FILE).is_file():
            raise FileNotFoundError(f"calibration folder {str(self.folder)!r} has no {INDEX_FILE}")
        self._mtime: float = -1.0
        self._entries: dict[str, list[Entry]] = {}
        self._arrays: dict[str, np.ndarray] = {}
        self.refresh()

    def refresh(self) -> None:
        """Read ``index.yaml`` again if it changed since the last read."""
        import yaml

        path = self.folder / INDEX_FILE
        mtime = path.stat().st_mtime
        if mtime == self._mtime:
            return
        with open(path) as f:
            try:
                data = yaml.safe_load(f)
            except yaml.YAMLError as exc:
                raise ValueError(f"{path}: not valid YAML: {exc}") from exc
        self._entries = _parse_index(self.folder, data)
        self._mtime = mtime

    def kinds(self) -> list[str]:
        return list(self._entries)

    def entry(self, kind: str, scan: Any) -> Entry | None:
        """The entry of ``kind`` valid for ``scan``; None if the folder has no such kind at all."""
        if kind not in KINDS:
            raise ValueError(f"unknown calibration kind {kind!r}; expected one of {', '.join(KINDS)}")
        items = self._entries.get(kind)
        if not items:
            return None
        number = scan_number(scan)
        for item in items:
            if item.covers(number):
                return item
        ranges = ", ".join(f"{e.file} [{e.first}, {e.last}]" for e in items)
        raise LookupError(
            f"calibration folder {str(self.folder)!r}: no {kind} valid for scan {number} ({ranges})"
        )

    def load(self, entry: Entry) -> np.ndarray:
        """The array of ``entry`` (masks as bool, True = bad), read once and kept."""
        if entry.file not in self._arrays:
            if entry.kind == "mask":
                self._arrays[entry.file] = load_mask(entry.file, self.folder)
            else:
                self._arrays[entry.file] = np.asarray(load_array(entry.file, self.folder))
        return self._arrays[entry.file]

    def constants(self, scan: Any) -> dict[str, Entry]:
        """All kinds valid for ``scan``: kind -> entry (kinds absent from the folder are left out)."""
        self.refresh()
        found = {}
        for kind in self._entries:
            item = self.entry(kind, scan)
            if item is not None:
                found[kind] = item
        used = {e.file for e in found.values()}
        self._arrays = {f: a for f, a in self._arrays.items() if f in used}  # keep only what is in use
        return found
