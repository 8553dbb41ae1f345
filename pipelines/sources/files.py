"""Files replayed as if live: HDF5/NeXus (Eiger master files too) and TIFF series.

The same pipeline definition that ran online reprocesses a finished scan when its
source is ``{kind: files, files: [...]}``: each scan plays one input, frame by
frame, at ``rate_hz`` (0: as fast as the pipeline takes them). An input is

- an HDF5 file: the frames are ``dataset`` when given, else the first found of
  ``/entry/instrument/detector/data`` (tangopipe's raw frames, the NeXus place),
  ``/entry/data/data_000001``, ``_000002``... (an Eiger master file, whose links
  point to its data files), ``/entry/data/data``, the default NXdata signal;
- a TIFF file (every page is a frame), a folder of TIFF files or a glob pattern
  (``scan12/*.tif``), sorted by name.

StartScan's metadata ``file`` picks the input of a scan; without it the source
plays its ``files`` in turn. Frames of a tangopipe file carry the motor positions
the file recorded (``meta["positions"]``), so maps and cubes come out the same.
"""

from __future__ import annotations

import glob
import os
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import SourceError

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".nxs", ".nx5", ".cxi")
TIFF_SUFFIXES = (".tif", ".tiff")
RAW_DATASET = "entry/instrument/detector/data"


def _open_h5(path: Path) -> Any:
    from ..files import open_h5

    return open_h5(path)


def hdf5_frames(f: Any, dataset: str = "") -> list[Any]:
    """The datasets holding the frames of an open HDF5 file, in order (see the module docstring)."""
    path = f.filename
    if dataset:
        ds = f.get(dataset)
        if ds is None or not hasattr(ds, "shape"):
            raise SourceError(f"{path}: no dataset {dataset!r}")
        if ds.ndim < 3:
            raise SourceError(
                f"{path}: dataset {dataset!r} has shape {ds.shape}; frames need (n, rows, cols)"
            )
        return [ds]
    raw = f.get(RAW_DATASET)
    if raw is not None and getattr(raw, "ndim", 0) >= 3:
        return [raw]
    data = f.get("entry/data")
    if data is not None:
        names = sorted(n for n in data if n.startswith("data_"))
        if names:
            parts = []
            for name in names:
                try:
                    parts.append(data[name])
                except KeyError:
                    link = data.get(name, getlink=True)
                    target = getattr(link, "filename", "?")
                    raise SourceError(f"{path}: {name} links to {target}, which cannot be opened") from None
            return parts
        if "data" in data and data["data"].ndim >= 3:
            return [data["data"]]
    group = f
    for _ in range(3):  # root -> entry -> NXdata by their "default" attributes
        default = group.attrs.get("default")
        if not isinstance(default, str) or default not in group:
            break
        group = group[default]
    signal = group.attrs.get("signal") if hasattr(group, "attrs") else None
    if isinstance(signal, str) and signal in group and group[signal].ndim >= 3:
        return [group[signal]]
    found = []
    f.visititems(lambda n, o: found.append(n) if getattr(o, "ndim", 0) >= 3 else None)
    raise SourceError(
        f"{path}: no frames found; give the source a dataset (3D datasets here: {found[:10] or 'none'})"
    )


