"""The Lavue bridge engine: a sorter's ordered results shown live in Lavue.

:class:`LavueBridgeEngine` consumes a sorter's ordered stream like the sink and
the writers do, but keeps nothing: every image-like result (a 2D or channel-first
3D array) is offered to a :class:`~lavue_bridge.publisher.LavuePublisher`, which
sends the newest one per topic at a bounded rate. Offering only stores a
reference, so the bridge grants its credit back at once and never slows the
pipeline. Raw frames are shown the same way: a worker group whose only step is
``passthrough`` (or ``binning``, lighter) feeds a sorter the bridge attaches to;
the master itself is never asked for frames (see ``config/lavue_raw.yaml``).

Topics are ``STREAM.RESULT`` (as the sink names them). When a StartScan gives a
2D ``scan_shape``, every numeric scalar result is also assembled into a live map,
topic ``STREAM.map.NAME``. Each frame carries the metadata Lavue understands:

- ``name`` "scan S #I", new for every frame (Lavue redraws only on a new name);
- caked images (a 2D result with 1D ``radial`` and ``azimuthal`` results, same
  prefix, whose lengths match its columns and rows): ``axisscales``/``axislabels`` with the
  radial unit of the ``azimuthal2d`` step (2theta or q against chi);
- maps: ``axisscales``/``axislabels`` from the StartScan ``motors`` (see
  :func:`pipelines.plots.scan_axes`: slow motor, then fast), else point numbers;
- geometry from a PONI file named by the StartScan metadata (``poni``) or by a
  step of the group (its ``poni`` parameter): ``wavelength``, ``energy``,
  ``detector_distance``, and for images on the detector's pixel grid (or an
  integer binning of it) ``pixel_size`` and ``beam_center_x``/``_y``. Values go
  with their units (``[0.9999, "A"]``), which Lavue's "geometry from source" reads.

The list of topics follows the results: when a result appears or goes away (a
worker reconfigured, a new scan with or without a grid), Lavue is told at once.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import zmq

from lavue_bridge import protocol
from lavue_bridge.publisher import LavuePublisher
from pipelines import message as m
from pipelines.consumer import ConsumerEngine
from pipelines.engine import Health
from pipelines.geometry import PoniError, PoniGeometry, radial_unit, read_poni
from pipelines.plots import scan_axes
from pipelines.sink import image_topic
from pipelines.steps.maps import MapAssembler, grid_shape

#: Scalars that say where a point is rather than what was measured: not mapped.
POSITION_SCALARS = frozenset({"map_row", "map_col", "index"})
#: Step whose results are caked images, and its default radial unit.
CAKING_STEP = "azimuthal2d"
DEFAULT_UNIT = "2th_deg"


def map_topic(stream: str, name: str) -> str:
    """The live-view topic of the map of scalar ``name`` of ``stream``."""
    return image_topic(stream, f"map.{name}")


def topic_selected(topic: str, wanted: Sequence[str]) -> bool:
    """True when ``wanted`` is empty or names ``topic`` (as ``STREAM.RESULT`` or ``RESULT``)."""
    if not wanted:
        return True
    result = topic.split(".", 1)[1] if "." in topic else topic
    return topic in wanted or result in wanted


def is_image(array: np.ndarray) -> bool:
    """2D, or channel-first 3D, non-empty and numeric: what Lavue can draw."""
    return array.ndim in (2, 3) and array.size > 0 and array.dtype.kind in protocol.NUMERIC_KINDS


# -- metadata ------------------------------------------------------------------------------
def geometry_metadata(
    geometry: PoniGeometry, image_shape: tuple[int, ...], detector_shape: tuple[int, int] | None
) -> dict[str, Any]:
    """Lavue's geometry keys (with units) for an image of ``image_shape``.

    Wavelength, energy and distance hold for any image of the scan; pixel size
    and beam centre only for an image on the detector's pixel grid, or on a grid
    binned by the same integer factor along both axes (both then scaled).
    """
    out: dict[str, Any] = {"detector_distance": [geometry.dist * 1e3, "mm"]}
    if geometry.wavelength is not None:
        out["wavelength"] = [geometry.wavelength * 1e10, "A"]
        out["energy"] = [geometry.energy_kev * 1e3, "eV"]
    detector_shape = geometry.shape or detector_shape
    if detector_shape is None or len(image_shape) < 2:
        return out
    rows, cols = image_shape[-2:]
    if rows <= 0 or cols <= 0 or detector_shape[0] % rows or detector_shape[1] % cols:
        return out
    factor = detector_shape[0] // rows
    if detector_shape[1] // cols != factor:
        return out
    try:
        x, y = geometry.with_shape(detector_shape).beam_center
    except PoniError:
        return out
    out["pixel_size"] = [geometry.pixel2 * 1e6 * factor, "um", geometry.pixel1 * 1e6 * factor, "um"]
    out["beam_center_x"] = [x / factor, "pixels"]
    out["beam_center_y"] = [y / factor, "pixels"]
    return out


def _edges_and_step(centres: np.ndarray) -> tuple[float, float] | None:
    """(outer edge of the first bin, bin width) of evenly spaced bin centres."""
    c = np.asarray(centres, dtype=np.float64)
    if c.ndim != 1 or c.size == 0 or not np.all(np.isfinite(c)):
        return None
    step = float(c[1] - c[0]) if c.size > 1 else 1.0
    if step == 0.0:
        return None
    return float(c[0]) - step / 2.0, step


def caked_metadata(radial: np.ndarray, azimuthal: np.ndarray, unit: str | None) -> dict[str, Any]:
    """``axisscales``/``axislabels`` of a cake (rows = azimuth, columns = radial bins).

    Lavue's x runs along the columns (radial), y along the rows (chi); scales
    start at the outer edges of the first bins, as pyFAI's bins do.
    """
    x = _edges_and_step(radial)
    y = _edges_and_step(azimuthal)
    if x is None or y is None:
        return {}
    try:
        u = radial_unit(unit or DEFAULT_UNIT)
        x_label, x_units = u.label, u.symbol
    except ValueError:
        x_label, x_units = "radial", str(unit)
    return {
        "axisscales": [x[0], y[0], x[1], y[1]],
        "axislabels": protocol.axislabels_for_image("chi", x_label, "deg", x_units),
    }


def map_axes(scan_shape: Any, motors: Any) -> dict[str, Any]:
    """``axisscales``/``axislabels`` of a map over a ``scan_shape`` [n_slow, n_fast] grid,
    from the StartScan ``motors`` (see :func:`pipelines.plots.scan_axes`); point
    numbers without usable motors. Positions not evenly spaced give labels only."""
    n_slow, n_fast = grid_shape(scan_shape)
    axes = scan_axes(n_slow, n_fast, motors)
    out: dict[str, Any] = {
        "axislabels": protocol.axislabels_for_image(
            axes.row_label, axes.col_label, axes.row_unit, axes.col_unit
        )
    }
    try:
        out["axisscales"] = protocol.axisscales_for_image(axes.rows, axes.cols)
    except ValueError:
        pass
    return out


def find_poni(scan_meta: Mapping[str, Any], stream: str) -> str | None:
    """The PONI file named by the scan (``poni``) or by a step of ``stream`` (its ``poni`` parameter)."""
    poni = scan_meta.get("poni")
    if isinstance(poni, str) and poni:
        return poni
    for spec in _step_specs(scan_meta, stream):
        if isinstance(spec, Mapping):
            for params in spec.values():
                if isinstance(params, Mapping) and isinstance(params.get("poni"), str):
                    return params["poni"]
    return None


def caking_unit(scan_meta: Mapping[str, Any], stream: str, prefix: str = "") -> str | None:
    """The radial unit of the ``azimuthal2d`` step of ``stream`` whose results have ``prefix``."""
    for spec in _step_specs(scan_meta, stream):
        if spec == CAKING_STEP and not prefix:
            return DEFAULT_UNIT
        if isinstance(spec, Mapping) and CAKING_STEP in spec:
            params = spec[CAKING_STEP] if isinstance(spec[CAKING_STEP], Mapping) else {}
            if params.get("prefix", "") == prefix:
                return str(params.get("unit", DEFAULT_UNIT))
    return None


def cake_axes(arrays: Mapping[str, np.ndarray], key: str) -> tuple[str, np.ndarray, np.ndarray] | None:
    """(prefix, radial, azimuthal) when result ``key`` is a cake: a 2D array beside 1D
    ``<prefix>radial``/``<prefix>azimuthal`` results matching its columns and rows."""
    image = arrays[key]
    prefix = key[: -len("cake")] if key.endswith("cake") else ""
    radial, azimuthal = arrays.get(prefix + "radial"), arrays.get(prefix + "azimuthal")
    if (
        image.ndim == 2
        and radial is not None
        and azimuthal is not None
        and radial.shape == (image.shape[1],)
        and azimuthal.shape == (image.shape[0],)
    ):
        return prefix, radial, azimuthal
    return None


def _step_specs(scan_meta: Mapping[str, Any], stream: str) -> list[Any]:
    processing = scan_meta.get("processing")
    if not isinstance(processing, Mapping):
        return []
    group = processing.get(stream) or processing.get(stream.split("/", 1)[0])
    steps = group.get("steps") if isinstance(group, Mapping) else None
    return list(steps) if isinstance(steps, list) else []


# -- the engine ----------------------------------------------------------------------------
class _LiveMap:
    """A map being assembled, offered at most at the publisher's rate."""

    def __init__(self, topic: str, scan_shape: Any, snake: bool, meta: dict[str, Any]):
        self.topic = topic
        self.assembler = MapAssembler(scan_shape, snake)
        self.meta = meta
        self.dirty = False
        self.last_offer = -math.inf
        self.name = ""


