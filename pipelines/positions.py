"""Motor positions of each scan point, matched to the frame of the same index.

A step scan (Sardana's ``ascan``, ``mesh``...) reports, point by point, where its
motors were (``AddPointMetadata`` on the master, sent by a post-acq hook).
:class:`PointPositions` keeps them by (scan, index). :class:`PointTriggeredSource`
wraps the master's frame source so that each frame carries the positions of its
point in its metadata (``meta["positions"]``), and gives the whole table to the
scan-end message (:meth:`PointTriggeredSource.scan_end_meta`) so that positions
reported after their frame was dispatched still reach the files.

The assumption that makes frames and points line up: the detector delivers one
frame per scan point, in order, so frame ``i`` belongs to point ``i``. With
``point_trigger`` set in StartScan's metadata the wrapper enforces it for a source
that would otherwise run free (the simulator): frame ``i`` is released only once
point ``i`` was reported, as a detector triggered by the scan would take it.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from .sources import FrameSource

#: positions at most in the scan-end message (its JSON header is bounded, 1 MiB)
MAX_END_VALUES = 40_000


class PointError(ValueError):
    """A point report that is not ``{"index": int >= 0, "positions": {name: number}}``."""


def parse_point(body: Any) -> tuple[int, dict[str, float | None], Any]:
    """Check an AddPointMetadata argument; return (index, positions, scan or None).

    Positions are numbers (or null for a motor that could not be read); NaN and
    infinities become None so that they stay valid JSON downstream.
    """
    if not isinstance(body, Mapping):
        raise PointError(
            f'a point report is a JSON object {{"index": 0, "positions": {{...}}}}, got {body!r:.80}'
        )
    unknown = set(body) - {"index", "positions", "scan"}
    if unknown:
        raise PointError(
            f"point report: unknown keys {sorted(unknown)}; expected index, positions and optionally scan"
        )
    index = body.get("index")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise PointError(f"point report: index {index!r} must be an integer >= 0")
    positions = body.get("positions")
    if not isinstance(positions, Mapping) or not positions:
        raise PointError(f"point report: positions {positions!r:.80} must be an object {{motor: value}}")
    clean: dict[str, float | None] = {}
    for name, value in positions.items():
        if not isinstance(name, str) or not name or len(name) > 200:
            raise PointError(f"point report: motor name {name!r:.80} must be a non-empty string")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise PointError(
                f"point report: position of {name!r} is {value!r:.40}; expected a number or null"
            )
        clean[name] = None if value is None or not math.isfinite(value) else float(value)
    scan = body.get("scan")
    if scan is not None and (isinstance(scan, bool) or not isinstance(scan, int | str)):
        raise PointError(f"point report: scan {scan!r:.40} must be an integer or a string")
    return index, clean, scan


class PointPositions:
    """Positions by (scan, index) for the last ``max_scans`` scans; thread-safe.

    Reports come from a Tango command thread, readers are the master's source
    thread (which may wait for a point) and whoever builds the scan-end message.
    """

    def __init__(self, max_scans: int = 4, max_points: int = 10_000_000):
        self.max_scans = max_scans
        self.max_points = max_points
        self._scans: OrderedDict[Any, dict[int, dict[str, float | None]]] = OrderedDict()
        self._cond = threading.Condition()

    def add(self, scan: Any, index: int, positions: Mapping[str, float | None]) -> None:
        """Record the positions of point ``index`` of ``scan`` (a repeated index replaces the earlier one)."""
        with self._cond:
            points = self._scans.get(scan)
            if points is None:
                points = self._scans[scan] = {}
                while len(self._scans) > self.max_scans:
                    self._scans.popitem(last=False)
            if len(points) >= self.max_points and index not in points:
                raise PointError(f"scan {scan}: more than {self.max_points} points reported")
            points[index] = dict(positions)
            self._cond.notify_all()

    def get(self, scan: Any, index: int) -> dict[str, float | None] | None:
        with self._cond:
            found = self._scans.get(scan, {}).get(index)
            return None if found is None else dict(found)

    def count(self, scan: Any) -> int:
        """Points reported for ``scan``."""
        with self._cond:
            return len(self._scans.get(scan, {}))

    def wait(
        self, scan: Any, index: int, stop: threading.Event, poll_s: float = 0.05
    ) -> dict[str, float | None] | None:
        """The positions of point ``index``, waiting until reported; None once ``stop`` is set first."""
        with self._cond:
            while True:
                found = self._scans.get(scan, {}).get(index)
                if found is not None:
                    return dict(found)
                if stop.is_set():
                    return None
                self._cond.wait(poll_s)

    def wake(self) -> None:
        """Make waiters look at their stop event now."""
        with self._cond:
            self._cond.notify_all()

    def columns(self, scan: Any) -> dict[str, list[float | None]]:
        """``{motor: [position of point 0, 1, ...]}`` with None where a point was not reported."""
        with self._cond:
            points = self._scans.get(scan, {})
            if not points:
                return {}
            rows = max(points) + 1
            motors = list(dict.fromkeys(name for p in points.values() for name in p))
            table: dict[str, list[float | None]] = {name: [None] * rows for name in motors}
            for index, positions in points.items():
                for name, value in positions.items():
                    table[name][index] = value
            return table


class PointTriggeredSource:
    """A frame source whose frames carry the positions of their scan point.

    ``current_scan`` returns the id of the scan being acquired (the master's
    ``scan_id``, set before the source is asked for frames). Without
    ``point_trigger`` in StartScan's metadata, frames flow as the inner source
    makes them and get ``meta["positions"]`` when their point was already
    reported; with it, frame ``i`` waits for point ``i`` and the inner source's
    own pacing is switched off (``rate_hz`` 0: the scan is the clock), which
    suits a source that makes frames on demand, such as the simulator.
    """

    def __init__(self, source: FrameSource, points: PointPositions, current_scan: Callable[[], Any]):
        self.source = source
        self.points = points
        self.current_scan = current_scan
        self._stop = threading.Event()
        self._triggered = False

    def frames(self, scan: Mapping[str, Any]) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
        self._stop.clear()
        self._triggered = triggered = bool(scan.get("point_trigger", False))
        scan_id = self.current_scan()
        inner = self.source.frames({**scan, "rate_hz": 0} if triggered else scan)
        try:
            for index, (array, meta) in enumerate(inner):
                if triggered:
                    positions = self.points.wait(scan_id, index, self._stop)
                    if positions is None:  # the scan ended before reaching this point
                        return
                else:
                    positions = self.points.get(scan_id, index)
                if positions is not None:
                    meta = {**meta, "positions": positions}
                yield array, meta
        finally:
            if triggered:
                self.source.stop()

    def stop(self) -> None:
        """Stop the scan's frames. Point-triggered, the frames of points already
        reported are still delivered (the inner source makes them on demand)."""
        self._stop.set()
        if not self._triggered:
            self.source.stop()
        self.points.wake()

    def describe(self) -> dict[str, Any]:
        return self.source.describe()

    def scan_end_meta(self) -> dict[str, Any]:
        """What the scan-end message adds: every reported position, as columns by point index."""
        scan_id = self.current_scan()
        table = self.points.columns(scan_id)
        if not table:
            return {}
        values = sum(len(column) for column in table.values())
        if values > MAX_END_VALUES:
            return {"positions_omitted": f"{values} positions are too many for the scan-end message"}
        return {"positions": table}

    def __getattr__(self, name: str) -> Any:
        # anything else a caller asks of the source (counters, settings) is the inner source's
        return getattr(self.source, name)
