"""The engines wired with real ZeroMQ sockets, in one process (no Tango)."""

import time

import h5py
import numpy as np
import pytest
import zmq

from pipelines import message as m
from pipelines.engine import Health
from pipelines.master import MasterEngine
from pipelines.sink import SinkEngine
from pipelines.sorter import SorterEngine
from pipelines.sources.simulator import SimulatedDetector
from pipelines.steps import load_step
from pipelines.transport import UpstreamLink, receive, send
from pipelines.worker import WorkerEngine
from pipelines.writers import WriterEngine
from tests.waiting import wait_for

STEPS = [{"roi_stats": {"rois": {"corner": [0, 16, 0, 16]}, "bin": 4}}]



class Pipeline:
    def __init__(self, tmp_path, workers=2, policy="block", capacity=16, rate_hz=0.0, heartbeat_timeout_s=3.0):
        self.source = SimulatedDetector(shape=[64, 48], rate_hz=rate_hz, frames=50)
        self.master = MasterEngine(self.source, queue_capacity=capacity, overflow_policy=policy,
                                   heartbeat_timeout_s=heartbeat_timeout_s)
        self.master.bind_now()
        self.sorter = SorterEngine(gap_timeout_s=2.0)
        self.sorter.bind_now()
        self.workers = []
        for i in range(workers):
            self.add_worker(f"w{i}")
        self.sink = SinkEngine()
        self.writer = WriterEngine(directory=str(tmp_path))
        for consumer in (self.sink, self.writer):
            consumer.start()
            consumer.connect(self.sorter.endpoint)
        wait_for(lambda: len(self.sorter.consumers) == 2, what="consumers")

    def add_worker(self, name, steps=STEPS, credit=2):
        worker = WorkerEngine(steps, name=name, credit=credit)
        worker.start()
        worker.connect(self.master.endpoint, self.sorter.collect_endpoint)
        self.workers.append(worker)
        wait_for(lambda: name in self.master.worker_names(), what=f"worker {name}")
        return worker

    def scan(self, frames, meta=None):
        done = self.writer.scans_done
        self.master.start_scan(dict(meta or {}, frames=frames))
        wait_for(lambda: not self.master.acquiring, what="acquisition")
        self.master.end_scan()
        wait_for(lambda: self.writer.scans_done > done, what="file closed")
        return self.writer.last_file

    def stop(self):
        for engine in (self.master, *self.workers, self.sorter, self.sink, self.writer):
            engine.stop()


@pytest.fixture
def pipeline(tmp_path):
    p = Pipeline(tmp_path)
    yield p
    p.stop()


def test_every_frame_processed_once_in_order_and_written(pipeline):
    path = pipeline.scan(120, {"sample": "LaB6", "energy_keV": 12.4})
    step = load_step(STEPS[0])
    with h5py.File(path) as f:
        data = f["entry/main"]
        assert list(data["index"][:]) == list(range(120))
        assert data["valid"][:].all()
        for i in (0, 1, 57, 119):
            expected = step(pipeline.source.frame(i), {})
            assert data["corner_sum"][i] == expected["corner_sum"]
            np.testing.assert_array_equal(data["binned"][i], expected["binned"])
        assert f["entry/scan/sample"][()] == b"LaB6"
        assert f["entry/scan/energy_keV"][()] == 12.4
        assert f["entry/frames_written"][()] == 120
    assert sum(w.stats.frames_out for w in pipeline.workers) == 120
    assert all(w.stats.frames_out > 0 for w in pipeline.workers)
    assert pipeline.sorter.reorder.duplicates == 0 and pipeline.sorter.reorder.missing == 0
    latest = pipeline.sink.latest("main")
    assert latest.index == 119
    assert latest.scalars["corner_sum"] == step(pipeline.source.frame(119), {})["corner_sum"]


def test_a_running_worker_says_which_scan_it_processes(pipeline):
    pipeline.scan(20)
    first = pipeline.master.scan_id
    # straight after: the workers are still RUNNING (idle only 2 s after their last result)
    assert all(w.health is Health.RUNNING for w in pipeline.workers)
    second = pipeline.master.start_scan({"frames": 40})
    assert second != first
    wait_for(lambda: all(w.status == f"Processing scan {second}" for w in pipeline.workers), what="status")
    wait_for(lambda: not pipeline.master.acquiring, what="acquisition")
    pipeline.master.end_scan()


def _raw_socket(kind, endpoint):
    sock = zmq.Context.instance().socket(kind)
    sock.linger = 0
    sock.connect(endpoint)
    return sock


