"""The stream source against a detector on real sockets: a thread, or its own process."""

import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq

from pipelines import message as m
from pipelines.master import MasterEngine
from pipelines.sink import SinkEngine
from pipelines.sorter import SorterEngine
from pipelines.sources import SourceError, load_source
from pipelines.sources.simulator import SimulatedDetector
from pipelines.sources.stream import FrameStreamSource, StreamDetector
from pipelines.transport import send
from pipelines.worker import WorkerEngine

SHAPE = (64, 48)


@pytest.fixture
def detector():
    det = StreamDetector(port=0, shape=SHAPE)
    yield det
    det.stop()
    det.close()


def send_in_thread(detector, *counts):
    """Send series of ``counts`` frames from a thread; returns the thread and the series ids."""
    ids = []

    def run():
        for n in counts:
            ids.append(detector.send_series(n, timeout_s=10))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, ids


def collect(source, scan=None, limit=10_000):
    out = []
    for array, meta in source.frames(scan or {}):
        out.append((np.array(array), meta))
        if len(out) >= limit:
            break
    return out


def test_frames_arrive_exactly_and_the_series_end_ends_the_scan(detector):
    source = FrameStreamSource(endpoint=detector.endpoint, timeout_s=5)
    sender, ids = send_in_thread(detector, 25)
    got = collect(source)
    sender.join(5)
    reference = SimulatedDetector(shape=list(SHAPE), frames=0)
    assert len(got) == 25
    for i, (array, meta) in enumerate(got):
        assert array.dtype == np.uint16 and array.shape == SHAPE
        np.testing.assert_array_equal(array, reference.frame(i))
        assert meta["frame_number"] == i and meta["series"] == ids[0]
    assert source.stats()["frames"] == 25 and source.stats()["series_ended"] == 1
    assert source.describe()["shape"] == list(SHAPE)
    source.close()


def test_a_frame_count_from_start_scan_ends_the_scan_and_the_next_scan_gets_the_next_series_whole(detector):
    source = FrameStreamSource(endpoint=detector.endpoint, timeout_s=5)
    sender, ids = send_in_thread(detector, 10, 7)
    first = collect(source, {"frames": 10})
    second = collect(source, {"frames": 0})
    sender.join(5)
    assert [meta["frame_number"] for _, meta in first] == list(range(10))
    assert [meta["frame_number"] for _, meta in second] == list(range(7))
    assert {meta["series"] for _, meta in second} == {ids[1]}
    assert source.stats()["skipped"] == 1  # the first series' end, read during the second scan
    source.close()


def test_stop_makes_frames_return_and_what_is_left_of_the_series_is_skipped(detector):
    source = FrameStreamSource(endpoint=detector.endpoint, timeout_s=5)
    detector.rate_hz = 200
    sender, ids = send_in_thread(detector, 40, 3)
    got = []
    stopped_at = None
    for _array, meta in source.frames({}):
        got.append(meta["frame_number"])
        if len(got) == 5:
            threading.Timer(0.05, source.stop).start()
            stopped_at = time.monotonic()
    assert time.monotonic() - stopped_at < 1.0
    assert 5 <= len(got) < 40
    after = collect(source)  # the rest of the first series is skipped; the second comes whole
    sender.join(10)
    assert [meta["frame_number"] for _, meta in after] == [0, 1, 2]
    assert {meta["series"] for _, meta in after} == {ids[1]}
    assert source.stats()["skipped"] == 40 - len(got) + 1
    source.close()


def test_malformed_messages_are_counted_never_raised():
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.linger = 0
    port = push.bind_to_random_port("tcp://127.0.0.1")
    source = FrameStreamSource(endpoint=f"tcp://127.0.0.1:{port}", timeout_s=5)
    good = np.arange(12, dtype=np.uint16).reshape(3, 4)

    def send_all():  # PUSH waits for the source to connect (in frames())
        push.send_multipart([b"not json at all"])
        push.send_multipart([b'{"protocol": "tangopipe/1", "kind": "frame", "scan": "s", "index": 0}', b"xx"])
        send(push, m.Message(m.FRAME, scan="s", index=0))  # no data buffer
        send(push, m.Message(m.FRAME, scan="s", index=1, arrays={"data": np.zeros(5, np.uint16)}))  # not 2-D
        send(push, m.Message(m.RESULT, scan="s", index=2))  # not something a detector sends
        send(push, m.Message(m.FRAME, scan="s", index=3, arrays={"data": good}))
        send(push, m.Message(m.SCAN_END, scan="s", body={"frames": 4}))

    sender = threading.Thread(target=send_all, daemon=True)
    sender.start()
    try:
        got = collect(source)
        sender.join(5)
    finally:
        source.close()
        push.close(0)
    assert len(got) == 1
    np.testing.assert_array_equal(got[0][0], good)
    stats = source.stats()
    assert stats["bad_messages"] == 5
    assert stats["bad_by_reason"] == {"bad_json": 1, "bad_parts": 1, "bad_frame": 2, "unexpected_kind": 1}
    assert stats["series_ended"] == 1


