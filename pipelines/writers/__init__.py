"""The writer engine: the ordered stream of a sorter into files, one set per scan.

A writer has a kind, chosen per writer in the pipeline definition:

- ``nexus`` (default): one NeXus/HDF5 file per scan, every result of every frame,
  all metadata, SWMR (:mod:`pipelines.writers.nexus`);
- ``tiff``: chosen image results, one TIFF per frame (:mod:`pipelines.writers.tiff`);
- ``graphs``: PNG plots of 1D profiles and of scalars assembled into maps, at scan
  end (:mod:`pipelines.writers.graphs`);
- ``cube``: chosen results summed into bins of a scan variable (delay, energy...),
  a light file at scan end (:mod:`pipelines.writers.cube`).

Storage faults (a full disk, a folder that cannot be written) never lose data: the
message that failed and every one after it are held, no credit goes back to the
sorter (so the pipeline waits, or drops by the master's policy, counted), the
engine is FAULT with a status naming the path, and the write is retried every
``retry_s`` until it succeeds.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import string
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import zmq

from .. import message as m
from ..consumer import ConsumerEngine
from ..engine import Health

KINDS = ("nexus", "tiff", "graphs", "cube")
COMPRESSIONS = ("none", "gzip", "bslz4")
BASE_FIELDS = {"pipeline", "scan", "stream"}
#: file-name fields each kind may use
PATTERN_FIELDS = {
    "nexus": BASE_FIELDS,
    "cube": BASE_FIELDS,
    "tiff": BASE_FIELDS | {"name", "index"},
    "graphs": BASE_FIELDS | {"name"},
}
DEFAULT_PATTERNS = {
    "nexus": "{pipeline}_scan{scan:05}.h5",
    "tiff": "{pipeline}_scan{scan:05}/{stream}_{name}_{index:05}.tif",
    "graphs": "{pipeline}_scan{scan:05}_{stream}_{name}.png",
    "cube": "{pipeline}_scan{scan:05}_{stream}_cube.h5",
}
#: settings that only mean something for some kinds (the rest are common)
KIND_KEYS = {
    "compression": {"nexus"},
    "save_raw": {"nexus"},
    "swmr": {"nexus"},
    "results": {"tiff", "graphs", "cube"},
    "maps": {"graphs"},
    "every": {"graphs"},
    "by": {"cube"},
    "bins": {"cube"},
}


class SettingError(ValueError):
    """A writer setting that cannot be used; ``key`` is the definition key it concerns."""

    def __init__(self, key: str, detail: str):
        super().__init__(f"{key}: {detail}")
        self.key = key
        self.detail = detail


class StorageError(RuntimeError):
    """Writing to ``path`` failed for a reason outside the data (disk full, permissions).

    Only the text of the cause is kept: its traceback holds objects of the file that
    failed (h5py datasets), which must be let go now, not at some later collection.
    """

    def __init__(self, path: Path | str, cause: BaseException):
        reason = getattr(cause, "strerror", None) or str(cause).splitlines()[0][:200]
        super().__init__(f"cannot write {path}: {reason}")
        self.path = str(path)


SPACE_MARGIN = 1 << 20  # room kept free for metadata when checking space


class StorageFull(OSError):
    """No room for what is about to be written (found before writing anything)."""


def check_space(path: Path, needed: int, size: int | None = None) -> None:
    """Raise :class:`StorageFull` naming ``path`` when ``needed`` more bytes will not fit,
    on the file system or under the process's file-size limit (``size``: the file's
    size as its writer sees it; default: on disk).

    Checked before writing, so that a full disk stops a writer cleanly instead of
    failing inside a library (HDF5) whose state after a failed write is fragile.
    """
    st = os.statvfs(path.parent)
    free = st.f_bavail * st.f_frsize
    if free < needed:
        raise StorageFull(
            errno.ENOSPC,
            f"No space left on device ({free >> 20} MiB free, {needed >> 20} MiB needed)",
            str(path),
        )
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        if size is None:
            size = path.stat().st_size if path.exists() else 0
        if size + needed > limit:
            raise StorageFull(
                errno.EFBIG, f"File too large (size limit {limit >> 20} MiB reached)", str(path)
            )


def check_pattern(pattern: str, kind: str = "nexus") -> str:
    """Validate a file-name pattern such as ``{pipeline}_scan{scan:05}.h5`` for a writer kind."""
    try:
        used = {f for _, f, _, _ in string.Formatter().parse(pattern) if f}
    except ValueError as exc:
        raise ValueError(f"FilePattern {pattern!r} is not a valid pattern: {exc}") from exc
    allowed = PATTERN_FIELDS.get(kind, BASE_FIELDS)
    unknown = used - allowed
    if unknown:
        raise ValueError(f"FilePattern {pattern!r} uses {sorted(unknown)}; allowed: {sorted(allowed)}")
    if "scan" not in used:
        raise ValueError(f"FilePattern {pattern!r} must contain {{scan}} so each scan gets its own file")
    if kind == "tiff" and "index" not in Path(pattern).name:
        raise ValueError(
            f"FilePattern {pattern!r} must contain {{index}} in its file name: one TIFF per frame"
        )
    if kind == "graphs" and "name" not in used:
        raise ValueError(f"FilePattern {pattern!r} must contain {{name}}: one PNG per plot")
    return pattern


def format_name(pattern: str, **values: Any) -> str:
    """``pattern.format(**values)``, tolerating a string scan id in ``{scan:05}``."""
    try:
        return pattern.format(**values)
    except (ValueError, TypeError):
        plain = re.sub(r"\{(\w+)(![rsa])?:[^}]*\}", r"{\1}", pattern)
        return plain.format(**values)


def unique_path(path: Path) -> Path:
    """``path``, or ``stem_2.suffix``, ``stem_3...`` when it exists: never overwrite a file."""
    n = 1
    candidate = path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
    return candidate


def _names(key: str, value: Any) -> list[str]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, Sequence) or not all(isinstance(v, str) and v for v in value):
        raise SettingError(key, f"expected a list of result names, got {value!r}")
    return list(value)


def cube_edges(bins: Any) -> list[float]:
    """Bin edges from a list of increasing numbers or ``{start, stop, count}``."""
    if isinstance(bins, Mapping):
        try:
            start, stop, count = float(bins["start"]), float(bins["stop"]), int(bins["count"])
        except (KeyError, TypeError, ValueError):
            raise SettingError(
                "bins", f"expected {{start, stop, count}} or a list of edges, got {bins!r}"
            ) from None
        if count < 1 or not stop > start:
            raise SettingError("bins", f"expected count >= 1 and stop > start, got {dict(bins)!r}")
        return [start + (stop - start) * i / count for i in range(count + 1)]
    if (
        isinstance(bins, Sequence)
        and not isinstance(bins, str)
        and len(bins) >= 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in bins)
        and all(b > a for a, b in zip(bins, bins[1:], strict=False))
    ):
        return [float(v) for v in bins]
    raise SettingError(
        "bins", f"expected at least 2 increasing edges or {{start, stop, count}}, got {bins!r}"
    )


@dataclass
class WriterSettings:
    """Everything a writer needs to know; validated on creation (errors name the key)."""

    kind: str = "nexus"
    directory: str = "data"
    pattern: str = ""  # empty: the kind's default
    pipeline: str = "tangopipe"
    flush_s: float = 1.0
    compression: str = "none"
    save_raw: bool = True
    swmr: bool = True
    results: list[str] = field(default_factory=list)
    maps: list[str] = field(default_factory=list)
    every: int = 0
    by: str = ""
    bins: Any = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SettingError("kind", f"expected one of {', '.join(KINDS)}, got {self.kind!r}")
        self.pattern = self.pattern or DEFAULT_PATTERNS[self.kind]
        try:
            check_pattern(self.pattern, self.kind)
        except ValueError as exc:
            raise SettingError("pattern", str(exc)) from None
        if self.compression not in COMPRESSIONS:
            raise SettingError(
                "compression", f"expected one of {', '.join(COMPRESSIONS)}, got {self.compression!r}"
            )
        if isinstance(self.flush_s, bool) or not isinstance(self.flush_s, int | float) or self.flush_s < 0:
            raise SettingError("flush_s", f"expected seconds >= 0, got {self.flush_s!r}")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 0:
            raise SettingError(
                "every", f"expected an integer >= 0 (0: no per-frame plots), got {self.every!r}"
            )
        self.results = _names("results", self.results)
        self.maps = _names("maps", self.maps)
        if self.kind == "cube":
            if not isinstance(self.by, str) or not self.by:
                raise SettingError(
                    "by", "a cube needs the scan variable to bin by (a scalar result, motor or metadata key)"
                )
            self.bins = cube_edges(self.bins)
        if self.kind == "tiff" and "{name}" not in self.pattern and len(self.results) != 1:
            raise SettingError(
                "pattern", f"{self.pattern!r} has no {{name}}: select exactly one result or add {{name}}"
            )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], given: Sequence[str] | None = None) -> WriterSettings:
        """Settings from a definition's ``writers.NAME``; ``given`` are the keys the user
        wrote, checked against the kind (``maps`` on a nexus writer is a mistake)."""
        kind = data.get("kind", "nexus")
        for key in given or ():
            kinds = KIND_KEYS.get(key)
            if kinds is not None and kind not in kinds:
                raise SettingError(
                    key, f"only for writers of kind {', '.join(sorted(kinds))}, this one is {kind!r}"
                )
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def scan_directory(self, start: m.Message) -> Path:
        """StartScan's ``scan_dir`` when given, else the configured folder."""
        return Path(start.meta.get("scan_dir") or self.directory)

    def name_fields(self, start: m.Message) -> dict[str, Any]:
        return {"pipeline": self.pipeline, "scan": start.scan, "stream": start.stream}

    def scan_file(self, start: m.Message, unique: bool = True) -> Path:
        """The (not yet existing) file of a one-file kind: StartScan's ``scan_file`` or the
        pattern; ``unique=False``: the name before a ``_2`` is added (to resume a file)."""
        name = start.meta.get("scan_file") if self.kind == "nexus" else None
        if isinstance(name, str) and name:
            name = format_name(name, **self.name_fields(start))
            if not Path(name).suffix:
                name += ".h5"
        else:
            name = format_name(self.pattern, **self.name_fields(start))
        path = self.scan_directory(start) / name
        return unique_path(path) if unique else path


