"""PNG plots of a scan: 1D profiles and scalars assembled into maps.

For every chosen profile (a 1D array result, e.g. an azimuthal integration's
``intensity``) the scan's mean and its last frame are plotted when the scan ends,
and with ``every: N`` also the profile of every N-th frame while it runs. The x
axis of ``<p>intensity`` is ``<p>radial`` when the step gives it, else the bin
number. Every chosen map result (a scalar such as ``roi_sum``) is assembled on the
scan grid (StartScan's ``scan_shape`` and ``snake``) and plotted as an image; a scan
without a grid gets the scalar against the motor it moved (one motor in the
frames' positions) or against the index. The drawing itself is
:mod:`pipelines.plots` (``plot_profile`` and ``plot_map``), run in a child process
(:class:`PlotProcess`): Qt wants to draw in a process's main thread, and the
writer's loop thread is not one.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import message as m
from ..steps.maps import MapAssembler, grid_position

if TYPE_CHECKING:
    from . import WriterSettings


def _serve_plots(conn: Any) -> None:
    """The child's loop: run ``pipelines.plots`` functions, answer (ok, path) or (False, error)."""
    from .. import plots

    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        name, args, kwargs = job
        try:
            conn.send((True, str(getattr(plots, name)(*args, **kwargs))))
        except OSError as exc:
            conn.send((False, ("OSError", exc.errno, exc.strerror or str(exc), exc.filename)))
        except Exception as exc:
            conn.send((False, (type(exc).__name__, None, str(exc), None)))


class PlotProcess:
    """:mod:`pipelines.plots` in a child process (started at the first plot, reused)."""

    def __init__(self, timeout_s: float = 120.0):
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._proc: Any = None
        self._conn: Any = None

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve_plots, args=(child,), name="tangopipe-plots", daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent

    def call(self, name: str, *args: Any, **kwargs: Any) -> Path:
        """Run ``plots.<name>(*args, **kwargs)`` in the child; its errors are raised here."""
        with self._lock:
            if self._proc is None or not self._proc.is_alive():
                self._start()
            self._conn.send((name, args, kwargs))
            if not self._conn.poll(self.timeout_s):
                self._stop()
                raise TimeoutError(f"plotting {name} took more than {self.timeout_s:.0f} s")
            try:
                ok, value = self._conn.recv()
            except EOFError:
                self._stop()
                raise RuntimeError(f"the plotting process died while drawing {name}") from None
        if ok:
            return Path(value)
        kind, code, text, filename = value
        if kind == "OSError":
            raise OSError(code, text, filename)
        raise ValueError(f"{name}: {kind}: {text}")

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.join(5)
        self._proc = self._conn = None

    def close(self) -> None:
        with self._lock:
            if self._proc is not None and self._proc.is_alive():
                self._conn.send(None)
                self._proc.join(5)
            self._stop()


#: one plotting process for every graph writer of this process
PLOTS = PlotProcess()


def x_axis_name(profile: str) -> str | None:
    """The result that is the x axis of ``profile`` (``<p>intensity`` -> ``<p>radial``), if any."""
    if profile.endswith("intensity"):
        return profile[: -len("intensity")] + "radial"
    return None