def tiff_files(spec: str) -> list[Path]:
    """The TIFF files of one input: a file, a folder of TIFFs or a glob pattern, sorted."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in TIFF_SUFFIXES)
    elif any(c in spec for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(spec))
    else:
        files = [path]
    if not files:
        raise SourceError(f"{spec}: no TIFF files")
    return files


def _is_tiff(spec: str) -> bool:
    path = Path(spec)
    return (
        path.suffix.lower() in TIFF_SUFFIXES
        or path.is_dir()
        or (any(c in spec for c in "*?[") and spec.lower().endswith(TIFF_SUFFIXES))
    )


def _positions(f: Any) -> dict[str, np.ndarray]:
    group = f.get("entry/scan/positions")
    if group is None:
        return {}
    return {name: ds[()] for name, ds in group.items() if getattr(ds, "ndim", 0) == 1}


def count_frames(spec: str, dataset: str = "") -> int:
    """How many frames one input holds."""
    if _is_tiff(spec):
        import tifffile

        total = 0
        for path in tiff_files(spec):
            with tifffile.TiffFile(path) as tif:
                total += len(tif.pages)
        return total
    if not Path(spec).exists():
        raise SourceError(f"{spec}: no such file")
    with _open_h5(Path(spec)) as f:
        return sum(ds.shape[0] for ds in hdf5_frames(f, dataset))


class FileSource:
    """Replays files through the pipeline; see the module docstring.

    ``files``: the inputs, one per scan (paths, folders or glob patterns);
    ``dataset``: the HDF5 dataset of the frames (default: found); ``rate_hz``: frames
    per second (0: as fast as possible; StartScan's ``rate_hz`` overrides it).
    """

    def __init__(self, *, files: list | None = None, dataset: str = "", rate_hz: float = 0.0):
        files = [] if files is None else files
        if isinstance(files, str):
            files = [files]
        if not isinstance(files, list) or not all(isinstance(p, str) and p for p in files):
            raise ValueError(f"files source: files must be a list of paths, got {files!r}")
        if rate_hz < 0:
            raise ValueError(f"files source: rate_hz must be >= 0, got {rate_hz}")
        self.files = [os.path.abspath(p) for p in files]
        self.dataset = dataset
        self.rate_hz = float(rate_hz)
        self._next = 0
        self._stop = threading.Event()
        self.current = ""

    def _pick(self, scan: Mapping[str, Any]) -> str:
        chosen = scan.get("file")
        if isinstance(chosen, str) and chosen:
            return os.path.abspath(chosen)
        if self._next >= len(self.files):
            raise SourceError(
                f"files source: all {len(self.files)} inputs were played; give StartScan a 'file' or more files"
            )
        self._next += 1
        return self.files[self._next - 1]

    def frames(self, scan: Mapping[str, Any]) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
        self._stop.clear()
        spec = self._pick(scan)
        self.current = spec
        limit = scan.get("frames")
        limit = int(limit) if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None
        rate_hz = float(scan.get("rate_hz", self.rate_hz) or 0)
        period = 1.0 / rate_hz if rate_hz > 0 else 0.0
        start = time.perf_counter()
        reader = self._tiff(spec) if _is_tiff(spec) else self._hdf5(spec)
        try:
            for i, (frame, meta) in enumerate(reader):
                if self._stop.is_set() or (limit is not None and i >= limit):
                    return
                if period:
                    delay = start + i * period - time.perf_counter()
                    if delay > 0 and self._stop.wait(delay):
                        return
                yield frame, meta
        finally:
            reader.close()

    def _hdf5(self, spec: str) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
        path = Path(spec)
        if not path.exists():
            raise SourceError(f"files source: {spec}: no such file")
        with _open_h5(path) as f:
            parts = hdf5_frames(f, self.dataset)
            positions = _positions(f)
            index = 0
            for ds in parts:
                for j in range(ds.shape[0]):
                    meta: dict[str, Any] = {"source_file": spec, "source_index": index}
                    point = {
                        k: float(v[index])
                        for k, v in positions.items()
                        if index < len(v) and np.isfinite(v[index])
                    }
                    if point:
                        meta["positions"] = point
                    yield np.ascontiguousarray(ds[j]), meta
                    index += 1

    def _tiff(self, spec: str) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
        import tifffile

        index = 0
        for path in tiff_files(spec):
            with tifffile.TiffFile(path) as tif:
                for page in tif.pages:
                    yield (
                        np.ascontiguousarray(page.asarray()),
                        {"source_file": str(path), "source_index": index},
                    )
                    index += 1

    def stop(self) -> None:
        self._stop.set()

    def describe(self) -> dict[str, Any]:
        return {
            "detector": "files",
            "files": list(self.files),
            "dataset": self.dataset,
            "rate_hz": self.rate_hz,
        }
