"""Chaining: another pipeline's ordered results as this pipeline's frames.

The source is a consumer of an upstream sorter (a credit link, like a sink), so
it takes every result in order and slows the upstream pipeline rather than lose
anything when this one is busy. Each upstream scan becomes a scan here: the
master follows the upstream's scan starts and ends by itself
(``drives_scans``). Frames are the upstream result named ``result`` (for a
derived stream, e.g. ``hits/frame``: only frames that have it, so a hits-only
stream feeds a second pipeline).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import zmq

from .. import message as m
from ..consumer import ConsumerEngine

_END = object()


class _UpstreamReader(ConsumerEngine):
    """Takes the upstream's ordered stream into a queue; withholds credit while it is full."""

    def __init__(self, name: str, limit: int, credit: int, context: zmq.Context | None):
        super().__init__(name, credit=credit, context=context)
        self.queue: queue.Queue[m.Message] = queue.Queue()
        self.limit = limit

    def blocked(self) -> bool:
        return self.queue.qsize() >= self.limit

    def handle(self, msg: m.Message) -> None:
        if msg.arrays:  # own the bytes: the message may wait in the queue a while
            msg.arrays = {k: np.array(v) for k, v in msg.arrays.items()}
        self.queue.put(msg)


class PipelineStreamSource:
    """Frames from the ordered output of another pipeline's sorter."""

    drives_scans = True

    def __init__(
        self,
        *,
        upstream: str = "",
        endpoint: str = "",
        result: str = "image",
        queue_size: int = 16,
        credit: int = 4,
    ):
        if not (upstream or endpoint):
            raise ValueError("a chained source needs 'upstream' (a sorter device) or 'endpoint'")
        if not result:
            raise ValueError("result must name the upstream result to use as the frame, e.g. 'hits/frame'")
        self.upstream = upstream
        self.result = result
        self._reader = _UpstreamReader(f"chain:{upstream or endpoint}", queue_size, credit, None)
        self._stop = threading.Event()
        self._pending_start: m.Message | None = None
        self.skipped = 0  # upstream results without the named result (e.g. frames without hits)
        self.gaps = 0
        self._described: dict[str, Any] = {}
        if endpoint:
            self.connect(endpoint)

    def connect(self, endpoint: str) -> None:
        """Take the stream from this sorter endpoint (found by the master device from
        ``upstream``); calling it again with the same endpoint changes nothing."""
        self._reader.start()
        self._reader.connect(endpoint)

    def _next(self, timeout: float) -> m.Message | None:
        try:
            return self._reader.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def wait_scan(self, timeout: float) -> dict[str, Any] | None:
        """The next upstream scan's metadata once its start arrived (None on timeout)."""
        if self._pending_start is None:
            msg = self._next(timeout)
            while msg is not None and msg.kind != m.SCAN_START:  # leftovers of a scan we did not follow
                msg = self._next(0)
            self._pending_start = msg
        if self._pending_start is None:
            return None
        meta = dict(self._pending_start.meta)
        meta.pop("processing", None)
        meta["upstream_scan"] = self._pending_start.scan
        meta.setdefault("scan_id", self._pending_start.scan)
        self._described = {"upstream": self.upstream, "result": self.result, "upstream_source": meta.pop("source", {})}
        return meta

    def frames(self, scan: Mapping[str, Any]) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
        self._stop.clear()
        self._pending_start = None
        while not self._stop.is_set():
            msg = self._next(0.1)
            if msg is None:
                continue
            if msg.kind == m.SCAN_END:
                return
            if msg.kind == m.GAP:
                self.gaps += 1
                continue
            if msg.kind != m.RESULT:
                continue
            frame = msg.arrays.get(self.result)
            if frame is None:
                self.skipped += 1
                continue
            meta = {"upstream_index": msg.index, "upstream_scan": msg.scan}
            meta.update({k: v for k, v in msg.scalars.items() if isinstance(v, int | float)})
            yield frame, meta

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._reader.stop()

    def describe(self) -> dict[str, Any]:
        return {"detector": "pipeline", **self._described, "skipped": self.skipped, "gaps": self.gaps}
