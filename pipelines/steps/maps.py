"""Maps over the scan grid: where point ``index`` lies, and scalars assembled into images.

A 2D scan of shape ``[n_slow, n_fast]`` (``meta["scan_shape"]``) visits the fast
axis first: point ``index`` is at row ``index // n_fast`` and column
``index % n_fast``. In a snake scan every odd row runs backwards, so the column is
mirrored there. A 1D scan ``[n]`` is one row.

``MapAssembler`` builds one map (NaN where no point has arrived yet) and
``ScanMaps`` one per scalar result; both are plain objects the sink and writer
use. The ``map_position`` step adds ``map_row`` and ``map_col`` to each point's
results, so every consumer sees where a point belongs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np


def grid_shape(scan_shape: Any) -> tuple[int, int]:
    """``[n_slow, n_fast]`` (or ``[n]``) as a 2-tuple of positive ints."""
    shape = list(scan_shape) if isinstance(scan_shape, list | tuple | np.ndarray) else None
    if shape is not None and len(shape) == 1:
        shape = [1, shape[0]]
    if shape is None or len(shape) != 2 or not all(isinstance(n, int | np.integer) and n > 0 for n in shape):
        raise ValueError(f"scan_shape = {scan_shape!r}; expected [n_slow, n_fast] of positive ints")
    return int(shape[0]), int(shape[1])


def grid_position(index: int, scan_shape: Any, snake: bool = False) -> tuple[int, int]:
    """(row, col) of point ``index`` in a scan of ``scan_shape``."""
    n_slow, n_fast = grid_shape(scan_shape)
    if not 0 <= index < n_slow * n_fast:
        raise IndexError(f"point index {index} is outside a {n_slow} x {n_fast} scan")
    row, col = divmod(int(index), n_fast)
    if snake and row % 2 == 1:
        col = n_fast - 1 - col
    return row, col


class MapAssembler:
    """One scalar per scan point, as an ``[n_slow, n_fast]`` float64 image; NaN = not measured yet."""

    def __init__(self, scan_shape: Any, snake: bool = False):
        self.shape = grid_shape(scan_shape)
        self.snake = snake
        self.map = np.full(self.shape, np.nan)
        self.filled = 0

    def add(self, index: int, value: float) -> tuple[int, int]:
        """Put ``value`` at point ``index``; returns its (row, col)."""
        row, col = grid_position(index, self.shape, self.snake)
        if np.isnan(self.map[row, col]):
            self.filled += 1
        self.map[row, col] = value
        return row, col

    def add_many(self, indices: Iterable[int], values: Iterable[float]) -> None:
        for index, value in zip(indices, values, strict=True):
            self.add(index, value)

    @property
    def complete(self) -> bool:
        return self.filled == self.map.size


class ScanMaps:
    """One :class:`MapAssembler` per scalar result name of a scan, made as names appear."""

    def __init__(self, scan_shape: Any, snake: bool = False, names: Iterable[str] | None = None):
        self.shape = grid_shape(scan_shape)
        self.snake = snake
        self.only = set(names) if names is not None else None
        self.maps: dict[str, MapAssembler] = {}

    def add(self, index: int, scalars: Mapping[str, Any]) -> None:
        """Put each numeric scalar of one point's results in its map."""
        for name, value in scalars.items():
            if self.only is not None and name not in self.only:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float | np.number):
                continue
            if name not in self.maps:
                self.maps[name] = MapAssembler(self.shape, self.snake)
            self.maps[name].add(index, float(value))

    def __getitem__(self, name: str) -> np.ndarray:
        return self.maps[name].map


def map_position(frame: Any, meta: dict, *, snake: bool = False) -> dict[str, Any]:
    """Scalars ``map_row`` and ``map_col`` of this point, from ``meta["index"]`` and
    ``meta["scan_shape"]`` (``meta["snake"]``, when present, wins over ``snake``)."""
    if "scan_shape" not in meta:
        raise ValueError("map_position: meta has no scan_shape; the scan must announce [n_slow, n_fast]")
    row, col = grid_position(meta["index"], meta["scan_shape"], bool(meta.get("snake", snake)))
    return {"map_row": row, "map_col": col}