def test_silence_fails_the_scan_naming_the_endpoint():
    ctx = zmq.Context.instance()
    probe = ctx.socket(zmq.PUSH)
    port = probe.bind_to_random_port("tcp://127.0.0.1")
    probe.close(0)  # nothing listens there any more
    source = FrameStreamSource(endpoint=f"tcp://127.0.0.1:{port}", timeout_s=0.3)
    with pytest.raises(SourceError, match=f"tcp://127.0.0.1:{port}.*timeout_s 0.3"):
        collect(source)
    source.close()


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"endpoint": "localhost:9998"}, "endpoint 'localhost:9998'"),
        ({"timeout_s": 0}, "timeout_s must be a number of seconds > 0, got 0"),
        ({"timeout_s": "long"}, "timeout_s must be a number of seconds > 0, got 'long'"),
    ],
)
def test_bad_parameters_are_named(params, named):
    with pytest.raises(ValueError, match=named):
        FrameStreamSource(**params)


def test_bad_detector_parameters_are_named():
    with pytest.raises(ValueError, match="port must be 0..65535"):
        StreamDetector(port=70000)
    with pytest.raises(ValueError, match="rate_hz must be a number >= 0"):
        StreamDetector(port=0, shape=SHAPE, rate_hz=-1)


def test_registered_as_the_stream_source_kind():
    source = load_source({"kind": "stream", "endpoint": "tcp://127.0.0.1:9", "timeout_s": 2})
    assert isinstance(source, FrameStreamSource) and source.timeout_s == 2.0


def test_detector_command_runs_as_its_own_process():
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipelines.sources.stream",
            "--port",
            "0",
            "--frames",
            "6",
            "--shape",
            "32",
            "16",
            "--timeout-s",
            "10",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("stream detector: sending on tcp://127.0.0.1:"), line + proc.stderr.read()
        source = FrameStreamSource(endpoint=line.split()[-1], timeout_s=10)
        got = collect(source)
        source.close()
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert len(got) == 6 and got[0][0].shape == (32, 16)
    assert "6 frames in" in out


def test_the_master_takes_a_scan_from_the_detector_and_results_arrive_in_order(detector):
    source = FrameStreamSource(endpoint=detector.endpoint, timeout_s=5)
    master = MasterEngine(source, queue_capacity=8)
    sorter = SorterEngine()
    worker = WorkerEngine([{"roi_stats": {"bin": 1}}], name="w1")
    sink = SinkEngine()
    engines = [master, sorter, worker, sink]
    try:
        master.bind_now()
        sorter.bind_now()
        worker.start()
        worker.connect(master.endpoint, sorter.collect_endpoint)
        sink.start()
        sink.connect(sorter.endpoint)
        deadline = time.monotonic() + 10
        while not (master.worker_names() and sorter.consumers) and time.monotonic() < deadline:
            time.sleep(0.01)
        sender, _ = send_in_thread(detector, 30)
        master.start_scan({"frames": 30})
        while sink.stats.frames_in < 30 and time.monotonic() < deadline + 20:
            time.sleep(0.01)
        assert master.end_scan() == 30
        sender.join(5)
        dataset = sink.call(lambda: sink.store.describe())
    finally:
        for engine in engines:
            engine.stop()
        source.close()
    reference = SimulatedDetector(shape=list(SHAPE), frames=0)
    assert sink.stats.frames_in == 30
    assert dataset[0]["frames"] == 30
    latest = sink.latest()
    assert latest.index == 29
    assert latest.scalars["total_sum"] == float(reference.frame(29).sum(dtype=np.float64))


def test_a_series_waits_for_a_receiver_and_says_so_when_none_comes(detector):
    with pytest.raises(TimeoutError, match=f"no receiver connected to {detector.endpoint} within 0.2 s"):
        detector.send_series(3, timeout_s=0.2)
