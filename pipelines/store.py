"""The sink's in-memory store: results per (scan, stream), bounded in bytes.

When the store is over its memory limit the least recently touched dataset is
evicted (and counted). The dataset being written is never the one evicted: when
it alone is over the limit (a long scan of images), its oldest results let go of
their arrays (``ThinnedResults``), then, if still over, its oldest results go
(``TrimmedResults``); they are in the files, where queries find them. So memory
stays under the limit whatever the scan's length.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from . import message as m
from .steps.maps import MapAssembler

_SCALAR_BYTES = 64  # rough cost of one stored scalar


@dataclass
class Dataset:
    scan: int | str
    stream: str
    records: dict[int, m.Message] = field(default_factory=dict)
    gaps: set[int] = field(default_factory=set)
    nbytes: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    arrival: deque = field(default_factory=deque)  # indices in the order they came (to trim)
    heavy: deque = field(default_factory=deque)  # indices whose arrays are still held (to thin)

    def describe(self) -> dict[str, Any]:
        return {
            "scan": self.scan,
            "stream": self.stream,
            "frames": len(self.records),
            "gaps": len(self.gaps),
            "bytes": self.nbytes,
            "last_index": max(self.records, default=-1),
        }


def message_cost(msg: m.Message) -> int:
    return msg.nbytes() + _SCALAR_BYTES * (len(msg.scalars) + 1)


class SinkStore:
    """Datasets keyed by (scan, stream) in least-recently-touched order."""

    def __init__(self, memory_limit: int = 1 << 30):
        if memory_limit <= 0:
            raise ValueError(f"MemoryLimit must be > 0 bytes, got {memory_limit}")
        self.memory_limit = memory_limit
        self.datasets: OrderedDict[tuple, Dataset] = OrderedDict()
        self.latest: dict[str, m.Message] = {}
        self.nbytes = 0
        self.evicted: list[tuple] = []
        self.evictions = 0
        self.thinned = 0  # results whose arrays were let go (the dataset being written was over the limit)
        self.trimmed = 0  # results let go altogether, for the same reason
        self.places: OrderedDict[Any, dict[str, Any]] = OrderedDict()

    def _touch(self, scan: int | str, stream: str) -> Dataset:
        key = (scan, stream)
        ds = self.datasets.get(key)
        if ds is None:
            ds = self.datasets[key] = Dataset(scan, stream)
        self.datasets.move_to_end(key)
        return ds

    def start_scan(self, msg: m.Message) -> None:
        self._touch(msg.scan, msg.stream).meta = dict(msg.meta)
        # where the scan's files are, remembered beyond eviction (for answers from files)
        self.places[msg.scan] = {k: msg.meta[k] for k in ("scan_dir", "scan_file") if k in msg.meta}
        self.places.move_to_end(msg.scan)
        while len(self.places) > 10_000:
            self.places.popitem(last=False)

    def add(self, msg: m.Message) -> None:
        """Store a result (or a gap) and evict old datasets if over the limit."""
        assert msg.scan is not None and msg.index is not None
        ds = self._touch(msg.scan, msg.stream)
        if msg.kind == m.GAP:
            ds.gaps.add(msg.index)
            return
        if msg.arrays:  # own the bytes: a view would pin the whole received buffer
            msg.arrays = {k: np.array(v) for k, v in msg.arrays.items()}
        cost = message_cost(msg)
        old = ds.records.get(msg.index)
        if old is not None:
            cost -= message_cost(old)
        if old is None:
            ds.arrival.append(msg.index)
        if msg.arrays:
            ds.heavy.append(msg.index)
        ds.records[msg.index] = msg
        ds.nbytes += cost
        self.nbytes += cost
        self.latest[msg.stream] = msg
        self._evict(keep=(msg.scan, msg.stream))

    def _evict(self, keep: tuple) -> None:
        for key in list(self.datasets):
            if self.nbytes <= self.memory_limit:
                return
            if key == keep:
                continue
            ds = self.datasets.pop(key)
            self.nbytes -= ds.nbytes
            self.evictions += 1
            self.evicted.append(key)
        if self.nbytes > self.memory_limit and keep in self.datasets:
            self._thin(self.datasets[keep])

    def _thin(self, ds: Dataset) -> None:
        """The dataset being written is alone over the limit: its oldest results let go of
        their arrays, then (scalars only left) the oldest results go; see the module docstring."""
        while self.nbytes > self.memory_limit and len(ds.heavy) > 1:  # the newest keeps its arrays
            index = ds.heavy.popleft()
            msg = ds.records.get(index)
            if msg is None or not msg.arrays:
                continue
            light = m.Message(msg.kind, scan=msg.scan, index=msg.index, stream=msg.stream, scalars=msg.scalars,
                              meta=msg.meta, times=msg.times, version=msg.version, body={"thinned": True})  # fmt: skip
            saved = message_cost(msg) - message_cost(light)
            ds.records[index] = light
            ds.nbytes -= saved
            self.nbytes -= saved
            self.thinned += 1
        while self.nbytes > self.memory_limit and len(ds.arrival) > 1:
            msg = ds.records.pop(ds.arrival.popleft(), None)
            if msg is not None:
                cost = message_cost(msg)
                ds.nbytes -= cost
                self.nbytes -= cost
                self.trimmed += 1

    def get(self, scan: int | str, stream: str, index: int) -> m.Message | None:
        ds = self.datasets.get((scan, stream))
        if ds is None:
            return None
        self.datasets.move_to_end((scan, stream))
        return ds.records.get(index)

    def describe(self) -> list[dict[str, Any]]:
        return [ds.describe() for ds in self.datasets.values()]


def scan_grid(meta: dict[str, Any]) -> tuple[tuple[int, int], bool]:
    """The grid of a scan from StartScan's metadata: ``scan_shape`` [slow, fast] and ``snake``."""
    shape = meta.get("scan_shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(n, int) and n > 0 for n in shape)):
        raise KeyError(f"scan has no scan_shape [slow, fast] in its StartScan metadata (got {shape!r})")
    return (shape[0], shape[1]), bool(meta.get("snake", False))


class ScanFiles(Protocol):
    def read(self, scan: Any, stream: str, index: int, meta: dict[str, Any] | None = None) -> m.Message: ...


class StoreQueries:
    """What one can ask a sink store: the same answers for Tango commands and the query port."""

    def __init__(self, store: SinkStore, files: ScanFiles | None = None):
        self.store = store
        self.files = files  # answers for what is not in memory (pipelines.files.ScanFileIndex)

    def dataset(self, scan: Any, stream: str) -> Dataset:
        ds = self.store.datasets.get((scan, stream))
        if ds is None:
            known = ", ".join(f"{s}/{st}" for s, st in list(self.store.datasets)[:20]) or "none"
            raise KeyError(f"no dataset for scan {scan!r} stream {stream!r} in memory (held: {known})")
        self.store.datasets.move_to_end((scan, stream))
        return ds

    def get(self, scan: Any, stream: str, index: int) -> m.Message:
        """One result from memory, or from the scan's file when its dataset was evicted."""
        if self.files is not None and (scan, stream) not in self.store.datasets:
            try:
                return self.files.read(scan, stream, index, self.store.places.get(scan))
            except KeyError as exc:
                raise KeyError(f"no dataset for scan {scan!r} stream {stream!r} in memory; {exc.args[0]}") from None
        ds = self.dataset(scan, stream)
        msg = ds.records.get(index)
        if msg is not None and not msg.body.get("thinned"):
            return msg
        if index not in ds.gaps and self.files is not None:  # let go of under the memory limit: the file has it
            try:
                return self.files.read(scan, stream, index, self.store.places.get(scan))
            except KeyError:
                pass
        if msg is not None:
            raise KeyError(f"scan {scan!r} stream {stream!r} index {index}: its arrays were let go (MemoryLimit); "
                           "read them from the scan's file")  # fmt: skip
        what = "a gap (no result)" if index in ds.gaps else "not received (or let go under MemoryLimit)"
        raise KeyError(f"scan {scan!r} stream {stream!r} index {index}: {what}")

    def slice(self, scan: Any, stream: str, name: str, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Result ``name`` for indices in [start, stop) that have it: (indices, stacked values)."""
        ds = self.dataset(scan, stream)
        indices = sorted(i for i in ds.records if i >= start and (stop is None or i < stop))
        values = []
        kept = []
        for i in indices:
            rec = ds.records[i]
            if name in rec.arrays:
                values.append(rec.arrays[name])
            elif name in rec.scalars:
                values.append(rec.scalars[name])
            else:
                continue
            kept.append(i)
        if not kept:
            raise KeyError(f"result {name!r} not found in scan {scan!r} stream {stream!r} [{start}:{stop}]")
        return np.asarray(kept, dtype=np.int64), np.asarray(values)

    def map(self, scan: Any, stream: str, name: str) -> np.ndarray:
        """A scalar result assembled on the scan grid (NaN where not measured)."""
        ds = self.dataset(scan, stream)
        shape, snake = scan_grid(ds.meta)
        assembler = MapAssembler(shape, snake)
        for i, rec in ds.records.items():
            value = rec.scalars.get(name)
            if isinstance(value, int | float) and i < shape[0] * shape[1]:
                assembler.add(i, value)
        return assembler.map
