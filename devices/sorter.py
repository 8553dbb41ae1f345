"""PipelineSorter: the Tango face of :class:`pipelines.sorter.SorterEngine`."""

from __future__ import annotations

import json

from tango.server import attribute, device_property, run

from pipelines.engine import Engine
from pipelines.sorter import SorterEngine

from .base import PipelineDevice, counter


class PipelineSorter(PipelineDevice):
    """Fans in results from all workers of a group and restores acquisition order."""

    Upstream = device_property(
        dtype=str, default_value="", doc="the master whose worker group feeds this sorter (for the topology view)"
    )
    CollectPort = device_property(dtype=int, default_value=0, doc="TCP port workers push results to (0: any)")
    DataPort = device_property(dtype=int, default_value=0, doc="TCP port consumers take ordered results from (0: any)")
    ReorderWindow = device_property(dtype=int, default_value=256, doc="results buffered at most while waiting for an index")
    GapTimeout = device_property(dtype=float, default_value=10.0, doc="seconds before a missing index becomes a gap")
    OutboxCapacity = device_property(dtype=int, default_value=64, doc="messages held per consumer before backpressure")
    BatchSize = device_property(dtype=int, default_value=1, doc="results sent downstream per message at most")
    BatchLatencyMs = device_property(
        dtype=float, default_value=20.0, doc="a partial batch is sent once its oldest result waited this long"
    )

    MissingFrames = counter("MissingFrames", "frames", "indices given up on (gap records sent downstream)")
    Duplicates = counter("Duplicates", "results", "duplicate results dropped (frames dispatched twice)")
    Backlog = counter("Backlog", "messages", "ordered messages waiting for the slowest consumer")
    Consumers = counter("Consumers", "", "connected consumers (sink, writers)")
    LostForConsumers = counter(
        "LostForConsumers", "results", "results a consumer did not get because it was away (see ConsumerLosses)"
    )
    ConsumersAway = counter("ConsumersAway", "", "consumers that went away and are waited for (restart them)")
    AbortedScans = counter("AbortedScans", "scans", "scans ended early because their master restarted")

    engine: SorterEngine

    def create_engine(self) -> Engine:
        return SorterEngine(
            name=self.get_name(),
            bind=self.BindAddress,
            collect_port=self.CollectPort,
            data_port=self.DataPort,
            window=self.ReorderWindow,
            gap_timeout_s=self.GapTimeout,
            outbox_capacity=self.OutboxCapacity,
            batch_size=self.BatchSize,
            batch_latency_ms=self.BatchLatencyMs,
        )

    @attribute(dtype=str, doc="where workers push their results (ZeroMQ endpoint)")
    def CollectEndpoint(self) -> str:
        return self.engine.collect_endpoint if self.engine else ""

    @attribute(dtype=(str,), max_dim_x=256, doc="names of the connected consumers")
    def ConsumerNames(self) -> list[str]:
        return self.engine.consumer_names() if self.engine else []

    @attribute(dtype=str, doc="the last missing (scan, index) pairs, JSON")
    def MissingIndices(self) -> str:
        return json.dumps(list(self.engine.reorder.missing_indices)[-100:] if self.engine else [])

    @attribute(dtype=str, doc="results each consumer missed while away: {consumer: {scan: [[first, stop), ...]]}, JSON")
    def ConsumerLosses(self) -> str:
        return json.dumps(self.engine.consumer_losses if self.engine else {})


def main(args: list[str] | None = None) -> None:
    run((PipelineSorter,), args=args)


if __name__ == "__main__":
    main()