MALFORMED = [
    [b"not json"],
    [b'{"protocol": "tangopipe/1", "kind": "result", "scan": 1, "index": -5}'],
    [b'{"protocol": "tangopipe/1", "kind": "result", "scan": 1, "index": 1, '
     b'"buffers": [{"name": "a", "dtype": "<f4", "shape": [1000]}]}', b"short"],
    [b'{"protocol": "tangopipe/1", "kind": "warp"}'],
]


def test_malformed_messages_on_every_port_are_counted_and_the_scan_goes_on(pipeline):
    ports = [
        (pipeline.master, zmq.DEALER, pipeline.master.endpoint),
        (pipeline.sorter, zmq.DEALER, pipeline.sorter.collect_endpoint),
        (pipeline.sorter, zmq.DEALER, pipeline.sorter.endpoint),
    ]
    for engine, kind, endpoint in ports:
        before = engine.stats.bad.total
        sock = _raw_socket(kind, endpoint)
        for parts in MALFORMED:
            sock.send_multipart(parts)
        wait_for(lambda e=engine, b=before: e.stats.bad.total == b + len(MALFORMED), what="bad counted")
        sock.close(0)
    path = pipeline.scan(40)
    with h5py.File(path) as f:
        assert f["entry/main/valid"][:].sum() == 40


def test_frames_of_a_silent_worker_are_dispatched_again(tmp_path):
    p = Pipeline(tmp_path, workers=1, heartbeat_timeout_s=0.5)
    try:
        ghost = UpstreamLink(zmq.Context.instance(), "ghost", "main", credit=5)
        ghost.connect(p.master.endpoint)  # says hello, takes 5 frames, never answers
        wait_for(lambda: "ghost" in p.master.worker_names(), what="ghost")
        path = p.scan(60)
        with h5py.File(path) as f:
            assert list(f["entry/main/index"][:]) == list(range(60))
            assert f["entry/main/valid"][:].all()
        assert p.master.redispatched >= 1 and p.master.lost_workers == 1
        ghost.close()
    finally:
        p.stop()


def test_worker_added_mid_scan_gets_frames(tmp_path):
    p = Pipeline(tmp_path, workers=1, rate_hz=100)
    try:
        p.master.start_scan({"frames": 150})
        wait_for(lambda: p.master.scan_frames > 20, what="first frames")
        late = p.add_worker("late")
        wait_for(lambda: not p.master.acquiring, what="acquisition")
        p.master.end_scan()
        wait_for(lambda: p.writer.scans_done == 1)
        assert late.stats.frames_out > 0
        assert p.writer.frames_written == 150
    finally:
        p.stop()


def test_drop_newest_counts_every_drop_and_writes_gaps(tmp_path):
    p = Pipeline(tmp_path, workers=0, policy="drop_newest", capacity=5)
    try:
        p.master.start_scan({"frames": 30})
        wait_for(lambda: not p.master.acquiring)
        assert p.master.stats.dropped == 25  # no worker: 5 held, 25 dropped
        p.add_worker("w")
        p.master.end_scan()
        wait_for(lambda: p.writer.scans_done == 1)
        with h5py.File(p.writer.last_file) as f:
            valid = f["entry/main/valid"][:]
        assert valid.sum() == 5 and len(valid) == 30
        assert p.writer.gaps_written == 25 and p.sorter.reorder.missing == 25
    finally:
        p.stop()


def test_block_policy_loses_nothing_with_a_small_queue(tmp_path):
    p = Pipeline(tmp_path, workers=1, policy="block", capacity=2)
    try:
        path = p.scan(80)
        with h5py.File(path) as f:
            assert f["entry/main/valid"][:].sum() == 80
        assert p.master.stats.dropped == 0
    finally:
        p.stop()


def test_credit_limits_frames_held_by_each_worker(tmp_path):
    p = Pipeline(tmp_path, workers=0)
    try:
        ctx = zmq.Context.instance()
        slow = UpstreamLink(ctx, "slow", "main", credit=3)
        slow.connect(p.master.endpoint)
        wait_for(lambda: "slow" in p.master.worker_names())
        p.master.start_scan({"frames": 10})
        received = []
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # shorter than the heartbeat timeout
            if slow.sock.poll(100):
                received.append(receive(slow.sock)[1])
        kinds = [x.kind for x in received]
        assert kinds.count(m.FRAME) == 2 and kinds[0] == m.SCAN_START  # 3 credits: start + 2 frames
        slow.grant(1)  # one more credit, nothing finished
        assert slow.sock.poll(2000)
        assert receive(slow.sock)[1].index == 2
        # leaving without finishing anything: the start and frames 0-2 go to another worker
        send(slow.sock, m.control(m.BYE))
        slow.close()
        p.add_worker("w")
        wait_for(lambda: not p.master.acquiring)
        p.master.end_scan()
        wait_for(lambda: p.writer.scans_done == 1)
        assert p.writer.frames_written == 10
    finally:
        p.stop()


