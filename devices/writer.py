"""PipelineWriter: the Tango face of :class:`pipelines.writers.WriterEngine`."""

from __future__ import annotations

from tango.server import attribute, command, device_property, run

from pipelines.engine import Engine
from pipelines.writers import SettingError, WriterEngine, WriterSettings

from .base import PipelineDevice, counter, parse_json_property

#: definition key -> the property that holds it (for error messages)
PROPERTY_OF = {
    "kind": "Kind",
    "directory": "Directory",
    "pattern": "FilePattern",
    "flush_s": "FlushPeriod",
    "compression": "Compression",
    "save_raw": "SaveRaw",
    "swmr": "Swmr",
    "results": "Results",
    "maps": "Maps",
    "every": "PlotEvery",
    "by": "CubeBy",
    "bins": "CubeBins",
}


class PipelineWriter(PipelineDevice):
    """Writes each scan of a sorter's ordered stream to files: NeXus/HDF5, TIFF, PNG plots or a cube."""

    Upstream = device_property(
        dtype=str, default_value="", doc="the sorter device this writer takes results from"
    )
    Kind = device_property(
        dtype=str,
        default_value="nexus",
        doc="nexus (HDF5, every result), tiff (images, one file per frame), graphs (PNG plots), cube (binned)",
    )
    Directory = device_property(dtype=str, default_value="data", doc="folder of the scan files")
    FilePattern = device_property(
        dtype=str,
        default_value="",
        doc="file name; fields {pipeline}, {scan}, {stream} (tiff: {name}, {index}; graphs: {name}); empty: the kind's",
    )
    Pipeline = device_property(dtype=str, default_value="tangopipe", doc="pipeline name used in file names")
    FlushPeriod = device_property(
        dtype=float, default_value=1.0, doc="seconds between flushes of the open file"
    )
    Compression = device_property(
        dtype=str,
        default_value="none",
        doc="nexus: none, gzip or bslz4 (bitshuffle-LZ4, readers need hdf5plugin)",
    )
    SaveRaw = device_property(
        dtype=bool, default_value=True, doc="nexus: write raw frames (result 'image' of a passthrough step)"
    )
    Swmr = device_property(
        dtype=bool, default_value=True, doc="nexus: readers may open the file while it is written"
    )
    Results = device_property(
        dtype=str,
        default_value="",
        doc="tiff, graphs, cube: results to write, comma-separated (empty: all that fit)",
    )
    Maps = device_property(
        dtype=str, default_value="", doc="graphs: scalar results plotted as maps, comma-separated"
    )
    PlotEvery = device_property(
        dtype=int, default_value=0, doc="graphs: also plot profiles of every N-th frame"
    )
    CubeBy = device_property(
        dtype=str, default_value="", doc="cube: scan variable to bin by (result, motor, metadata)"
    )
    CubeBins = device_property(
        dtype=str,
        default_value="",
        doc='cube: bin edges as JSON, [0, 1, 2] or {"start": 0, "stop": 2, "count": 2}',
    )
    RetryPeriod = device_property(
        dtype=float, default_value=5.0, doc="seconds between attempts to write again after a storage fault"
    )

    FramesWritten = counter("FramesWritten", "frames", "results written to files")
    LostRows = counter(
        "LostRows", "frames", "rows a killed writer had not flushed, written as gaps when it carried on with the file"
    )
    GapsWritten = counter("GapsWritten", "frames", "gap rows written (frames without a result)")
    ScansDone = counter("ScansDone", "scans", "scans closed")
    HeldMessages = counter(
        "HeldMessages", "messages", "messages held after a storage fault (no credit upstream)"
    )
    StorageFaults = counter("StorageFaults", "", "storage faults seen (full disk, unwritable folder)")

    engine: WriterEngine

    def create_engine(self) -> Engine:
        try:
            settings = WriterSettings(
                kind=self.Kind,
                directory=self.Directory,
                pattern=self.FilePattern,
                pipeline=self.Pipeline,
                flush_s=self.FlushPeriod,
                compression=self.Compression,
                save_raw=self.SaveRaw,
                swmr=self.Swmr,
                results=self.Results,
                maps=self.Maps,
                every=self.PlotEvery,
                by=self.CubeBy,
                bins=parse_json_property("CubeBins", self.CubeBins, None),
            )
        except SettingError as exc:
            raise ValueError(f"property {PROPERTY_OF.get(exc.key, exc.key)}: {exc.detail}") from None
        return WriterEngine(name=self.get_name(), settings=settings, retry_s=self.RetryPeriod)

    def upstreams(self) -> list[tuple[str, str, str]]:
        return [("Upstream", self.Upstream, "DataEndpoint")]

    def connect_upstream(self, endpoints: list[str]) -> None:
        self.engine.connect(endpoints[0])

    @attribute(dtype=str, doc="path of the file being written, or the last one")
    def LastFile(self) -> str:
        return self.engine.last_file if self.engine else ""

    @attribute(dtype=str, doc="the storage fault being retried (empty when writing works)")
    def StorageFault(self) -> str:
        return self.engine.fault if self.engine else ""

    @command(dtype_out=bool, doc_out="true when everything held could be written")
    def Retry(self) -> bool:
        """Try the held writes now (after freeing disk space or fixing the folder)."""
        return bool(self.engine.call(self.engine.retry, timeout=2.5)) if self.engine else False


def main(args: list[str] | None = None) -> None:
    run((PipelineWriter,), args=args)


if __name__ == "__main__":
    main()
