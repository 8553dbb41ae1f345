"""TIFF files: chosen image results, one file per frame, named from scan and index.

The pattern's folder part (``{pipeline}_scan{scan:05}/``) is the scan's folder, made
at scan start (``_2``, ``_3``... when it exists: never overwrite); its file part
names each image (``{stream}_{name}_{index:05}.tif``). Each file is a plain
grey-scale TIFF that any image program opens, with the scan, index, stream, result
name and processing version as JSON in its ImageDescription (``tifffile`` reads it
back as ``TiffFile.shaped_metadata``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import message as m

if TYPE_CHECKING:
    from . import WriterSettings


class TiffScanWriter:
    """Writes the selected 2D results of each frame of one scan as TIFF files."""

    def __init__(self, settings: WriterSettings, start: m.Message):
        from . import format_name, unique_path

        self.settings = settings
        self.scan = start.scan
        self.stream = start.stream
        self.fields = settings.name_fields(start)
        self.selected = set(settings.results)
        self.written = 0
        self.files = 0
        self._partial: tuple[int, set[str]] = (-1, set())  # names of a frame written before a failure
        folder, _, self.file_pattern = settings.pattern.rpartition("/")
        base = settings.scan_directory(start)
        if folder:
            self.path = unique_path(base / format_name(folder, **self.fields))
            self.path.mkdir(parents=True)
        else:
            self.path = base
            self.path.mkdir(parents=True, exist_ok=True)

    def images(self, msg: m.Message) -> dict[str, np.ndarray]:
        """The results of ``msg`` to write: the selected ones, or every 2D array."""
        if self.selected:
            return {k: v for k, v in msg.arrays.items() if k in self.selected and v.ndim in (2, 3)}
        return {k: v for k, v in msg.arrays.items() if v.ndim == 2}

    def file_for(self, name: str, index: int) -> Path:
        from . import format_name, unique_path

        stem = format_name(self.file_pattern, **self.fields, name=name.replace("/", "_"), index=index)
        return unique_path(self.path / stem)

    def write(self, msg: m.Message) -> None:
        import tifffile

        if msg.kind != m.RESULT:
            return
        assert msg.index is not None
        index, done = self._partial
        if index != msg.index:
            self._partial = (msg.index, done := set())
        for name, image in self.images(msg).items():
            if name in done:
                continue
            path = self.file_for(name, msg.index)
            meta = {
                "scan": self.scan,
                "index": msg.index,
                "stream": self.stream,
                "name": name,
                "processing_version": msg.version,
            }
            try:
                tifffile.imwrite(
                    path, np.ascontiguousarray(image), mode="x", metadata=meta, photometric="minisblack"
                )
            except FileExistsError:
                raise
            except BaseException:
                path.unlink(missing_ok=True)  # made by this call ('x'): never a half-written image left
                raise
            os.chmod(path, 0o644)
            done.add(name)
            self.files += 1
        self.written += 1

    def flush(self, every_s: float = 1.0, force: bool = False) -> bool:
        return False  # every file is complete when write() returns

    def close(self, end: m.Message | None = None) -> None:
        """Nothing to finish: each frame's files were complete when written."""