class GraphScanWriter:
    """Collects one scan's profiles and scalars and plots them (see the module docstring)."""

    def __init__(self, settings: WriterSettings, start: m.Message):
        self.settings = settings
        self.scan = start.scan
        self.stream = start.stream
        self.fields = settings.name_fields(start)
        self.path = settings.scan_directory(start)
        self.path.mkdir(parents=True, exist_ok=True)
        self.profiles = list(settings.results)  # empty: every 1D result of the first frame
        self.maps = list(settings.maps)
        self.every = settings.every
        shape = start.meta.get("scan_shape")
        self.grid: tuple[Any, bool] | None = (shape, bool(start.meta.get("snake", False))) if shape else None
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self.last: dict[str, tuple[int, np.ndarray]] = {}
        self.x: dict[str, np.ndarray] = {}
        self.values: dict[str, dict[int, float]] = {m_: {} for m_ in self.maps}
        self.motor_values: dict[str, dict[int, float]] = {}
        self.written = 0
        self.files: list[Path] = []
        self._done: set[str] = set()  # plots already made (a retry after a storage fault skips them)
        self.closed = False

    def _file(self, name: str) -> Path:
        from . import format_name, unique_path

        return unique_path(
            self.path / format_name(self.settings.pattern, **self.fields, name=name.replace("/", "_"))
        )

    def write(self, msg: m.Message) -> None:
        if msg.kind != m.RESULT:
            return
        assert msg.index is not None
        if not self.profiles and not self.written:
            axes = {x_axis_name(k) for k in msg.arrays}
            self.profiles = [k for k, v in msg.arrays.items() if v.ndim == 1 and k not in axes]
        for name in self.profiles:
            y = msg.arrays.get(name)
            if y is None or y.ndim != 1:
                continue
            x_name = x_axis_name(name)
            if x_name in msg.arrays and msg.arrays[x_name].shape == y.shape:
                self.x[name] = np.asarray(msg.arrays[x_name], dtype=np.float64)
            y64 = np.asarray(y, dtype=np.float64)
            if name in self.sums and self.sums[name].shape != y64.shape:
                raise ValueError(
                    f"graphs: profile {name!r} changed length from {self.sums[name].shape} to {y64.shape}"
                )
            self.sums[name] = self.sums.get(name, 0) + y64
            self.counts[name] = self.counts.get(name, 0) + 1
            self.last[name] = (msg.index, y64)
            if self.every and msg.index % self.every == 0:
                self._profile(
                    f"{name}_{msg.index:05d}", name, y64, f"scan {self.scan} frame {msg.index}: {name}"
                )
        for name in self.maps:
            value = msg.scalars.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.values[name][msg.index] = float(value)
        positions = msg.meta.get("positions")
        if isinstance(positions, dict):
            for motor, value in positions.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self.motor_values.setdefault(motor, {})[msg.index] = float(value)
        self.written += 1

    def _profile(self, plot: str, name: str, y: np.ndarray, title: str) -> None:
        if plot in self._done:
            return
        x = self.x.get(name)
        xlabel = x_axis_name(name) if x is not None else "bin"
        path = self._file(plot)
        PLOTS.call("plot_profile", np.arange(len(y)) if x is None else x, y, path, xlabel, name, title)
        self._finish(plot, path)

    def _finish(self, plot: str, path: Path) -> None:
        os.chmod(path, 0o644)
        self._done.add(plot)
        self.files.append(path)

    def _map(self, name: str) -> None:
        plot = f"{name}_map"
        if plot in self._done or not self.values[name]:
            return
        values = self.values[name]
        title = f"scan {self.scan}: {name}"
        if self.grid is not None:
            assembler = MapAssembler(*self.grid)
            for index, value in values.items():
                if index < assembler.map.size:
                    assembler.add(index, value)
            path = self._file(plot)
            axes, labels = self._grid_axes(assembler)
            try:
                PLOTS.call("plot_map", assembler.map, path, axes=axes, title=title, labels=labels)
            except ValueError:  # motor positions not evenly spaced: pixel numbers then
                PLOTS.call("plot_map", assembler.map, path, title=title, labels=("row", "column"))
        else:
            indices = np.asarray(sorted(values))
            y = np.asarray([values[i] for i in indices])
            motors = [mv for mv in self.motor_values.values() if all(i in mv for i in indices)]
            x, xlabel = indices, "index"
            if len(self.motor_values) == 1 and motors:
                xlabel = next(iter(self.motor_values))
                x = np.asarray([motors[0][i] for i in indices])
            path = self._file(plot)
            PLOTS.call("plot_profile", x, y, path, xlabel, name, title)
        self._finish(plot, path)

    def _grid_axes(self, assembler: MapAssembler) -> tuple[Any, tuple[str, str]]:
        """(row positions, column positions) and labels from the two motors of a mesh, if known."""
        n_slow, n_fast = assembler.shape
        if len(self.motor_values) != 2:
            return None, ("row", "column")
        where = {}
        for index in range(n_slow * n_fast):
            where[grid_position(index, assembler.shape, assembler.snake)] = index
        axes: dict[str, np.ndarray] = {}
        for motor, values in self.motor_values.items():
            try:
                cols = np.asarray([values[where[(0, c)]] for c in range(n_fast)])
                rows = np.asarray([values[where[(r, 0)]] for r in range(n_slow)])
            except KeyError:
                return None, ("row", "column")
            if np.ptp(cols) > 0 and np.ptp(rows) == 0:
                axes["fast"], axes["fast_name"] = cols, motor  # type: ignore[assignment]
            elif np.ptp(rows) > 0 and np.ptp(cols) == 0:
                axes["slow"], axes["slow_name"] = rows, motor  # type: ignore[assignment]
        if "fast" not in axes or "slow" not in axes:
            return None, ("row", "column")
        return (axes["slow"], axes["fast"]), (str(axes["slow_name"]), str(axes["fast_name"]))

    def flush(self, every_s: float = 1.0, force: bool = False) -> bool:
        return False  # plots are whole files, written when made

    def close(self, end: m.Message | None = None) -> None:
        if self.closed:
            return
        for name, total in self.sums.items():
            self._profile(
                f"{name}_mean",
                name,
                total / self.counts[name],
                f"scan {self.scan}: mean {name} of {self.counts[name]} frames",
            )
            index, y = self.last[name]
            self._profile(f"{name}_last", name, y, f"scan {self.scan} frame {index}: {name}")
        for name in self.maps:
            self._map(name)
        self.closed = True
