"""PipelineWriter: the Tango face of :class:`pipelines.writers.WriterEngine`."""

from __future__ import annotations

from tango.server import attribute, device_property, run

from pipelines.engine import Engine
from pipelines.writers import WriterEngine

from .base import PipelineDevice, counter


class PipelineWriter(PipelineDevice):
    """Writes each scan of a sorter's ordered stream to a NeXus/HDF5 file."""

    Upstream = device_property(dtype=str, default_value="", doc="the sorter device this writer takes results from")
    Directory = device_property(dtype=str, default_value="data", doc="folder of the scan files")
    FilePattern = device_property(
        dtype=str, default_value="{pipeline}_scan{scan:05}.h5", doc="file name; fields {pipeline}, {scan}, {stream}"
    )
    Pipeline = device_property(dtype=str, default_value="tangopipe", doc="pipeline name used in file names")
    FlushPeriod = device_property(dtype=float, default_value=1.0, doc="seconds between flushes of the open file")

    FramesWritten = counter("FramesWritten", "frames", "results written to files")
    GapsWritten = counter("GapsWritten", "frames", "gap rows written (frames without a result)")
    ScansDone = counter("ScansDone", "scans", "scans closed")

    engine: WriterEngine

    def create_engine(self) -> Engine:
        return WriterEngine(
            name=self.get_name(),
            directory=self.Directory,
            pattern=self.FilePattern,
            pipeline=self.Pipeline,
            flush_s=self.FlushPeriod,
        )

    def upstreams(self) -> list[tuple[str, str, str]]:
        return [("Upstream", self.Upstream, "DataEndpoint")]

    def connect_upstream(self, endpoints: list[str]) -> None:
        self.engine.connect(endpoints[0])

    def event_attributes(self) -> list[str]:
        return [*super().event_attributes(), "FramesWritten", "ScansDone"]

    @attribute(dtype=str, doc="path of the file being written, or the last one")
    def LastFile(self) -> str:
        return self.engine.last_file if self.engine else ""


def main(args: list[str] | None = None) -> None:
    run((PipelineWriter,), args=args)


if __name__ == "__main__":
    main()
