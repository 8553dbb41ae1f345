"""Restarts of a stage in the middle of a scan, engine by engine (real sockets, no Tango).

A consumer (sink, writer) killed and started again gets what it had not confirmed,
then gap records for exactly the results it missed; a sorter started again carries
on where its consumers are; a master started again ends its earlier scan; a NeXus
file left by a killed writer is continued, rows lost with it recorded as gaps.
"""

import os
import subprocess
import sys
import time

import h5py
import numpy as np
import zmq

from pipelines import message as m
from pipelines.consumer import ConsumerEngine
from pipelines.sorter import ReorderBuffer, SorterEngine
from pipelines.transport import new_identity, send
from pipelines.writers.nexus import NexusScanFile
from tests.waiting import wait_for


class Recorder(ConsumerEngine):
    """A consumer that keeps what it handles."""

    def __init__(self, name: str = "recorder", **kwargs):
        super().__init__(name, **kwargs)
        self.seen: list[m.Message] = []

    def handle(self, msg: m.Message) -> None:
        self.seen.append(msg)

    def kill(self) -> None:
        """Stop as a killed process would: no goodbye, nothing confirmed any more."""
        self.teardown = self.link.close  # type: ignore[method-assign]
        self.stop()

    def indices(self, kind: str = m.RESULT) -> list[int]:
        return [x.index for x in self.seen if x.kind == kind]


