"""The writer engine: the ordered stream of a sorter into files, one per scan."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import zmq

from .. import message as m
from ..consumer import ConsumerEngine
from ..engine import Health
from .nexus import NexusScanFile

PATTERN_FIELDS = {"pipeline", "scan", "stream"}


def check_pattern(pattern: str) -> str:
    """Validate a file-name pattern such as ``{pipeline}_scan{scan:05}.h5``."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(pattern) if f}
    except ValueError as exc:
        raise ValueError(f"FilePattern {pattern!r} is not a valid pattern: {exc}") from exc
    unknown = fields - PATTERN_FIELDS
    if unknown:
        raise ValueError(f"FilePattern {pattern!r} uses {sorted(unknown)}; allowed: {sorted(PATTERN_FIELDS)}")
    if "scan" not in fields:
        raise ValueError(f"FilePattern {pattern!r} must contain {{scan}} so each scan gets its own file")
    return pattern


class WriterEngine(ConsumerEngine):
    """Writes each scan of the stream to ``directory / pattern``."""

    def __init__(
        self,
        *,
        name: str = "writer",
        directory: str = "data",
        pattern: str = "{pipeline}_scan{scan:05}.h5",
        pipeline: str = "tangopipe",
        flush_s: float = 1.0,
        credit: int = 16,
        context: zmq.Context | None = None,
    ):
        super().__init__(name, credit=credit, context=context)
        self.directory = Path(directory)
        self.pattern = check_pattern(pattern)
        self.pipeline = pipeline
        self.flush_s = flush_s
        self.file: NexusScanFile | None = None
        self.last_file = ""
        self.frames_written = 0
        self.gaps_written = 0

    def path_for(self, start: m.Message) -> Path:
        scan = start.scan
        fields: dict[str, Any] = {"pipeline": self.pipeline, "scan": scan, "stream": start.stream}
        try:
            name = self.pattern.format(**fields)
        except (ValueError, TypeError):  # e.g. {scan:05} with a string scan id
            name = self.pattern.replace(":05", "").format(**fields)
        directory = Path(start.meta.get("scan_dir") or self.directory)
        path = directory / name
        n = 1
        while path.exists():  # never overwrite: a repeated scan id gets a suffix
            n += 1
            path = directory / f"{Path(name).stem}_{n}{Path(name).suffix}"
        if n > 1:
            self.log.warning("%s exists; writing scan %s to %s", directory / name, scan, path.name)
        return path

    def handle(self, msg: m.Message) -> None:
        if msg.kind == m.SCAN_START:
            if self.file is not None:
                self.log.warning("scan %s started before scan %s ended; closing it", msg.scan, self.file.scan)
                self.file.close()
            path = self.path_for(msg)
            self.file = NexusScanFile(path, msg, self.pipeline)
            self.last_file = str(path)
            self.emit("file", self.last_file)
        elif self.file is None or msg.scan != self.file.scan:
            self.stats.errors += 1
            self.log.error("%s for scan %s without an open file; not written", msg.kind, msg.scan)
        elif msg.kind in (m.RESULT, m.GAP):
            self.file.write(msg)
            if msg.kind == m.RESULT:
                self.frames_written += 1
                self.stats.count_out()
            else:
                self.gaps_written += 1
        elif msg.kind == m.SCAN_END:
            self.file.close(msg)
            self.set_health(Health.ON, f"Scan {msg.scan}: {self.file.written} frames in {self.last_file}")
            self.file = None

    def idle(self) -> None:
        if self.file is not None:
            self.file.flush(self.flush_s)

    def teardown(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        super().teardown()

    def counters(self) -> dict[str, Any]:
        c = super().counters()
        c.update(FramesWritten=self.frames_written, GapsWritten=self.gaps_written)
        return c
