"""The Eiger stream through the whole engine: the simulated DCU's series becomes a
scan, its series end ends the scan, a corrupt frame is counted and the rest written."""

import h5py
import numpy as np

from pipelines.master import MasterEngine
from pipelines.sorter import SorterEngine
from pipelines.sources.eiger import EigerStreamSource
from pipelines.sources.eiger_simulator import SimulatedEigerDCU
from pipelines.worker import WorkerEngine
from pipelines.writers import WriterEngine
from tests.waiting import wait_for


def test_series_end_ends_the_scan_and_every_good_frame_is_written(tmp_path):
    dcu = SimulatedEigerDCU(port=0)
    source = EigerStreamSource(dcu.endpoint, timeout_s=30)
    master = MasterEngine(source, name="eiger-master")
    master.bind_now()
    sorter = SorterEngine(gap_timeout_s=2.0)
    sorter.bind_now()
    worker = WorkerEngine(["passthrough"], name="w")
    worker.start()
    worker.connect(master.endpoint, sorter.collect_endpoint)
    writer = WriterEngine(directory=str(tmp_path))
    writer.start()
    writer.connect(sorter.endpoint)
    engines = [master, sorter, worker, writer]
    try:
        wait_for(lambda: master.peers and sorter.consumers, what="wiring")
        frames = [np.full((64, 48), i, np.uint16) + np.arange(48, dtype=np.uint16) for i in range(30)]
        master.start_scan({"scan_id": 11})
        dcu.start_series(frames, encoding="bs16-lz4<", detail="basic", faults={7: "corrupt_blob"})
        wait_for(lambda: not master.scan_open, timeout=60, what="the series end to end the scan")
        dcu.wait(30)
        assert master.end_scan() == 29  # a late EndScan (a Sardana post-scan hook) is answered
        wait_for(lambda: writer.scans_done == 1, what="file closed")
        assert source.stats()["decode_errors"] == 1 and "frame 7" in source.last_error
        with h5py.File(writer.last_file) as f:
            images = f["entry/main/image"][:]
        expected = [frames[i] for i in range(30) if i != 7]
        assert len(images) == 29
        np.testing.assert_array_equal(images, np.stack(expected))
    finally:
        for engine in engines:
            engine.stop()
        dcu.close()