def test_sorter_batches_results_downstream_without_changing_them(tmp_path):
    p = Pipeline(tmp_path, workers=2)
    p.sorter.batch_size = 8
    try:
        path = p.scan(100)
        with h5py.File(path) as f:
            assert list(f["entry/main/index"][:]) == list(range(100)) and f["entry/main/valid"][:].all()
        assert p.sorter.batches_sent < 2 * 102 / 2  # two consumers, far fewer messages than results
    finally:
        p.stop()


def test_sink_answers_queries_from_memory(pipeline):
    from pipelines.query import QueryError, SinkClient

    pipeline.scan(12, {"scan_id": 5, "scan_shape": [3, 4], "snake": True})
    client = SinkClient(pipeline.sink.endpoint)
    try:
        (ds,) = client.datasets()
        assert (ds["scan"], ds["stream"], ds["frames"]) == (5, "main", 12)
        step = load_step(STEPS[0])
        got = client.get(5, "main", 7)
        expected = step(pipeline.source.frame(7), {})
        assert got.index == 7 and got.scalars["corner_sum"] == expected["corner_sum"]
        np.testing.assert_array_equal(got.arrays["binned"], expected["binned"])
        indices, values = client.slice(5, "main", "binned", 2, 5)
        assert list(indices) == [2, 3, 4] and values.shape == (3, 16, 12)
        grid = client.map(5, "main", "corner_sum")
        sums = [step(pipeline.source.frame(i), {})["corner_sum"] for i in range(12)]
        assert grid.shape == (3, 4)
        assert grid[0].tolist() == sums[0:4]
        assert grid[1].tolist() == sums[4:8][::-1]  # snake: the second row runs backwards
        assert client.latest("main").index == 11
        with pytest.raises(QueryError, match="no dataset for scan 6"):
            client.get(6, "main", 0)
        with pytest.raises(QueryError, match="unknown query 'drop_tables'"):
            client.ask("drop_tables")
        before = pipeline.sink.stats.bad.total
        client.sock.send_multipart([b"not a query"])
        wait_for(lambda: pipeline.sink.stats.bad.total == before + 1, what="bad query counted")
        assert client.get(5, "main", 0).index == 0  # still answering
    finally:
        client.close()


def stall_on_index(frame, meta, *, index: int = 5, seconds: float = 3.0):
    """A step that answers one index late (after the sorter gave up on it)."""
    if meta["index"] == index:
        time.sleep(seconds)
    return {"first": int(frame.flat[0])}


def test_a_step_that_never_answers_one_index_gives_one_gap(tmp_path):
    p = Pipeline(tmp_path, workers=0)
    p.sorter.reorder.gap_timeout_s = 1.0
    try:
        for name in ("a", "b"):  # whichever gets index 5 holds it for 4 s; the other goes on
            p.add_worker(name, steps=[{"tests.test_flow:stall_on_index": {"index": 5, "seconds": 4.0}}], credit=1)
        path = p.scan(40, {"rate_hz": 20})
        with h5py.File(path) as f:
            valid = f["entry/main/valid"][:]
        assert len(valid) == 40 and not valid[5] and valid.sum() == 39
        assert p.sorter.reorder.missing == 1 and list(p.sorter.reorder.missing_indices) == [(1, 5)]
        assert p.writer.gaps_written == 1
        reorder = p.sorter.reorder  # the late answer is dropped (late, or for a scan already closed)
        wait_for(lambda: reorder.late + reorder.duplicates == 1, what="the late answer dropped")
    finally:
        p.stop()


class SlowWriter(WriterEngine):
    def handle(self, msg):
        if msg.kind == m.RESULT:
            time.sleep(0.03)
        super().handle(msg)