class LavueBridgeEngine(ConsumerEngine):
    """See the module docstring.

    ``topics`` selects what is shown (``STREAM.RESULT`` or ``RESULT`` entries;
    empty: every image-like result). The engine owns its publisher unless one
    is given.
    """

    def __init__(
        self,
        *,
        name: str = "lavue",
        bind: str = "127.0.0.1",
        port: int = 0,
        max_rate_hz: float = 10.0,
        topics: Iterable[str] = (),
        publisher: LavuePublisher | None = None,
        credit: int = 16,
        context: zmq.Context | None = None,
    ):
        wanted = [topics] if isinstance(topics, str) else list(topics)
        for entry in wanted:
            if not isinstance(entry, str):
                raise ValueError(f"topics: entry {entry!r} is not a result name (RESULT or STREAM.RESULT)")
        wanted = [t.strip() for t in wanted if t.strip()]  # Tango stores an empty list as [""]
        super().__init__(name, credit=credit, context=context)
        self.wanted = wanted
        self._own_publisher = publisher is None
        self.publisher = publisher or LavuePublisher(bind, port, max_rate_hz=max_rate_hz)
        self.topics: list[str] = []
        self._stream_topics: dict[str, list[str]] = {}
        self._wanted_now: frozenset[str] = frozenset()
        self._maps: dict[str, _LiveMap] = {}
        self._map_grid: tuple[int, int] | None = None
        self._map_meta: dict[str, Any] = {}
        self.scan_meta: dict[str, Any] = {}
        self._geometry: PoniGeometry | None = None
        self._detector_shape: tuple[int, int] | None = None
        self._geometry_cache: dict[tuple[str, float], PoniGeometry] = {}
        self.geometry_problem = ""

    # -- control ---------------------------------------------------------------------------
    @property
    def address(self) -> str:
        """``host:port`` Lavue connects to (``lavue -s zmq -c ADDRESS/TOPIC``)."""
        return self.publisher.address

    @property
    def max_rate_hz(self) -> float:
        return self.publisher.max_rate_hz

    def set_max_rate(self, rate_hz: float) -> None:
        """Images per second and topic at most; applies at once."""
        if isinstance(rate_hz, bool) or not isinstance(rate_hz, int | float) or not 0 < rate_hz <= 1000:
            raise ValueError(f"publish rate = {rate_hz!r} Hz; expected a number > 0 and <= 1000")
        self.publisher.max_rate_hz = float(rate_hz)

    def setup(self) -> None:
        self.set_health(Health.UNKNOWN, "Waiting for the sorter's endpoint")

    def teardown(self) -> None:
        super().teardown()
        if self._own_publisher:
            self.publisher.close()

    # -- the stream ------------------------------------------------------------------------
    def handle(self, msg: m.Message) -> None:
        if msg.kind == m.SCAN_START:
            self._start_scan(msg)
        elif msg.kind == m.RESULT:
            self._show(msg)
        elif msg.kind == m.SCAN_END:
            self._offer_maps(force=True)

    def _start_scan(self, msg: m.Message) -> None:
        self.scan_meta = dict(msg.meta)
        self._maps = {}
        self._geometry, self.geometry_problem = None, ""
        source = msg.meta.get("source")
        shape = source.get("shape") if isinstance(source, Mapping) else None
        self._detector_shape = (
            (int(shape[0]), int(shape[1])) if isinstance(shape, list) and len(shape) == 2 else None
        )
        poni = find_poni(self.scan_meta, msg.stream)
        if poni:
            try:
                key = (poni, os.stat(poni).st_mtime)
                if key not in self._geometry_cache:
                    self._geometry_cache = {key: read_poni(poni)}
                self._geometry = self._geometry_cache[key]
            except (OSError, PoniError) as exc:
                self.geometry_problem = f"no geometry for Lavue: {exc}"
                self.log.warning("%s: %s", self.name, self.geometry_problem)
        shape = self.scan_meta.get("scan_shape")
        try:
            n_slow, n_fast = grid_shape(shape) if shape is not None else (1, 1)
        except ValueError as exc:
            self.log.warning("%s: no live maps: %s", self.name, exc)
            n_slow = n_fast = 1
        self._map_grid = (n_slow, n_fast) if n_slow > 1 and n_fast > 1 else None
        self._map_meta = map_axes(self._map_grid, self.scan_meta.get("motors")) if self._map_grid else {}
        self._update_topics()
        if self.geometry_problem:
            self.set_health(Health.RUNNING, f"Scan {msg.scan} running; {self.geometry_problem}")

    def _show(self, msg: m.Message) -> None:
        images = {image_topic(msg.stream, k): (k, a) for k, a in msg.arrays.items() if is_image(a)}
        if list(images) != self._stream_topics.get(msg.stream):
            self._stream_topics[msg.stream] = list(images)
            self._update_topics()
        frame_meta = {"scan": msg.scan, "index": msg.index, "stream": msg.stream, "version": msg.version}
        name = f"scan {msg.scan} #{msg.index}"
        offered = False
        for topic, (key, array) in images.items():
            if topic not in self._wanted_now:
                continue
            meta = dict(frame_meta, result=key)
            meta.update(self._image_metadata(msg, key, array))
            self.publisher.offer(topic, array, meta, name=name)
            offered = True
        if self._map_grid is not None:
            offered |= self._add_to_maps(msg, name)
        if offered:
            self.stats.count_out()

    def _image_metadata(self, msg: m.Message, key: str, array: np.ndarray) -> dict[str, Any]:
        meta: dict[str, Any] = {}
        if self._geometry is not None:
            meta.update(geometry_metadata(self._geometry, array.shape, self._detector_shape))
        cake = cake_axes(msg.arrays, key)
        if cake is not None:
            prefix, radial, azimuthal = cake
            for k in ("pixel_size", "beam_center_x", "beam_center_y"):  # not a detector image
                meta.pop(k, None)
            meta.update(caked_metadata(radial, azimuthal, caking_unit(self.scan_meta, msg.stream, prefix)))
        return meta

    def _add_to_maps(self, msg: m.Message, name: str) -> bool:
        assert self._map_grid is not None
        changed = False
        added = False
        for key, value in msg.scalars.items():
            if key in POSITION_SCALARS or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            topic = map_topic(msg.stream, key)
            live = self._maps.get(topic)
            if live is None:
                live = self._maps[topic] = _LiveMap(
                    topic, self._map_grid, bool(self.scan_meta.get("snake", False)), dict(self._map_meta)
                )
                added = True
            try:
                live.assembler.add(int(msg.index), float(value))
            except (IndexError, TypeError, ValueError):
                continue  # a point outside the announced grid: nothing to draw
            live.dirty, live.name = True, name
            changed = True
        if added:
            self._update_topics()
        return changed

    def _offer_maps(self, force: bool = False) -> None:
        now = time.monotonic()
        interval = 1.0 / self.publisher.max_rate_hz
        for topic, live in self._maps.items():
            if (
                not live.dirty
                or topic not in self._wanted_now
                or (not force and now - live.last_offer < interval)
            ):
                continue
            meta = dict(live.meta, scan=self.current_scan, filled=live.assembler.filled)
            # the assembler keeps filling its array: Lavue gets a copy
            self.publisher.offer(topic, live.assembler.map.copy(), meta, name=live.name)
            live.dirty, live.last_offer = False, now

    def idle(self) -> None:
        if self._maps:
            self._offer_maps()

    # -- topics ----------------------------------------------------------------------------
    def _update_topics(self) -> None:
        every = [t for topics in self._stream_topics.values() for t in topics] + list(self._maps)
        shown = [t for t in dict.fromkeys(every) if topic_selected(t, self.wanted)]
        if shown != self.topics:
            self.publisher.set_topics(shown)
            self.topics = shown
            self._wanted_now = frozenset(shown)
            self.emit("topics", list(shown))

    # -- health ----------------------------------------------------------------------------
    def counters(self) -> dict[str, Any]:
        c = super().counters()
        s = self.publisher.stats()
        c.update(
            Published=s["published"],
            Skipped=s["skipped"],
            PublishFailures=s["failed"],
            PublishedRateHz=round(s["rate_hz"], 3),
            TopicCount=len(self.topics),
        )
        return c
