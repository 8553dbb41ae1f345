"""PipelineSink: the Tango face of :class:`pipelines.sink.SinkEngine`, and its Lavue stream."""

from __future__ import annotations

import json
import math
import re
import time
from typing import Any

import numpy as np
import tango
from tango.server import attribute, command, device_property, run

from pipelines import message as m
from pipelines.engine import Engine
from pipelines.query import answer
from pipelines.security import read_token_file
from pipelines.sink import SinkEngine

from .base import PipelineDevice, counter, parse_json_property

MAX_COMMAND_ELEMENTS = 1 << 20  # bigger answers go through the query port
SPECTRUM_AXES = ("radial", "azimuthal")  # 1D results that are axes, shown only when named


class PipelineSink(PipelineDevice):
    """Keeps the latest results in memory, answers queries, feeds Lavue."""

    Upstream = device_property(dtype=str, default_value="", doc="the sorter device this sink takes results from")
    MemoryLimit = device_property(
        dtype=int, default_value=1 << 30, doc="bytes of results kept; least recently touched datasets evicted"
    )
    LavuePort = device_property(dtype=int, default_value=5555, doc="TCP port of the Lavue stream (-1: no stream)")
    LavueMaxRateHz = device_property(dtype=float, default_value=10.0, doc="live images per second and topic at most")
    ImageEventRateHz = device_property(
        dtype=float, default_value=2.0, doc="LatestImage and LatestSpectrum change events per second at most"
    )
    SpectrumResult = device_property(
        dtype=str, default_value="", doc="1D result shown as LatestSpectrum (empty: the first 1D array result)"
    )
    QueryPort = device_property(dtype=int, default_value=0, doc="TCP port of the query port (0: any free port)")
    QueryTokenFile = device_property(
        dtype=str, default_value="",
        doc="file (mode 600) holding the token every request to the query port must carry; empty: no token. "
        "The token itself is never a property (any Tango client reads properties); the Tango commands "
        "GetResult, GetSlice, GetMap are governed by Tango access control instead; reread at Init",
    )
    ScanFileDirectory = device_property(
        dtype=str, default_value="", doc="folder of the NeXus writer's scan files: evicted results are read there"
    )
    ScanFilePattern = device_property(
        dtype=str, default_value="{pipeline}_scan{scan:05}.h5", doc="file name pattern of the NeXus writer"
    )
    Pipeline = device_property(dtype=str, default_value="tangopipe", doc="pipeline name used in file names")
    ScalarAttributes = device_property(
        dtype=(str,),
        default_value=[],
        doc="scalar results shown as float attributes (e.g. center_sum), for Sardana measurement groups; "
        "name = result name with characters other than letters, digits and _ replaced by _; "
        "applied at Init",
    )

    StoredBytes = counter("StoredBytes", "B", "bytes of results held in memory")
    Datasets = counter("Datasets", "", "datasets (scan, stream) held")
    Evictions = counter("Evictions", "", "datasets evicted to stay under MemoryLimit")
    ThinnedResults = counter(
        "ThinnedResults", "results", "results of the scan being written whose arrays were let go (MemoryLimit); in the files"
    )
    TrimmedResults = counter(
        "TrimmedResults", "results", "results of the scan being written let go altogether (MemoryLimit); in the files"
    )
    RefusedQueries = counter(
        "RefusedQueries", "queries", "requests to the query port refused for a missing or wrong token (never answered)"
    )
    QueriesAnswered = counter("QueriesAnswered", "queries", "requests to the query port answered")

    engine: SinkEngine
    PUSHED_BY_DEVICE = ("LatestImage", "LatestScalars", "LatestSpectrum")  # at ImageEventRateHz

    def create_engine(self) -> Engine:
        token = ""
        if self.QueryTokenFile:
            try:
                token = read_token_file(self.QueryTokenFile)
            except ValueError as exc:
                raise ValueError(f"property QueryTokenFile: {exc}") from None
        self._make_scalar_attributes()
        self.publisher = None
        self._last_image_event = 0.0
        if self.LavuePort >= 0:
            from lavue_bridge import LavuePublisher

            self.publisher = LavuePublisher(self.BindAddress, self.LavuePort, max_rate_hz=self.LavueMaxRateHz)
        self.set_change_event("LatestImage", True, False)
        self.set_change_event("LatestScalars", True, False)
        self.set_change_event("LatestSpectrum", True, False)
        engine = SinkEngine(
            name=self.get_name(),
            memory_limit=self.MemoryLimit,
            publisher=self.publisher,
            bind=self.BindAddress,
            query_port=self.QueryPort,
            query_token=token,
        )
        if self.ScanFileDirectory:
            from pipelines.files import ScanFileIndex

            engine.queries.files = ScanFileIndex(self.ScanFileDirectory, self.ScanFilePattern, self.Pipeline)
        return engine

    def delete_device(self) -> None:
        super().delete_device()
        if getattr(self, "publisher", None) is not None:
            self.publisher.close()
            self.publisher = None

    def upstreams(self) -> list[tuple[str, str, str]]:
        return [("Upstream", self.Upstream, "DataEndpoint")]

    def connect_upstream(self, endpoints: list[str]) -> None:
        self.engine.connect(endpoints[0])

    def extra_event_value(self, name: str) -> Any:
        scalars = getattr(self, "scalar_attributes", {})
        if name in scalars:
            return self.latest_scalar(scalars[name])
        return None

    def _push_events(self) -> None:
        super()._push_events()
        now = time.monotonic()
        if self.ImageEventRateHz > 0 and now - self._last_image_event >= 1.0 / self.ImageEventRateHz:
            latest = self.engine.latest() if self.engine else None
            if latest is not None and latest.index != getattr(self, "_image_event_index", None):
                self._last_image_event = now
                self._image_event_index = latest.index
                try:
                    self.push_change_event("LatestImage", self.latest_image())
                    self.push_change_event("LatestScalars", self.latest_scalars())
                    self.push_change_event("LatestSpectrum", self.latest_spectrum())
                except tango.DevFailed:
                    pass

    # -- one attribute per configured scalar result --------------------------------------
    def _make_scalar_attributes(self) -> None:
        """One float attribute per name in ScalarAttributes (made again at Init)."""
        previous = getattr(self, "scalar_attributes", {})
        for attr_name in previous:
            self.remove_attribute(attr_name)
        self.scalar_attributes: dict[str, str] = {}
        taken = set(self.attribute_names())
        wanted = scalar_attribute_names(self.ScalarAttributes, taken)
        for attr_name, result in wanted.items():
            attr = tango.Attr(attr_name, tango.DevDouble, tango.AttrWriteType.READ)
            props = tango.UserDefaultAttrProp()
            props.set_description(
                f"scalar result {result!r} of the newest result holding it (NaN: none yet); "
                "LatestIndex says which frame; it may lag the acquisition by the pipeline's latency"
            )
            props.set_format("%.6g")
            attr.set_default_properties(props)
            self.add_attribute(attr, r_meth=self.read_scalar_attribute)
            self.scalar_attributes[attr_name] = result

    def read_scalar_attribute(self, attr: tango.Attribute) -> None:
        attr.set_value(self.latest_scalar(self.scalar_attributes.get(attr.get_name(), "")))

    def latest_scalar(self, name: str) -> float:
        """Scalar result ``name`` of the newest result (of any stream) that has it; NaN if none."""
        if self.engine is None:
            return math.nan
        newest = sorted(list(self.engine.store.latest.values()), key=lambda x: x.times.get("sorter", 0), reverse=True)
        for msg in newest:
            value = msg.scalars.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
        return math.nan

    # -- latest results ------------------------------------------------------------------
    @attribute(
        dtype=((np.float32,),), max_dim_x=8192, max_dim_y=8192, doc="newest image-like result (first 2D array)"
    )
    def LatestImage(self) -> np.ndarray:
        return self.latest_image()

    def latest_image(self) -> np.ndarray:
        image = self.engine.latest_image() if self.engine else None
        return np.zeros((0, 0), np.float32) if image is None else image.astype(np.float32, copy=False)

    @attribute(
        dtype=(np.float64,), max_dim_x=1 << 20,
        doc="newest 1D result (property SpectrumResult names it; else the first 1D array that is not an axis)",
    )  # fmt: skip
    def LatestSpectrum(self) -> np.ndarray:
        return self.latest_spectrum()

    def latest_spectrum(self) -> np.ndarray:
        latest = self.engine.latest() if self.engine else None
        wanted = self.SpectrumResult.strip()
        found = [
            (key, a) for key, a in (latest.arrays.items() if latest is not None else ())
            if a.ndim == 1 and a.dtype.kind in "biuf" and (not wanted or key == wanted)
        ]  # fmt: skip
        # bin centres ("radial", "azimuthal" of the azimuthal steps) are axes, not the spectrum
        found.sort(key=lambda item: item[0].endswith(SPECTRUM_AXES))
        return found[0][1].astype(np.float64, copy=False) if found else np.zeros(0, np.float64)

    @attribute(dtype=str, doc="scalar results of the newest frame, JSON: {name: value}")
    def LatestScalars(self) -> str:
        return self.latest_scalars()

    def latest_scalars(self) -> str:
        latest = self.engine.latest() if self.engine else None
        if latest is None:
            return "{}"
        return json.dumps({"scan": latest.scan, "index": latest.index, **latest.scalars})

    @attribute(dtype=int, doc="acquisition index of the newest result (-1: none yet)")
    def LatestIndex(self) -> int:
        return self.latest_index()

    def latest_index(self) -> int:
        latest = self.engine.latest() if self.engine else None
        return -1 if latest is None or latest.index is None else latest.index

    @attribute(dtype=str, doc="Lavue address host:port (lavue -s zmq -c HOST:PORT/TOPIC)")
    def LavueAddress(self) -> str:
        return self.publisher.address if self.publisher is not None else ""

    @attribute(dtype=(str,), max_dim_x=256, doc="Lavue topics (one per image-like result)")
    def LavueTopics(self) -> list[str]:
        return list(self.engine.topics) if self.engine else []

    @attribute(dtype=str, doc="query port for bulk answers (pipelines.query.SinkClient); same as DataEndpoint")
    def QueryEndpoint(self) -> str:
        return self.engine.endpoint if self.engine else ""

    @command(dtype_out=str, doc_out="datasets held: [{scan, stream, frames, gaps, bytes}], JSON")
    def ListDatasets(self) -> str:
        return json.dumps(self.engine.call(self.engine.store.describe), default=str)

    def _query(self, op: str, text: str) -> str:
        body = parse_json_property(f"{op} argument", text, {})
        if not isinstance(body, dict):
            raise ValueError(f"{op} takes a JSON object, got {text[:80]!r}")
        reply = self.engine.call(lambda: answer(self.engine.queries, m.Message(m.QUERY, body={**body, "op": op})))
        if "error" in reply.body:
            raise KeyError(reply.body["error"])
        too_big = [k for k, a in reply.arrays.items() if a.size > MAX_COMMAND_ELEMENTS]
        if too_big:
            raise ValueError(f"{too_big} too big for a Tango command; ask the query port {self.engine.endpoint}")
        out = {"scan": reply.scan, "index": reply.index, "stream": reply.stream, **reply.scalars}
        out.update({k: a.tolist() for k, a in reply.arrays.items()})
        return json.dumps(out, default=str)

    @command(dtype_in=str, doc_in='{"scan": 1, "stream": "main", "index": 5}', dtype_out=str, doc_out="result, JSON")
    def GetResult(self, text: str) -> str:
        return self._query("get", text)

    @command(dtype_in=str, doc_in='{"scan": 1, "stream": "main", "name": "roi_sum"}', dtype_out=str,
             doc_out='{"map": [[...]]} on the scan grid (StartScan scan_shape), NaN where not measured')
    def GetMap(self, text: str) -> str:
        return self._query("map", text)

    @command(dtype_in=str, doc_in='{"scan": 1, "stream": "main", "name": "roi_sum", "start": 0, "stop": 100}',
             dtype_out=str, doc_out='{"indices": [...], "values": [...]}')
    def GetSlice(self, text: str) -> str:
        return self._query("slice", text)


def scalar_attribute_names(results: list[str], existing: set[str] | frozenset[str] = frozenset()) -> dict[str, str]:
    """Attribute name -> result name for property ScalarAttributes; an error names the clash."""
    out: dict[str, str] = {}
    taken = {name.lower() for name in existing}
    for result in results:
        name = re.sub(r"[^A-Za-z0-9_]", "_", result.strip())
        if not name or not name[0].isalpha():
            name = f"r_{name}"
        if name.lower() in taken:
            raise ValueError(f"property ScalarAttributes: {result!r} gives attribute {name!r}, which the sink already has")
        if name.lower() in {n.lower() for n in out}:
            raise ValueError(
                f"property ScalarAttributes: {result!r} gives attribute {name!r} a second time; keep one"
            )
        out[name] = result
    return out


def main(args: list[str] | None = None) -> None:
    run((PipelineSink,), args=args)


if __name__ == "__main__":
    main()
