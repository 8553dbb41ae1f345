"""An in-process pipeline for writer tests: real engines and sockets, no Tango."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from pipelines.master import MasterEngine
from pipelines.sink import SinkEngine
from pipelines.sorter import SorterEngine
from pipelines.sources.simulator import SimulatedDetector
from pipelines.worker import WorkerEngine
from pipelines.writers import WriterEngine, WriterSettings

ROI_STEPS = [{"roi_stats": {"rois": {"corner": [0, 16, 0, 16]}, "bin": 4}}]


def wait_for(predicate, timeout: float = 60.0, what: str = "condition", poll: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


class MovingSample:
    """The simulated detector on a stage: each frame carries the positions of its point,
    as frames do when a Sardana hook reports them (``meta["positions"]``)."""

    def __init__(self, detector: SimulatedDetector, step_mm: float = 0.25):
        self.detector = detector
        self.step_mm = step_mm

    def position(self, index: int) -> dict[str, float]:
        return {"samx": round(index * self.step_mm, 6), "samy": round(1.0 - index * self.step_mm / 2, 6)}

    def frames(self, scan: Mapping[str, Any]) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
        for index, (frame, meta) in enumerate(self.detector.frames(scan)):
            yield frame, {**meta, "positions": self.position(index)}

    def stop(self) -> None:
        self.detector.stop()

    def describe(self) -> dict[str, Any]:
        return self.detector.describe()

    def frame(self, index: int) -> np.ndarray:
        return self.detector.frame(index)


class InProcessPipeline:
    """master -> workers of each group -> one sorter per group -> writers (+ a sink)."""

    def __init__(
        self,
        groups: Mapping[str, list] | None = None,
        writers: Mapping[str, tuple[str, WriterSettings]] | None = None,
        source: Any = None,
        sink_group: str | None = None,
        sink_memory: int = 1 << 30,
        workers: int = 2,
        capacity: int = 16,
        retry_s: float = 5.0,
        outbox_capacity: int | None = None,
        window: int = 256,
    ):
        self.source = source or SimulatedDetector(shape=[64, 48], rate_hz=0, frames=50)
        groups = dict(groups or {"main": ROI_STEPS})
        self.master = MasterEngine(self.source, groups=list(groups), queue_capacity=capacity)
        self.master.bind_now()
        self.engines: list[Any] = [self.master]
        self.sorters: dict[str, SorterEngine] = {}
        self.workers: list[WorkerEngine] = []
        try:
            for group, steps in groups.items():
                sorter = SorterEngine(name=f"sorter-{group}", gap_timeout_s=30.0, window=window)
                if outbox_capacity is not None:
                    sorter.outbox_capacity = outbox_capacity
                sorter.bind_now()
                self.engines.append(sorter)
                self.sorters[group] = sorter
                for i in range(workers):
                    worker = WorkerEngine(steps, name=f"{group}-{i}", group=group)
                    worker.start()
                    worker.connect(self.master.endpoint, sorter.collect_endpoint)
                    self.engines.append(worker)
                    self.workers.append(worker)
            wait_for(lambda: len(self.master.peers) == workers * len(groups), what="workers")
            self.writers: dict[str, WriterEngine] = {}
            for name, (group, settings) in (writers or {}).items():
                writer = WriterEngine(name=f"writer-{name}", settings=settings, retry_s=retry_s)
                self._consume(writer, group)
                self.writers[name] = writer
            self.sink: SinkEngine | None = None
            if sink_group is not None:
                self.sink = SinkEngine(memory_limit=sink_memory)
                self._consume(self.sink, sink_group)
                wait_for(lambda: bool(self.sink.endpoint), what="sink query port")
        except BaseException:
            self.stop()
            raise

    def _consume(self, consumer: Any, group: str) -> None:
        consumer.start()
        consumer.connect(self.sorters[group].endpoint)
        self.engines.append(consumer)
        before = len(self.sorters[group].consumers)
        wait_for(lambda: len(self.sorters[group].consumers) > before, what=f"{consumer.name} connected")

    def start_scan(self, frames: int, **meta: Any) -> Any:
        return self.master.start_scan(dict(meta, frames=frames))

    def end_scan(self, timeout: float = 120.0, wait_acquired: bool = True) -> None:
        """EndScan once every frame was acquired (or at once: the source is stopped)."""
        if wait_acquired:
            wait_for(lambda: not self.master.acquiring, timeout=timeout, what="acquisition")
        done = {name: w.scans_done for name, w in self.writers.items()}
        self.master.end_scan()
        wait_for(
            lambda: all(w.scans_done > done[n] for n, w in self.writers.items()),
            timeout=timeout,
            what="files closed",
        )

    def scan(self, frames: int, **meta: Any) -> dict[str, str]:
        """One scan; returns each writer's file (or folder)."""
        self.start_scan(frames, **meta)
        self.end_scan()
        return {name: w.last_file for name, w in self.writers.items()}

    def stop(self) -> None:
        for engine in reversed(self.engines):
            engine.stop()
