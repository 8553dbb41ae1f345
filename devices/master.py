"""PipelineMaster: the Tango face of :class:`pipelines.master.MasterEngine`."""

from __future__ import annotations

import json
from typing import Any

import tango
from tango import DevState
from tango.server import attribute, command, device_property, run

from pipelines.engine import Engine
from pipelines.master import MasterEngine, ScanError
from pipelines.positions import PointPositions, PointTriggeredSource, parse_point
from pipelines.sources import load_source

from .base import PipelineDevice, counter, parse_json_property


class PipelineMaster(PipelineDevice):
    """Ingests frames from a source, queues them and dispatches each to one worker per group."""

    Source = device_property(
        dtype=str,
        default_value='{"kind": "simulator"}',
        doc='frame source as JSON: {"kind": "simulator", "shape": [2048, 2048], "rate_hz": 50, ...}',
    )
    Groups = device_property(dtype=(str,), default_value=["main"], doc="worker groups; each frame goes to one worker of each")
    DataPort = device_property(dtype=int, default_value=0, doc="TCP port workers connect to (0: any free port)")
    MaxQueueFrames = device_property(dtype=int, default_value=64, doc="frames held at most (queued + in flight)")
    MaxQueueBytes = device_property(dtype=int, default_value=2 << 30, doc="bytes held at most")
    OverflowPolicy = device_property(
        dtype=str, default_value="block", doc="when the queue is full: block (source waits), drop_newest, drop_oldest"
    )
    HeartbeatTimeout = device_property(
        dtype=float, default_value=3.0, doc="seconds of silence after which a worker is lost and its frames re-sent"
    )
    UseSharedMemory = device_property(
        dtype=bool, default_value=True, doc="send frames to workers on this host through a shared-memory ring"
    )
    ShmSlots = device_property(
        dtype=int, default_value=0, doc="frames the shared-memory ring holds (0: automatic, bounded by /dev/shm)"
    )
    LastScanId = device_property(
        dtype=int, default_value=0,
        doc="kept up to date by the master: scans numbered by it go on after this one, also after a restart",
    )  # fmt: skip

    Workers = counter("Workers", "workers", "connected workers")
    Redispatched = counter("Redispatched", "frames", "frames sent again after their worker was lost")
    LostWorkers = counter("LostWorkers", "workers", "workers declared lost (missed heartbeats)")
    ScanFrames = counter("ScanFrames", "frames", "frames acquired in the current (or last) scan")
    ShmFrames = counter("ShmFrames", "frames", "frames sent through the shared-memory ring")
    ShmFallbacks = counter("ShmFallbacks", "frames", "frames sent over ZeroMQ because the ring was full")

    engine: MasterEngine

    def create_engine(self) -> Engine:
        source = load_source(parse_json_property("Source", self.Source, {"kind": "simulator"}))
        self.points = PointPositions()
        source = PointTriggeredSource(source, self.points, lambda: engine.scan_id)
        engine = MasterEngine(
            source,
            name=self.get_name(),
            groups=self.Groups,
            bind=self.BindAddress,
            port=self.DataPort,
            queue_capacity=self.MaxQueueFrames,
            queue_bytes=self.MaxQueueBytes,
            overflow_policy=self.OverflowPolicy,
            heartbeat_timeout_s=self.HeartbeatTimeout,
            use_shm=self.UseSharedMemory,
            shm_slots=self.ShmSlots,
        )
        engine.continue_numbering(self.LastScanId)
        return engine

    def _on_engine_event(self, event: str, payload: Any) -> None:
        if event == "scan_started" and isinstance(payload, int) and not isinstance(payload, bool):
            self._remember_scan(payload)

    def _remember_scan(self, scan_id: int) -> None:
        """Store the last scan id in the database, so a restarted master does not reuse it."""
        try:
            with tango.EnsureOmniThread():
                tango.Database().put_device_property(self.get_name(), {"LastScanId": [str(scan_id)]})
        except tango.DevFailed as exc:
            self.log.warning("could not store LastScanId %s: %s", scan_id, exc.args[0].desc if exc.args else exc)

    def upstreams(self) -> list[tuple[str, str, str]]:
        """A chained source names the upstream pipeline's sorter device."""
        upstream = getattr(self.engine.source, "upstream", "") if self.engine else ""
        return [("Source", upstream, "DataEndpoint")] if upstream else []

    def connect_upstream(self, endpoints: list[str]) -> None:
        self.engine.source.connect(endpoints[0])  # reconnects only when the endpoint changed

    @attribute(dtype=(str,), max_dim_x=1024, doc="names of the connected workers")
    def WorkerNames(self) -> list[str]:
        return self.engine.worker_names() if self.engine else []

    @attribute(dtype=str, doc="id of the current (or last) scan")
    def ScanId(self) -> str:
        return str(self.engine.scan_id) if self.engine and self.engine.scan_id is not None else ""

    @attribute(dtype=bool, doc="true while a scan is open (between StartScan and EndScan)")
    def ScanOpen(self) -> bool:
        return bool(self.engine and self.engine.scan_open)

    @attribute(dtype=bool, doc="true while the source is delivering frames")
    def Acquiring(self) -> bool:
        return bool(self.engine and self.engine.acquiring)

    @attribute(dtype=str, doc="the source's own counters (frames, faults by reason), JSON")
    def SourceStats(self) -> str:
        stats = getattr(self.engine.source, "stats", None) if self.engine else None
        return json.dumps(stats() if callable(stats) else {}, default=str)

    @attribute(dtype=str, doc="the source's last problem (a corrupt frame, a detector gone away)")
    def SourceLastError(self) -> str:
        return str(getattr(self.engine.source, "last_error", "") or "") if self.engine else ""

    @attribute(dtype=str, doc="scan metadata given to StartScan, JSON")
    def ScanMetadata(self) -> str:
        return json.dumps(self.engine.scan_meta if self.engine else {})

    def _require_engine(self) -> MasterEngine:
        if self.engine is None:
            raise ScanError(self.dev_status())
        return self.engine

    @command(
        dtype_in=str,
        doc_in='scan metadata, JSON: {"scan_id": 12, "frames": 300, "scan_dir": ..., "motors": ...} (all optional)',
        dtype_out=str,
        doc_out="the scan id",
    )
    def StartScan(self, text: str) -> str:
        meta: Any = parse_json_property("StartScan argument", text, {})
        if not isinstance(meta, dict):
            raise ScanError(f"StartScan takes a JSON object, got {text[:80]!r}")
        return str(self._require_engine().start_scan(meta))

    @command(
        dtype_in=str,
        doc_in='positions of one scan point, JSON: {"index": 3, "positions": {"mot01": 0.25}, "scan": 12}'
        " (scan optional: checked against the open scan)",
    )
    def AddPointMetadata(self, text: str) -> None:
        """Sent by a scan's point hook: frame ``index`` gets these positions (meta and files)."""
        engine = self._require_engine()
        index, positions, scan = parse_point(parse_json_property("AddPointMetadata argument", text, None))
        if not engine.scan_open:
            raise ScanError(f"point {index}: no scan is open; send StartScan first")
        if scan is not None and str(scan) != str(engine.scan_id):
            raise ScanError(f"point {index} is for scan {scan!r}, but the open scan is {engine.scan_id!r}")
        self.points.add(engine.scan_id, index, positions)

    @attribute(dtype=int, doc="scan points whose positions were reported (AddPointMetadata) this scan")
    def PointsReported(self) -> int:
        return self.points.count(self.engine.scan_id) if self.engine else 0

    @command(dtype_out=int, doc_out="frames acquired in the scan")
    def EndScan(self) -> int:
        return self._require_engine().end_scan()

    @command(doc_in="", doc_out="")
    def Stop(self) -> None:
        """End any open scan and stop dispatching (workers are let go)."""
        engine = self._require_engine()
        if engine.scan_open:
            engine.end_scan()
        engine.stop()

    @command(doc_in="", doc_out="")
    def Start(self) -> None:
        """Start dispatching again after Stop."""
        engine = self._require_engine()
        if not engine.running:
            engine.start()

    def dev_state(self) -> DevState:
        if self.engine is not None and not self.engine.running and not self._config_error:
            return DevState.OFF
        return super().dev_state()

    def dev_status(self) -> str:
        if self.engine is not None and not self.engine.running and not self._config_error:
            return "Stopped: run Start to accept workers and scans again"
        return super().dev_status()


def main(args: list[str] | None = None) -> None:
    run((PipelineMaster,), args=args)


if __name__ == "__main__":
    main()
