"""Scan files found again and read back: random access to results that left memory.

The sink keeps recent results in memory and evicts old datasets; the NeXus writer
of the same worker group has them on disk. :class:`ScanFileIndex` finds a scan's
file the way the writer named it (the same folder and pattern, which the pipeline
definition gives both; StartScan's ``scan_dir``/``scan_file`` when the scan had
them; the newest of ``name``, ``name_2``... when a scan id was used twice) and
:func:`read_result` rebuilds the result of one frame as the message the sink held:
the same arrays (dtype and shape), scalars (int, float, bool, str), derived-stream
results (``"hits/peaks"``) and processing version. Files are opened in SWMR mode,
so a scan still being written can be read.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import message as m

_ROW_KEYS = ("index", "valid", "processing_version")


def open_h5(path: str | os.PathLike) -> Any:
    """Open an HDF5 file for reading, while it is written (SWMR) or not; bslz4 readable."""
    import h5py

    try:
        import hdf5plugin  # noqa: F401  (registers the bitshuffle-LZ4 filter)
    except ImportError:
        pass
    try:
        return h5py.File(path, "r", libver="latest", swmr=True)
    except OSError:
        return h5py.File(path, "r")


def _scalar(ds: Any, i: int) -> Any:
    import h5py

    if h5py.check_string_dtype(ds.dtype) is not None:
        return ds.asstr()[i]
    return ds[i].item()


def _main_group(entry: Any, stream: str) -> Any:
    group = entry.get(stream)
    if group is None:
        default = entry.attrs.get("default")
        group = entry.get(default) if isinstance(default, str) else None
    if group is None or "valid" not in group:
        raise KeyError(f"no stream {stream!r} in {entry.file.filename}")
    return group


def _ragged(group: Any, row: int, stream: str, out: m.Message) -> None:
    """Add the entry of ``row`` of a derived stream's ragged group to ``out``."""
    index = group["index"][()]
    hits = np.flatnonzero(index == row)
    if not hits.size:
        return
    pos = int(hits[0])
    for name, ds in group.items():
        if name == "index" or name.endswith("_count") and name[: -len("_count")] in group:
            continue
        counts = group.get(f"{name}_count")
        if counts is not None:
            counts = counts[: len(index)]
            start = int(counts[:pos].sum())
            out.arrays[f"{stream}/{name}"] = ds[start : start + int(counts[pos])]
        elif ds.shape[0] == len(index):
            out.scalars[f"{stream}/{name}"] = _scalar(ds, pos)


def read_result(path: str | os.PathLike, stream: str, index: int, scan: Any = None) -> m.Message:
    """The result of frame ``index`` of ``stream`` in a tangopipe NeXus file; KeyError if none."""
    import h5py

    path = Path(path)
    with open_h5(path) as f:
        entry = f["entry"]
        group = _main_group(entry, stream)
        valid = group["valid"]
        if not 0 <= index < valid.shape[0]:
            raise KeyError(
                f"scan {scan!r} stream {stream!r} index {index}: not in {path} ({valid.shape[0]} rows)"
            )
        if not valid[index]:
            raise KeyError(f"scan {scan!r} stream {stream!r} index {index}: a gap (no result) in {path}")
        out = m.Message(m.RESULT, scan=scan, index=index, stream=stream, meta={"file": str(path)})
        out.version = int(group["processing_version"][index])
        for name, ds in group.items():
            if name in _ROW_KEYS or not hasattr(ds, "shape") or ds.shape[:1] != valid.shape[:1]:
                continue
            if ds.ndim == 1:
                out.scalars[name] = _scalar(ds, index)
            else:
                out.arrays[name] = ds[index]
        derived = set()
        for name in entry:
            if name == group.name.rsplit("/", 1)[-1]:
                continue
            try:
                member = entry.get(name)  # a derived stream's companion file, through its link
            except (KeyError, OSError):
                continue
            if (
                isinstance(member, h5py.Group)
                and member.attrs.get("NX_class") == "NXdata"
                and ("index" in member and "valid" not in member)
            ):
                _ragged(member, index, name, out)
                derived.add(name)
        for companion in path.parent.glob(f"{glob_escape(path.stem)}-*{path.suffix}"):
            name = companion.stem[len(path.stem) + 1 :]
            if name in derived:
                continue
            try:
                with open_h5(companion) as c:
                    member = c.get(f"entry/{name}")
                    if member is not None and "index" in member:
                        _ragged(member, index, name, out)
            except OSError:
                continue  # being created: its first entry is not flushed yet
    return out


def glob_escape(text: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", text)


class ScanFileIndex:
    """Where the NeXus writer put a scan, and what it holds."""

    def __init__(
        self,
        directory: str | os.PathLike,
        pattern: str = "{pipeline}_scan{scan:05}.h5",
        pipeline: str = "tangopipe",
    ):
        from .writers import check_pattern

        self.directory = Path(directory)
        self.pattern = check_pattern(pattern or "{pipeline}_scan{scan:05}.h5")
        self.pipeline = pipeline

    def expected(self, scan: Any, stream: str, meta: Mapping[str, Any] | None = None) -> Path:
        """The name the writer gives a new file of this scan (before any ``_2`` suffix)."""
        from .writers import format_name

        meta = meta or {}
        fields = {"pipeline": self.pipeline, "scan": scan, "stream": stream}
        directory = Path(meta.get("scan_dir") or self.directory)
        name = meta.get("scan_file")
        if isinstance(name, str) and name:
            name = format_name(name, **fields)
            if not Path(name).suffix:
                name += ".h5"
        else:
            name = format_name(self.pattern, **fields)
        return directory / name

    def find(self, scan: Any, stream: str, meta: Mapping[str, Any] | None = None) -> Path | None:
        """The newest existing file of the scan (a repeated scan id gets ``_2``, ``_3``...)."""
        base = self.expected(scan, stream, meta)
        suffixed = re.compile(re.escape(base.stem) + r"_\d+" + re.escape(base.suffix) + "$")
        found = [base] if base.exists() else []
        if base.parent.is_dir():
            found += [
                p
                for p in base.parent.glob(f"{glob_escape(base.stem)}_*{base.suffix}")
                if suffixed.match(p.name)
            ]
        return max(found, key=lambda p: p.stat().st_mtime_ns, default=None)

    def read(self, scan: Any, stream: str, index: int, meta: Mapping[str, Any] | None = None) -> m.Message:
        """The result of frame ``index`` read from the scan's file; KeyError saying why not."""
        path = self.find(scan, stream, meta)
        if path is None:
            raise KeyError(f"scan {scan!r} stream {stream!r}: no file {self.expected(scan, stream, meta)}")
        try:
            return read_result(path, stream, index, scan)
        except OSError as exc:
            raise KeyError(f"scan {scan!r} stream {stream!r}: {path} cannot be read now ({exc})") from None
