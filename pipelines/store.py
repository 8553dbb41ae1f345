"""The sink's in-memory store: results per (scan, stream), bounded in bytes.

When the store is over its memory limit the least recently touched dataset is
evicted (and counted); the dataset being written is never the one evicted, so
memory stays under the limit plus one dataset.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import message as m

_SCALAR_BYTES = 64  # rough cost of one stored scalar


@dataclass
class Dataset:
    scan: int | str
    stream: str
    records: dict[int, m.Message] = field(default_factory=dict)
    gaps: set[int] = field(default_factory=set)
    nbytes: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

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

    def _touch(self, scan: int | str, stream: str) -> Dataset:
        key = (scan, stream)
        ds = self.datasets.get(key)
        if ds is None:
            ds = self.datasets[key] = Dataset(scan, stream)
        self.datasets.move_to_end(key)
        return ds

    def start_scan(self, msg: m.Message) -> None:
        self._touch(msg.scan, msg.stream).meta = dict(msg.meta)

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

    def get(self, scan: int | str, stream: str, index: int) -> m.Message | None:
        ds = self.datasets.get((scan, stream))
        if ds is None:
            return None
        self.datasets.move_to_end((scan, stream))
        return ds.records.get(index)

    def describe(self) -> list[dict[str, Any]]:
        return [ds.describe() for ds in self.datasets.values()]