@pytest.mark.parametrize("policy", ["block", "drop_newest", "drop_oldest"])
def test_a_slow_writer_backpressures_to_the_master_policy(tmp_path, policy):
    p = Pipeline(tmp_path, workers=2, policy=policy, capacity=4)
    p.writer.stop()
    p.writer = SlowWriter(directory=str(tmp_path / "slow"))
    p.writer.start()
    p.writer.connect(p.sorter.endpoint)
    p.sorter.outbox_capacity = 4
    try:
        wait_for(lambda: len(p.sorter.consumers) == 2)
        path = p.scan(150)  # the source runs flat out, the writer takes ~30 ms a frame
        with h5py.File(path) as f:
            valid = f["entry/main/valid"][:]
        assert len(valid) == 150
        dropped = p.master.stats.dropped
        if policy == "block":
            assert dropped == 0 and valid.all()
        else:
            assert dropped > 0, "the queue must have overflowed"
            assert dropped == (~valid).sum() == p.writer.gaps_written == p.sorter.reorder.missing
    finally:
        p.stop()


def test_branching_each_frame_reaches_one_worker_of_every_group(tmp_path):
    source = SimulatedDetector(shape=[32, 32], rate_hz=0, frames=60)
    master = MasterEngine(source, groups=["xrd", "xrf"])
    master.bind_now()
    engines = [master]
    try:
        writers = {}
        for group, steps in (("xrd", STEPS), ("xrf", ["passthrough"])):
            sorter = SorterEngine(name=f"sorter-{group}")
            sorter.bind_now()
            writer = WriterEngine(name=f"writer-{group}", directory=str(tmp_path / group))
            writer.start()
            writer.connect(sorter.endpoint)
            engines += [sorter, writer]
            writers[group] = writer
            for i in range(2):
                worker = WorkerEngine(steps, name=f"{group}-{i}", group=group)
                worker.start()
                worker.connect(master.endpoint, sorter.collect_endpoint)
                engines.append(worker)
        wait_for(lambda: len(master.peers) == 4, what="4 workers")
        master.start_scan({"frames": 60})
        wait_for(lambda: not master.acquiring)
        master.end_scan()
        wait_for(lambda: all(w.scans_done == 1 for w in writers.values()), what="both files")
        for group, writer in writers.items():
            workers = [e for e in engines if isinstance(e, WorkerEngine) and e.group == group]
            assert sum(w.stats.frames_out for w in workers) == 60
            with h5py.File(writer.last_file) as f:
                assert list(f[f"entry/{group}/index"][:]) == list(range(60))
        with h5py.File(writers["xrf"].last_file) as f:
            np.testing.assert_array_equal(f["entry/xrf/image"][17], source.frame(17))
        with h5py.File(writers["xrd"].last_file) as f:
            assert "corner_sum" in f["entry/xrd"] and "image" not in f["entry/xrd"]
    finally:
        for engine in engines:
            engine.stop()


def only_odd(frame, meta):
    """A step with a derived stream that only odd frames have (like hits)."""
    return {"hits/frame": frame} if meta["index"] % 2 else {}


def test_chaining_a_derived_stream_feeds_a_second_pipeline_that_follows_its_scans(tmp_path):
    from pipelines.sources.chain import PipelineStreamSource

    first = Pipeline(tmp_path / "first", workers=1)
    first.add_worker("odd", steps=["tests.test_flow:only_odd"])
    first.workers[0].stop()  # keep only the worker that emits the derived stream
    chained = PipelineStreamSource(endpoint=first.sorter.endpoint, result="hits/frame")
    wait_for(lambda: len(first.sorter.consumers) == 3, what="chained source connected")
    second_master = MasterEngine(chained, name="second")
    second_master.bind_now()
    sorter2 = SorterEngine(name="sorter2")
    sorter2.bind_now()
    worker2 = WorkerEngine(STEPS, name="w2")
    worker2.start()
    worker2.connect(second_master.endpoint, sorter2.collect_endpoint)
    writer2 = WriterEngine(name="writer2", directory=str(tmp_path / "second"))
    writer2.start()
    writer2.connect(sorter2.endpoint)
    try:
        first.scan(20, {"scan_id": 4})
        wait_for(lambda: writer2.scans_done == 1, what="the chained scan written")
        step = load_step(STEPS[0])
        with h5py.File(writer2.last_file) as f:
            sums = f["entry/main/corner_sum"][:]
            assert f["entry/scan/upstream_scan"][()] == 4
        assert len(sums) == 10  # the 10 odd frames
        assert sums[3] == step(first.source.frame(7), {})["corner_sum"]
        assert chained.skipped == 10
    finally:
        for engine in (second_master, sorter2, worker2, writer2):
            engine.stop()
        first.stop()