class ScanWriter(Protocol):
    """What the engine needs of a scan's writer, whatever its kind."""

    path: Path
    written: int

    def write(self, msg: m.Message) -> None: ...

    def flush(self, every_s: float = 1.0, force: bool = False) -> bool: ...

    def close(self, end: m.Message | None = None) -> None: ...


def open_scan_writer(settings: WriterSettings, start: m.Message) -> ScanWriter:
    """Make the writer of one scan for ``settings.kind``.

    A scan start marked ``resumed`` (a writer restarted during the scan) carries on in
    the scan's file when it is there and belongs to that scan (NeXus)."""
    if settings.kind == "nexus":
        from .nexus import NexusScanFile

        path = settings.scan_file(start, unique=False)
        if start.body.get("resumed") and path.exists():
            try:
                return NexusScanFile.resume(
                    path, start, swmr=settings.swmr, compression=settings.compression, save_raw=settings.save_raw
                )
            except FileExistsError:
                pass  # another scan's file: this scan gets a new one

        return NexusScanFile(
            settings.scan_file(start),
            start,
            settings.pipeline,
            swmr=settings.swmr,
            compression=settings.compression,
            save_raw=settings.save_raw,
        )
    if settings.kind == "tiff":
        from .tiff import TiffScanWriter

        return TiffScanWriter(settings, start)
    if settings.kind == "graphs":
        from .graphs import GraphScanWriter

        return GraphScanWriter(settings, start)
    from .cube import CubeScanWriter

    return CubeScanWriter(settings, start)


