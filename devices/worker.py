"""PipelineWorker: the Tango face of :class:`pipelines.worker.WorkerEngine`."""

from __future__ import annotations

import json
import os

from tango.server import attribute, command, device_property, run

from pipelines.engine import Engine
from pipelines.worker import WorkerEngine

from .base import PipelineDevice, counter, parse_json_property


class PipelineWorker(PipelineDevice):
    """Runs the processing chain named in its properties on frames from the master."""

    Upstream = device_property(dtype=str, default_value="", doc="the master device this worker takes frames from")
    Sorter = device_property(dtype=str, default_value="", doc="the sorter device this worker sends results to")
    Group = device_property(dtype=str, default_value="main", doc="worker group (one per chain of steps)")
    Steps = device_property(
        dtype=str, default_value="[]", doc='processing steps, JSON list: [{"roi_stats": {"bin": 4}}, ...]'
    )
    Credit = device_property(dtype=int, default_value=2, doc="frames this worker holds at most")
    UseSharedMemory = device_property(
        dtype=bool, default_value=True, doc="read frames from the master's shared-memory ring when on its host"
    )
    NumbaThreads = device_property(
        dtype=int, default_value=0, doc="threads of the numba kernels in this worker (0: numba's default, all cores)"
    )

    ProcessingErrors = counter("ProcessingErrors", "frames", "frames whose processing failed (sent on as gaps)")
    ConfigVersion = counter("ConfigVersion", "", "version of the processing configuration in use")

    engine: WorkerEngine

    def create_engine(self) -> Engine:
        if self.NumbaThreads > 0:
            import numba

            numba.set_num_threads(min(self.NumbaThreads, numba.config.NUMBA_NUM_THREADS))
        steps = parse_json_property("Steps", self.Steps, [])
        return WorkerEngine(
            steps, name=self.get_name(), group=self.Group, credit=self.Credit, use_shm=self.UseSharedMemory
        )

    def upstreams(self) -> list[tuple[str, str, str]]:
        return [("Upstream", self.Upstream, "DataEndpoint"), ("Sorter", self.Sorter, "CollectEndpoint")]

    def connect_upstream(self, endpoints: list[str]) -> None:
        self.engine.connect(endpoints[0], endpoints[1])

    @attribute(dtype=str, doc="the step chain in use, JSON")
    def StepChain(self) -> str:
        return json.dumps(self.engine.chain.specs if self.engine else [])

    @attribute(dtype=str, doc="the last processing error")
    def LastError(self) -> str:
        return self.engine.last_error if self.engine else ""

    @command(dtype_in=str, doc_in="new step chain, JSON list", dtype_out=int, doc_out="new configuration version")
    def Reconfigure(self, text: str) -> int:
        """Apply a new step chain from the next frame on (validated first)."""
        steps = parse_json_property("Reconfigure argument", text, None)
        return self.engine.reconfigure(steps)


def main(args: list[str] | None = None) -> None:
    # idle OpenMP threads of numba kernels must not spin: workers share their host
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    run((PipelineWorker,), args=args)


if __name__ == "__main__":
    main()