class Feeder:
    """Pushes results to a sorter's collect port, as a worker does."""

    def __init__(self, endpoint: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.routing_id = new_identity("feeder")
        self.sock.connect(endpoint)

    def send(self, kind: str, scan, index=None, **fields) -> None:
        msg = m.Message(kind, scan=scan, index=index, stream="main", **fields)
        if kind == m.RESULT:
            msg.arrays["value"] = np.full(4, index, dtype=np.float32)
        send(self.sock, msg)

    def close(self) -> None:
        self.sock.close(0)


def results(consumer: Recorder) -> int:
    return len(consumer.indices()) + len(consumer.indices(m.GAP))


def test_a_consumer_killed_and_restarted_gets_exactly_what_it_missed_as_gaps():
    sorter = SorterEngine(consumer_timeout_s=1.0, gap_timeout_s=5.0)
    sorter.bind_now()
    feeder = Feeder(sorter.collect_endpoint)
    first = Recorder("demo/writer/1")
    first.start()
    first.connect(sorter.endpoint)
    try:
        wait_for(lambda: sorter.consumer_names() == ["demo/writer/1"], what="consumer")
        feeder.send(m.SCAN_START, 7, meta={"title": "restart"})
        for i in range(20):
            feeder.send(m.RESULT, 7, i)
        wait_for(lambda: len(first.indices()) == 20, what="first 20 results")
        first.kill()
        for i in range(20, 50):  # sent before the sorter notices: kept for it, sent again
            feeder.send(m.RESULT, 7, i)
        wait_for(lambda: sorter.counters()["ConsumersAway"] == 1, what="consumer noticed gone")
        assert sorter.health.name == "ALARM" and "demo/writer/1" in sorter.status
        for i in range(50, 60):  # sorted while it is known to be away: lost for it
            feeder.send(m.RESULT, 7, i)
        wait_for(lambda: sorter.counters()["LostForConsumers"] == 10, what="losses counted")
        second = Recorder("demo/writer/1")
        second.start()
        second.connect(sorter.endpoint)
        wait_for(lambda: sorter.counters()["ConsumersAway"] == 0, what="consumer back")
        for i in range(60, 70):
            feeder.send(m.RESULT, 7, i)
        feeder.send(m.SCAN_END, 7, body={"frames": 70})
        wait_for(lambda: any(x.kind == m.SCAN_END for x in second.seen), what="scan end at the restarted consumer")
        starts = [x for x in second.seen if x.kind == m.SCAN_START]
        assert len(starts) == 1 and starts[0].body.get("resumed") and starts[0].meta["title"] == "restart"
        got, gaps = set(first.indices()) | set(second.indices()), set(second.indices(m.GAP))
        assert gaps == set(range(50, 60)) and got == set(range(70)) - gaps
        assert sorter.consumer_losses == {"demo/writer/1": {"7": [[50, 60]]}}
        assert all("demo/writer/1 was away" in x.body["reason"] for x in second.seen if x.kind == m.GAP)
        wait_for(lambda: sorter.counters()["ConsumersAway"] == 0, what="alarm cleared")
        second.stop()
    finally:
        feeder.close()
        sorter.stop()


def test_a_restarted_sorter_carries_on_where_its_consumer_is():
    old = SorterEngine(gap_timeout_s=1.0)
    old.bind_now()
    feeder = Feeder(old.collect_endpoint)
    consumer = Recorder("demo/sink/1")
    consumer.start()
    consumer.connect(old.endpoint)
    new = None
    try:
        wait_for(lambda: old.consumer_names() == ["demo/sink/1"], what="consumer")
        feeder.send(m.SCAN_START, 3)
        for i in range(10):
            feeder.send(m.RESULT, 3, i)
        wait_for(lambda: len(consumer.indices()) == 10, what="10 results")
        old.stop()  # its state is gone, as after kill -9
        feeder.close()
        new = SorterEngine(gap_timeout_s=1.0)
        new.bind_now()
        consumer.connect(new.endpoint)  # what the device does when the endpoint in the database changes
        wait_for(lambda: new.consumer_names() == ["demo/sink/1"], what="consumer on the new sorter")
        feeder = Feeder(new.collect_endpoint)
        for i in (8, 9, 12, 13, 14):  # 8, 9 sent again by a worker; 10, 11 lost in the old sorter
            feeder.send(m.RESULT, 3, i)
        feeder.send(m.SCAN_END, 3, body={"frames": 15})
        wait_for(lambda: any(x.kind == m.SCAN_END for x in consumer.seen), what="scan end")
        assert consumer.indices() == [*range(10), 12, 13, 14]
        assert consumer.indices(m.GAP) == [10, 11]  # exactly what was lost
        assert [x.kind for x in consumer.seen].count(m.SCAN_START) == 1
        assert new.reorder.late == 2  # 8 and 9 were already delivered
    finally:
        feeder.close()
        consumer.stop()
        if new is not None:
            new.stop()


def test_a_scan_of_a_restarted_master_is_ended_with_what_it_has():
    reorder = ReorderBuffer(gap_timeout_s=60)
    out = reorder.push(m.Message(m.SCAN_START, scan=4, stream="main", meta={"master_epoch": "a"}))
    for i in (0, 1, 3):
        out += reorder.push(m.Message(m.RESULT, scan=4, index=i, stream="main"))
    out += reorder.push(m.Message(m.SCAN_START, scan=5, stream="main", meta={"master_epoch": "b"}))
    out += reorder.push(m.Message(m.RESULT, scan=5, index=0, stream="main"))
    kinds = [(x.kind, x.scan, x.index) for x in out]
    assert kinds == [
        (m.SCAN_START, 4, None), (m.RESULT, 4, 0), (m.RESULT, 4, 1), (m.GAP, 4, 2), (m.RESULT, 4, 3),
        (m.SCAN_END, 4, None), (m.SCAN_START, 5, None), (m.RESULT, 5, 0),
    ]  # fmt: skip
    assert out[5].body["aborted"] and out[5].body["frames"] == 4
    assert reorder.aborted_scans == 1 and reorder.missing == 1
    # the same master (same epoch) starting another scan does not end the first
    reorder = ReorderBuffer(gap_timeout_s=60)
    reorder.push(m.Message(m.SCAN_START, scan=1, stream="main", meta={"master_epoch": "a"}))
    reorder.push(m.Message(m.SCAN_START, scan=2, stream="main", meta={"master_epoch": "a"}))
    assert reorder.aborted_scans == 0


KILLED_WRITER = """
import os, sys
import numpy as np
from pipelines import message as m
from pipelines.writers.nexus import NexusScanFile
start = m.Message(m.SCAN_START, scan=9, stream="main", meta={"scan_uid": "u9"})
f = NexusScanFile(sys.argv[1], start, "demo")
for i in range(40):
    r = m.Message(m.RESULT, scan=9, index=i, stream="main")
    r.arrays["image"] = np.full((8, 8), i, dtype=np.uint16)
    r.scalars["total"] = float(i)
    f.write(r)
    if i == 29:
        f.flush(force=True)
os.kill(os.getpid(), 9)
"""


def test_a_nexus_file_left_by_a_killed_writer_is_continued(tmp_path):
    path = tmp_path / "scan_9.h5"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], cwd=os.getcwd(), timeout=120)
    assert proc.returncode == -9
    start = m.Message(m.SCAN_START, scan=9, stream="main", meta={"scan_uid": "u9"}, body={"resumed": True})
    file = NexusScanFile.resume(path, start)
    assert file.rows == 30 and file.written == 30  # what was flushed survived
    for i in range(35, 50):  # the restarted writer gets results from 35 on
        r = m.Message(m.RESULT, scan=9, index=i, stream="main")
        r.arrays["image"] = np.full((8, 8), i, dtype=np.uint16)
        r.scalars["total"] = float(i)
        file.write(r)
    assert file.lost_rows == [30, 31, 32, 33, 34]
    file.close(m.Message(m.SCAN_END, scan=9, stream="main", meta={"frames": 50}))
    with h5py.File(path, "r") as f:
        data = f["entry/main"]
        valid = data["valid"][:]
        assert list(np.flatnonzero(~valid)) == [30, 31, 32, 33, 34]
        assert list(f["entry/gaps"][:]) == [30, 31, 32, 33, 34]
        assert list(data["index"][:]) == list(range(50))
        assert [data["total"][i] for i in (0, 29, 35, 49)] == [0.0, 29.0, 35.0, 49.0]
        assert f["entry/frames_written"][()] == 45
    other = m.Message(m.SCAN_START, scan=10, stream="main", body={"resumed": True})
    try:
        NexusScanFile.resume(path, other)
    except FileExistsError as exc:
        assert "scan 9" in str(exc)
    else:
        raise AssertionError("a file of another scan was resumed")


def test_scan_numbering_goes_on_after_a_restart():
    from pipelines.master import MasterEngine
    from pipelines.sources.simulator import SimulatedDetector

    master = MasterEngine(SimulatedDetector(shape=[8, 8], frames=1))
    master.continue_numbering(41)
    master.bind_now()
    try:
        assert master.start_scan({}) == 42
        time.sleep(0.1)
        master.end_scan()
    finally:
        master.stop()