def _ranges(indices: Sequence[int]) -> str:
    """``[3, 4, 5, 9]`` -> ``"3-5, 9"``: indices as a short text for logs and Status."""
    parts: list[list[int]] = []
    for index in indices:
        if parts and parts[-1][1] == index - 1:
            parts[-1][1] = index
        else:
            parts.append([index, index])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in parts)


class WriterEngine(ConsumerEngine):
    """Writes each scan of the stream with the writer of ``settings.kind``.

    ``WriterEngine(directory="data", kind="tiff", results=["binned"])`` or
    ``WriterEngine(settings=WriterSettings(...))``.
    """

    def __init__(
        self,
        *,
        name: str = "writer",
        settings: WriterSettings | None = None,
        credit: int = 16,
        retry_s: float = 5.0,
        context: zmq.Context | None = None,
        **options: Any,
    ):
        super().__init__(name, credit=credit, context=context)
        self.settings = settings or WriterSettings(**options)
        self.retry_s = retry_s
        self.file: ScanWriter | None = None
        self.last_file = ""
        self.frames_written = 0
        self.gaps_written = 0
        self.lost_rows = 0  # rows lost with a writer killed before flushing them
        self.skipped: set[str] = set()
        self._held: deque[m.Message] = deque()
        self.fault = ""  # the storage fault being retried ("" when none)
        self._retry_at = 0.0
        self._retrying = False
        self.storage_faults = 0

    # settings kept as attributes for callers of the earlier engine
    @property
    def directory(self) -> Path:
        return Path(self.settings.directory)

    @property
    def pattern(self) -> str:
        return self.settings.pattern

    @property
    def pipeline(self) -> str:
        return self.settings.pipeline

    @property
    def flush_s(self) -> float:
        return self.settings.flush_s

    def path_for(self, start: m.Message) -> Path:
        return self.settings.scan_file(start)

    # -- the ordered stream --------------------------------------------------------------
    def _dispatch(self, msg: m.Message) -> None:
        """Every message is queued and written in order; a storage fault holds the queue."""
        if msg.kind == m.SCAN_START:
            self.current_scan = msg.scan
        elif msg.kind == m.RESULT:
            self.stats.count_in(msg.nbytes())
            acquired = msg.times.get("acquired")
            if acquired:
                self.stats.latency.add(time.time() - acquired)
        self._held.append(msg)
        if not self.fault:
            self._drain()

    def blocked(self) -> bool:
        """No credit while anything is held: what could not be written is not asked for again."""
        return bool(self._held) or bool(self.fault)

    def _drain(self) -> None:
        while self._held:
            msg = self._held[0]
            try:
                self.handle(msg)
            except StorageError as exc:
                self._storage_fault(exc)
                return
            except Exception as exc:  # the data itself is wrong: say so, go on with the next
                self.stats.errors += 1
                self.log.exception("handling %s %s/%s failed", msg.kind, msg.scan, msg.index)
                self.set_health(
                    Health.FAULT, f"{self.name} failed on scan {msg.scan} index {msg.index}: {exc}"
                )
            self._held.popleft()
            if msg.kind == m.SCAN_END:
                self.scans_done += 1
            if self.file is not None and not self._flush():
                return

    def _flush(self, force: bool = False) -> bool:
        assert self.file is not None
        try:
            self._guarded(self.file.path, lambda: self.file.flush(self.settings.flush_s, force))
        except StorageError as exc:
            self._storage_fault(exc)
            return False
        return True

    def _mark_broken(self) -> None:
        if self.file is not None and hasattr(self.file, "broken"):
            self.file.broken = True  # type: ignore[attr-defined]

    def _guarded(self, path: Path | str, action: Any) -> Any:
        """Run a file operation; failures of the storage become :class:`StorageError`."""
        try:
            return action()
        except StorageError:
            raise
        except StorageFull as exc:  # found before writing: the file is as it was
            error = StorageError(path, exc)
        except (OSError, RuntimeError) as exc:
            self._mark_broken()
            error = StorageError(path, exc)
            exc.__traceback__ = None  # free the failed call's objects while the file is as it failed
        raise error

    def handle(self, msg: m.Message) -> None:
        if msg.kind == m.SCAN_START:
            self.stats.reset_scan()
            if self.file is not None:
                self.log.warning(
                    "scan %s started before scan %s ended; closing it", msg.scan, self.current_scan
                )
                file = self.file
                self._guarded(file.path, file.close)
                self.file = None
            path = self.settings.scan_directory(msg)
            self.file = self._guarded(path, lambda: open_scan_writer(self.settings, msg))
            self.last_file = str(self.file.path)
            if getattr(self.file, "resumed", False):
                self.log.warning("scan %s: carrying on in %s (%d rows there)", msg.scan, self.last_file, self.file.rows)  # type: ignore[attr-defined]
            self.emit("file", self.last_file)
            self.set_health(Health.RUNNING, f"Scan {msg.scan}: writing {self.last_file}")
        elif self.file is None or msg.scan != getattr(self.file, "scan", msg.scan):
            self.stats.errors += 1
            self.log.error("%s for scan %s without an open file; not written", msg.kind, msg.scan)
        elif msg.kind in (m.RESULT, m.GAP):
            file = self.file
            if getattr(file, "resumed", False) and msg.index < file.rows:  # type: ignore[attr-defined]
                self.duplicates += 1  # sent again after a restart, already in the file
                return
            lost = len(getattr(file, "lost_rows", ()))
            self._guarded(file.path, lambda: file.write(msg))
            lost_now = getattr(file, "lost_rows", [])[lost:]
            if lost_now:
                self.lost_rows += len(lost_now)
                self.gaps_written += len(lost_now)
                self.log.error("scan %s: rows %s were lost with the writer that was killed", msg.scan, _ranges(lost_now))
            if msg.kind == m.RESULT:
                self.frames_written += 1
                self.stats.count_out()
            else:
                self.gaps_written += 1
            self._report_skipped()
        elif msg.kind == m.SCAN_END:
            file = self.file
            self._guarded(file.path, lambda: file.close(msg))
            self.file = None
            if self.health is not Health.FAULT:
                self.set_health(Health.ON, f"Scan {msg.scan}: {file.written} frames in {self.last_file}")

    def _report_skipped(self) -> None:
        skipped = getattr(self.file, "skipped", None)
        if skipped and not skipped <= self.skipped:
            self.skipped |= skipped
            names = ", ".join(sorted(self.skipped)[:8])
            self.set_health(
                Health.ALARM,
                f"Scan {self.current_scan}: results {names} first came after the file went SWMR and are not in "
                f"{self.last_file}; make steps return them for every frame, or name them stream/result",
            )

    # -- storage faults ------------------------------------------------------------------
    def _storage_fault(self, exc: StorageError) -> None:
        first = not self.fault and not self._retrying
        self.fault = str(exc)
        self.storage_faults += first
        self.stats.errors += first
        self._retry_at = time.monotonic() + self.retry_s
        self.set_health(
            Health.FAULT,
            f"Cannot write scan {self.current_scan}: {exc}. Holding {len(self._held)} messages, no credit "
            f"upstream (the pipeline waits); free disk space or fix the folder. Retrying every {self.retry_s:g} s",
        )
        if first:
            self.log.error("%s", exc)

    def retry(self) -> bool:
        """Try again now to write what is held; True when nothing is held any more."""
        if not self.fault:
            return True
        self._retry_at = time.monotonic() + self.retry_s
        file = self.file
        if file is not None and getattr(file, "broken", False):
            try:
                self._guarded(file.path, file.recover)  # type: ignore[attr-defined]
            except StorageError as exc:
                self._storage_fault(exc)
                return False
        fault, self.fault = self.fault, ""
        self._retrying = True
        try:
            self._drain()
        finally:
            self._retrying = False
        if self.fault:
            return False
        self.log.info("storage works again after: %s", fault)
        if self.health is Health.FAULT:
            if self.file is not None:
                self.set_health(Health.RUNNING, f"Scan {self.current_scan}: writing {self.last_file}")
            else:
                self.set_health(Health.ON, f"Storage works again; last file {self.last_file}")
        return True

    def idle(self) -> None:
        if self.fault:
            if time.monotonic() >= self._retry_at:
                self.retry()
        elif self.file is not None:
            self._flush()

    def teardown(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except Exception:
                self.log.exception("closing %s failed", self.file.path)
            self.file = None
        if self.settings.kind == "graphs":
            from .graphs import PLOTS

            PLOTS.close()
        super().teardown()

    def counters(self) -> dict[str, Any]:
        c = super().counters()
        c.update(
            FramesWritten=self.frames_written,
            GapsWritten=self.gaps_written,
            LostRows=self.lost_rows,
            QueueDepth=len(self._held),
            HeldMessages=len(self._held),
            StorageFaults=self.storage_faults,
            SkippedResults=len(self.skipped),
        )
        return c
