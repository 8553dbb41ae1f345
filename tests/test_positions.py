"""Scan-point positions matched to frames: the store, the point-triggered source, and
the engines wired in one process (master, worker, sorter, sink, writer; no Tango)."""

import math
import threading
import time
from types import SimpleNamespace

import h5py
import pytest

from pipelines.master import MasterEngine
from pipelines.positions import MAX_END_VALUES, PointError, PointPositions, PointTriggeredSource, parse_point
from pipelines.sink import SinkEngine
from pipelines.sorter import SorterEngine
from pipelines.sources.simulator import SimulatedDetector
from pipelines.worker import WorkerEngine
from pipelines.writers import WriterEngine
from tests.waiting import wait_for

STEPS = [{"roi_stats": {"rois": {"corner": [0, 16, 0, 16]}, "bin": 1}}]



@pytest.mark.parametrize(
    ("body", "named"),
    [
        ([1, 2], "JSON object"),
        ({"index": -1, "positions": {"m": 1.0}}, "index -1"),
        ({"index": True, "positions": {"m": 1.0}}, "index True"),
        ({"index": 0}, "positions None"),
        ({"index": 0, "positions": {}}, "positions {}"),
        ({"index": 0, "positions": {"mot01": "far"}}, "position of 'mot01' is 'far'"),
        ({"index": 0, "positions": {"m": 1.0}, "scan": [1]}, "scan [1]"),
        ({"index": 0, "positions": {"m": 1.0}, "frame": 3}, "unknown keys ['frame']"),
    ],
)
def test_a_bad_point_report_is_refused_naming_what_is_wrong(body, named):
    with pytest.raises(PointError, match=named.replace("[", r"\[").replace("]", r"\]")):
        parse_point(body)


def test_a_point_report_keeps_numbers_and_turns_non_finite_into_none():
    index, positions, scan = parse_point(
        {"index": 4, "positions": {"a": 1, "b": math.nan, "c": None}, "scan": 9}
    )
    assert (index, scan) == (4, 9)
    assert positions == {"a": 1.0, "b": None, "c": None}


def test_the_store_gives_columns_by_index_and_keeps_the_last_scans():
    points = PointPositions(max_scans=2)
    points.add(1, 0, {"x": 0.0})
    points.add(1, 2, {"x": 2.0, "y": 5.0})
    assert points.columns(1) == {"x": [0.0, None, 2.0], "y": [None, None, 5.0]}
    points.add(2, 0, {"x": 1.0})
    points.add(3, 0, {"x": 1.0})
    assert points.count(1) == 0 and points.count(3) == 1  # scan 1 forgotten


def test_a_waiting_frame_is_released_by_its_point_or_by_stop():
    points = PointPositions()
    stop = threading.Event()
    got = {}
    waiter = threading.Thread(target=lambda: got.setdefault("value", points.wait(5, 1, stop)))
    waiter.start()
    points.add(5, 0, {"x": 0.0})  # another point does not release it
    waiter.join(0.3)
    assert waiter.is_alive()
    points.add(5, 1, {"x": 1.0})
    waiter.join(5)
    assert got["value"] == {"x": 1.0}
    stop.set()
    assert points.wait(5, 2, stop) is None


def test_too_many_positions_are_left_out_of_the_scan_end_and_said_so():
    points = PointPositions()
    source = PointTriggeredSource(SimulatedDetector(shape=[8, 8]), points, lambda: 1)
    points.add(1, 0, {"x": 0.0})
    assert source.scan_end_meta() == {"positions": {"x": [0.0]}}
    points.add(1, MAX_END_VALUES, {"x": 1.0})
    assert "positions" not in source.scan_end_meta()
    assert "too many" in source.scan_end_meta()["positions_omitted"]


@pytest.fixture
def flow(tmp_path):
    points = PointPositions()
    box = {}
    source = PointTriggeredSource(
        SimulatedDetector(shape=[32, 32], rate_hz=0), points, lambda: box["master"].scan_id
    )
    master = box["master"] = MasterEngine(source, queue_capacity=16)
    master.bind_now()
    sorter = SorterEngine(gap_timeout_s=2.0)
    sorter.bind_now()
    worker = WorkerEngine(STEPS, name="w0")
    worker.start()
    worker.connect(master.endpoint, sorter.collect_endpoint)
    sink, writer = SinkEngine(), WriterEngine(directory=str(tmp_path))
    for consumer in (sink, writer):
        consumer.start()
        consumer.connect(sorter.endpoint)
    wait_for(lambda: len(sorter.consumers) == 2 and master.worker_names() == ["w0"], what="pipeline wired")
    yield SimpleNamespace(points=points, master=master, sink=sink, writer=writer)
    for engine in (master, worker, sorter, sink, writer):
        engine.stop()


def finish(flow, done: int) -> str:
    flow.master.end_scan()
    wait_for(lambda: flow.writer.scans_done > done, what="file closed")
    return flow.writer.last_file


def positions_in(path: str, motor: str) -> list[float]:
    with h5py.File(path, "r") as f:
        return list(f[f"entry/scan/positions/{motor}"][()])


def test_point_triggered_frames_wait_for_their_point_and_carry_its_positions(flow):
    done = flow.writer.scans_done
    flow.master.start_scan({"scan_id": 3, "frames": 4, "point_trigger": True, "motors": ["x"]})
    time.sleep(0.3)
    assert flow.master.scan_frames == 0  # no frame before its point
    for i in (0, 1):
        flow.points.add(3, i, {"x": 10.0 + i})
    wait_for(lambda: flow.master.scan_frames == 2, what="frames of points 0 and 1")
    time.sleep(0.3)
    assert flow.master.scan_frames == 2
    for i in (2, 3):
        flow.points.add(3, i, {"x": 10.0 + i})
    wait_for(lambda: not flow.master.acquiring, what="the scan's 4 frames")
    path = finish(flow, done)
    for i in range(4):
        assert flow.sink.queries.get(3, "main", i).meta["positions"] == {"x": 10.0 + i}
    assert positions_in(path, "x") == [10.0, 11.0, 12.0, 13.0]


def test_positions_reported_after_their_frame_reach_the_file_through_the_scan_end(flow):
    done = flow.writer.scans_done
    flow.master.start_scan({"scan_id": 4, "frames": 3, "motors": ["x"]})  # frames run free
    wait_for(lambda: not flow.master.acquiring, what="3 frames")
    for i in range(3):
        flow.points.add(4, i, {"x": -1.0 * i})
    path = finish(flow, done)
    assert "positions" not in flow.sink.queries.get(4, "main", 0).meta  # the frames left without them
    assert positions_in(path, "x") == [0.0, -1.0, -2.0]


def test_end_scan_while_waiting_for_a_point_keeps_the_frames_of_the_points_reported(flow):
    done = flow.writer.scans_done
    flow.master.start_scan({"scan_id": 5, "frames": 10, "point_trigger": True, "motors": ["x"]})
    flow.points.add(5, 0, {"x": 0.5})
    flow.points.add(5, 1, {"x": 1.5})
    wait_for(lambda: flow.master.scan_frames == 2, what="frames of points 0 and 1")
    path = finish(flow, done)  # a stopped scan: the source must not hang on point 2
    with h5py.File(path, "r") as f:
        assert f["entry/frames_written"][()] == 2
    assert positions_in(path, "x") == [0.5, 1.5]
