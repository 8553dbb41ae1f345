"""The same-host fast path: frames through the master's shared-memory ring (real sockets, real segments)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import zmq

from pipelines import message as m
from pipelines import shm
from pipelines.master import MasterEngine
from pipelines.sorter import SorterEngine
from pipelines.sources.simulator import SimulatedDetector
from pipelines.steps import load_step
from pipelines.transport import key_of, receive, send
from pipelines.worker import WorkerEngine, own_arrays
from pipelines.writers import WriterEngine
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["passthrough", {"roi_stats": {"rois": {"corner": [0, 16, 0, 16]}, "bin": 4}}]



def segment_exists(name: str) -> bool:
    return os.path.exists(os.path.join(shm.SHM_DIR, name))


class Pipeline:
    """Master, sorter and writer in this process; workers added by the test."""

    def __init__(
        self, tmp_path, use_shm=True, shm_slots=0, capacity=16, heartbeat_timeout_s=3.0, groups=("main",)
    ):
        self.source = SimulatedDetector(shape=[64, 48], frames=50, rate_hz=0)  # faster than any worker here
        self.master = MasterEngine(
            self.source,
            groups=groups,
            queue_capacity=capacity,
            heartbeat_timeout_s=heartbeat_timeout_s,
            use_shm=use_shm,
            shm_slots=shm_slots,
        )
        self.master.bind_now()
        self.sorter = SorterEngine(gap_timeout_s=5.0)
        self.sorter.bind_now()
        self.writer = WriterEngine(directory=str(tmp_path))
        self.writer.start()
        self.writer.connect(self.sorter.endpoint)
        self.workers = []
        wait_for(lambda: len(self.sorter.consumers) == 1, what="writer")

    def add_worker(self, name, steps=STEPS, credit=2, use_shm=True, heartbeat_s=0.1, group="main"):
        worker = WorkerEngine(
            steps, name=name, group=group, credit=credit, use_shm=use_shm, heartbeat_s=heartbeat_s
        )
        worker.start()
        worker.connect(self.master.endpoint, self.sorter.collect_endpoint)
        self.workers.append(worker)
        wait_for(lambda: name in self.master.worker_names(), what=f"worker {name}")
        return worker

    def scan(self, frames):
        done = self.writer.scans_done
        self.master.start_scan({"frames": frames})
        wait_for(lambda: not self.master.acquiring, what="acquisition")
        self.master.end_scan()
        wait_for(lambda: self.writer.scans_done > done, what="file closed")
        return self.writer.last_file

    def stop(self):
        for engine in (self.master, *self.workers, self.sorter, self.writer):
            engine.stop()


def read_results(path):
    with h5py.File(path) as f:
        group = f["entry/main"]
        return {name: group[name][()] for name in ("index", "valid", "image", "corner_sum", "binned")}


def assert_every_frame_once_and_right(results, source, frames):
    assert list(results["index"]) == list(range(frames))
    assert results["valid"].all()
    for i in range(frames):
        np.testing.assert_array_equal(results["image"][i], source.frame(i))


@pytest.mark.parametrize("plain", ["master", "worker"])
def test_results_are_identical_with_and_without_shared_memory(tmp_path, plain):
    outputs, counters = {}, {}
    for use_shm in (True, False):
        p = Pipeline(tmp_path / str(use_shm), use_shm=use_shm or plain != "master")
        try:
            for i in range(2):
                p.add_worker(f"w{i}", use_shm=use_shm or plain != "worker")
            outputs[use_shm] = read_results(p.scan(60))
            counters[use_shm] = p.master.counters()
            worker_shm = sum(w.counters()["ShmFrames"] for w in p.workers)
            assert worker_shm == (60 if use_shm else 0)
        finally:
            p.stop()
    assert counters[True]["ShmWorkers"] == 2 and counters[False]["ShmWorkers"] == 0
    assert counters[True]["ShmFrames"] == 60 and counters[True]["ShmFallbacks"] == 0
    assert counters[True]["ShmSlotsInUse"] == 0 and counters[True]["ShmSlots"] == 16
    assert counters[False]["ShmFrames"] == 0 and counters[False]["ShmSlots"] == 0
    for name, expected in outputs[False].items():
        np.testing.assert_array_equal(outputs[True][name], expected, err_msg=name)
    source = SimulatedDetector(shape=[64, 48])
    assert_every_frame_once_and_right(outputs[True], source, 60)
    step = load_step(STEPS[1])
    for i in (0, 33, 59):
        assert outputs[True]["corner_sum"][i] == step(source.frame(i), {})["corner_sum"]


def slow_passthrough(frame, meta):
    """Passthrough at 50 Hz: slower than the source, so the worker always holds all its credit."""
    time.sleep(0.02)
    return {"image": frame}


def test_a_full_ring_falls_back_to_zeromq_counts_it_and_loses_nothing(tmp_path):
    p = Pipeline(tmp_path, shm_slots=2)
    try:
        p.add_worker("w", steps=["tests.test_shm:slow_passthrough"], credit=6)  # 6 frames in flight, 2 slots
        results = read_results_passthrough(p.scan(40))
        c = p.master.counters()
    finally:
        p.stop()
    assert c["ShmSlots"] == 2 and c["ShmSlotsInUse"] == 0
    assert c["ShmFallbacks"] > 0 and c["ShmFrames"] > 0
    assert c["ShmFrames"] + c["ShmFallbacks"] == 40  # every frame dispatched once, one way or the other
    # slots are reused while passthrough results (views of the slot) are on their way:
    # the results must still be the frames they came from
    assert list(results["index"]) == list(range(40)) and results["valid"].all()
    for i in range(40):
        np.testing.assert_array_equal(results["image"][i], p.source.frame(i))


def read_results_passthrough(path, stream="main"):
    with h5py.File(path) as f:
        group = f[f"entry/{stream}"]
        return {name: group[name][()] for name in ("index", "valid", "image")}


def shm_hello(sock, name, credit):
    body = dict(shm.hello_fields(), name=name, group="main", credit=credit)
    send(sock, m.Message(m.HELLO, body=body))


def test_slots_of_a_silent_worker_are_reclaimed_and_its_frames_sent_again(tmp_path):
    p = Pipeline(tmp_path, heartbeat_timeout_s=0.5)
    ghost = zmq.Context.instance().socket(zmq.DEALER)
    ghost.linger = 0
    try:
        p.add_worker("w")
        ghost.connect(p.master.endpoint)
        shm_hello(ghost, "ghost", credit=5)  # takes frames from shared memory, never answers
        wait_for(lambda: "ghost" in p.master.worker_names(), what="ghost")
        assert p.master.counters()["ShmWorkers"] == 2
        results = read_results(p.scan(60))
        c = p.master.counters()
        segment = p.master.shm_segment
        taken = []
        while ghost.poll(0):
            taken.append(receive(ghost)[1])
    finally:
        p.stop()
        ghost.close(0)
    kinds = [msg.kind for msg in taken]
    handles = [msg.body["shm"] for msg in taken if msg.kind == m.FRAME]
    assert (
        kinds[:2] == [m.SCAN_START, m.HELLO] and taken[1].body["shm"]["segment"] == segment
    )  # where to look
    assert len(handles) >= 2 and kinds[2:] == [m.FRAME] * len(handles)  # then handles only
    assert p.master.lost_workers == 1 and c["ShmReclaimed"] == len(handles) and c["ShmSlotsInUse"] == 0
    assert_every_frame_once_and_right(results, p.source, 60)
    assert p.sorter.reorder.missing == 0


def test_frames_a_worker_cannot_read_from_shared_memory_come_again_over_zeromq(tmp_path):
    p = Pipeline(tmp_path)
    fake = zmq.Context.instance().socket(zmq.DEALER)
    fake.linger = 0
    try:
        fake.connect(p.master.endpoint)
        shm_hello(fake, "fake", credit=2)  # e.g. a container with its own /dev/shm
        wait_for(lambda: p.master.counters()["ShmWorkers"] == 1, what="fake worker")
        p.master.start_scan({"frames": 20})
        got = [receive(fake)[1] for _ in range(3)]
        assert [x.kind for x in got] == [m.SCAN_START, m.HELLO, m.FRAME] and not got[2].arrays
        scan = got[0].scan
        send(
            fake, m.Message(m.CREDIT, body={"n": 1, "refused": [[scan, m.FRAME, 0]], "reason": "cannot map"})
        )
        again = receive(fake)[1]
        assert again.kind == m.FRAME and again.index == 0 and "shm" not in again.body
        np.testing.assert_array_equal(again.arrays["data"], p.source.frame(0))
        c = p.master.counters()
        assert c["ShmRefused"] == 1 and c["ShmWorkers"] == 0 and c["ShmSlotsInUse"] == 0
        send(fake, m.control(m.BYE))  # leaves holding the start and frame 0: a real worker gets them
        worker = p.add_worker("w")
        wait_for(lambda: not p.master.acquiring, what="acquisition")
        p.master.end_scan()
        wait_for(lambda: p.writer.scans_done == 1, what="file closed")
        results = read_results(p.writer.last_file)
    finally:
        fake.close(0)
        p.stop()
    assert_every_frame_once_and_right(results, p.source, 20)
    assert worker.counters()["ShmFrames"] == 20


def test_malformed_refusals_and_acknowledgements_are_counted_and_the_master_goes_on(tmp_path):
    p = Pipeline(tmp_path)
    fake = zmq.Context.instance().socket(zmq.DEALER)
    fake.linger = 0
    try:
        fake.connect(p.master.endpoint)
        shm_hello(fake, "fake", credit=1)
        wait_for(lambda: "fake" in p.master.worker_names(), what="fake worker")
        before = p.master.stats.bad.total
        bodies = [
            {"n": 0, "refused": "all"},
            {"n": 0, "refused": [[[1], m.FRAME, 0]]},
            {"n": 0, "refused": [[1, m.FRAME]]},
            {"n": 0, "done": [[{"scan": 1}, m.FRAME, 0]]},
        ]
        for body in bodies:
            send(fake, m.Message(m.CREDIT, body=body))
        wait_for(lambda: p.master.stats.bad.total == before + len(bodies), what="bad credits counted")
        assert p.master.running and p.master.counters()["ShmWorkers"] == 1
        send(fake, m.control(m.BYE))
        p.add_worker("w")
        results = read_results(p.scan(10))
    finally:
        fake.close(0)
        p.stop()
    assert_every_frame_once_and_right(results, p.source, 10)


def test_one_slot_serves_every_group_that_has_the_frame(tmp_path):
    p = Pipeline(tmp_path / "a", groups=("a", "b"), shm_slots=4)
    sorter_b, writer_b = SorterEngine(gap_timeout_s=5.0), WriterEngine(directory=str(tmp_path / "b"))
    try:
        p.add_worker("a", steps=["tests.test_shm:slow_passthrough"], group="a")
        sorter_b.bind_now()
        writer_b.start()
        writer_b.connect(sorter_b.endpoint)
        worker_b = WorkerEngine(["tests.test_shm:slow_passthrough"], name="b", group="b", heartbeat_s=0.1)
        p.workers.append(worker_b)
        worker_b.start()
        worker_b.connect(p.master.endpoint, sorter_b.collect_endpoint)
        wait_for(lambda: "b" in p.master.worker_names() and sorter_b.consumers, what="group b")
        results = {"a": read_results_passthrough(p.scan(30), "a")}
        wait_for(lambda: writer_b.scans_done == 1, what="group b's file")
        results["b"] = read_results_passthrough(writer_b.last_file, "b")
        c = p.master.counters()
    finally:
        p.stop()
        sorter_b.stop()
        writer_b.stop()
    # 4 slots, each group's worker holds 2 frames: with a slot per frame (not per dispatch)
    # nothing falls back
    assert c["ShmFrames"] == 60 and c["ShmFallbacks"] == 0 and c["ShmSlotsInUse"] == 0
    for group in ("a", "b"):
        assert list(results[group]["index"]) == list(range(30)) and results[group]["valid"].all()
        for i in range(30):
            np.testing.assert_array_equal(results[group]["image"][i], p.source.frame(i))


def test_a_bigger_frame_gets_a_new_ring_and_the_old_one_is_removed(tmp_path):
    p = Pipeline(tmp_path)
    try:
        worker = p.add_worker("w", steps=["passthrough"])
        p.scan(10)
        first = p.master.shm_segment
        p.master.source = SimulatedDetector(shape=[128, 96])
        results = read_results_passthrough(p.scan(10))
        second = p.master.shm_segment
        assert second != first and not segment_exists(first) and segment_exists(second)
        assert worker.rings.segments == [second]  # the worker unmapped the old one
        for i in range(10):
            np.testing.assert_array_equal(results["image"][i], p.master.source.frame(i))
        c = p.master.counters()
        assert c["ShmFrames"] == 20 and c["ShmFallbacks"] == 0
    finally:
        p.stop()


class FakeMaster:
    """A master's socket driven by the test: what a worker does with each handle, one at a time."""

    def __init__(self, steps=("passthrough",), credit=4, results_endpoint=""):
        """``results_endpoint``: an ipc endpoint the test binds later with :meth:`bind_results`."""
        ctx = zmq.Context.instance()
        self.router = ctx.socket(zmq.ROUTER)
        self.router.linger = 0
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.results = ctx.socket(zmq.ROUTER)  # the sorter's collect port
        self.results.linger = 0
        if not results_endpoint:
            results_endpoint = f"tcp://127.0.0.1:{self.results.bind_to_random_port('tcp://127.0.0.1')}"
        self.results_endpoint = results_endpoint
        self.worker = WorkerEngine(list(steps), name="w", credit=credit)
        self.worker.start()
        self.worker.connect(f"tcp://127.0.0.1:{port}", results_endpoint)
        hello = self.next_control()
        assert hello.kind == m.HELLO
        self.hello = hello.body
        self.ring = None

    def next_control(self, timeout=5.0):
        """The next message from the worker that is not a heartbeat."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.router.poll(50):
                self.identity, msg = receive(self.router, routed=True)
                if msg.kind != m.HEARTBEAT:
                    return msg
        raise AssertionError("the worker sent nothing")

    def take_result(self):
        """Receive one result as the sorter does, and confirm it to the worker."""
        identity, msg = receive(self.results, routed=True)
        send(self.results, m.control(m.CREDIT, received=[key_of(msg)]), identity)
        return msg

    def bind_results(self):
        self.results.bind(self.results_endpoint)

    def announce(self, announcement):
        send(self.router, m.control(m.HELLO, shm=announcement), self.identity)

    def frame(self, index, handle):
        send(
            self.router,
            m.Message(m.FRAME, scan=1, index=index, stream="raw", body={"shm": handle}),
            self.identity,
        )

    def close(self):
        self.worker.stop()
        self.router.close(0)
        self.results.close(0)
        if self.ring is not None:
            self.ring.close()


@pytest.fixture
def fake_master():
    fake = FakeMaster()
    yield fake
    fake.close()


def test_a_worker_on_this_host_asks_for_shared_memory_and_can_be_told_not_to():
    hello = shm.hello_fields()
    assert hello["shm"] is True and hello["boot_id"] == Path(shm.BOOT_ID_PATH).read_text().strip()
    assert shm.same_host(hello)
    assert not shm.same_host(dict(hello, boot_id="another-boot"))
    assert not shm.same_host(dict(hello, host=hello["host"] + "-elsewhere"))
    assert not shm.same_host(dict(hello, shm=False))
    assert not shm.same_host(hello, own_boot_id="")
    worker = WorkerEngine(["passthrough"], use_shm=False)
    assert worker.link.hello_extra == {}


def test_forged_and_stale_handles_are_refused_counted_and_the_worker_goes_on(fake_master):
    fake = fake_master
    assert fake.hello["shm"] is True and shm.same_host(fake.hello)
    fake.ring = ring = shm.FrameRing(2, 64 * 48 * 2)
    frame = np.arange(64 * 48, dtype="<u2").reshape(64, 48)
    good = ring.put(frame)
    released = ring.put(frame + 1)
    ring.release(released)
    other = ring.put(frame + 2)  # the released slot again, a newer generation
    assert other["slot"] == released["slot"] and other["generation"] > released["generation"]
    fake.frame(0, good)  # before any announcement: the segment is unknown
    fake.announce(ring.announcement())
    fake.announce({"segment": "tangopipe-ring-1-00000000", "slots": 2, "slot_bytes": 8192})  # no such segment
    fake.announce({"segment": "../../etc/passwd", "slots": 2, "slot_bytes": 8192})
    fake.announce(dict(ring.announcement(), slots=3))  # disagrees with the segment's header
    forged = [
        "not a handle",
        dict(good, segment="tangopipe-ring-1-00000000"),
        dict(good, slot=2),
        dict(good, slot=-1),
        dict(good, slot=True),
        dict(good, generation=good["generation"] + 1),
        released,  # stale: the master took the slot back
        dict(good, dtype="|O"),
        dict(good, dtype="<U4"),
        dict(good, shape=[4096, 4096]),
        dict(good, shape=[64, -48]),
        dict(good, shape="64x48"),
        {k: v for k, v in good.items() if k != "generation"},
    ]
    for i, handle in enumerate(forged, start=1):
        fake.frame(i, handle)
    refused = []
    while len(refused) < 1 + len(forged):
        msg = fake.next_control()
        assert msg.kind == m.CREDIT and msg.body["n"] == 1 and "done" not in msg.body
        refused.extend(msg.body["refused"])
    assert refused == [[1, m.FRAME, i] for i in range(len(forged) + 1)]
    assert not fake.results.poll(200)  # no result for any of them
    bad = fake.worker.stats.bad.by_reason
    assert bad["shm_attach_failed"] == 1 and bad["bad_shm_announcement"] == 1 and bad["bad_shm_segment"] == 1
    assert bad["stale_shm_handle"] == 2 and bad["bad_shm_handle"] == len(forged) - 2 + 1
    assert fake.worker.counters()["ShmRefused"] == len(forged) + 1
    # the worker still works, from the segment it was first told about
    fake.frame(99, good)
    assert fake.results.poll(5000)
    result = fake.take_result()
    assert result.kind == m.RESULT and result.index == 99
    np.testing.assert_array_equal(result.arrays["image"], frame)
    ack = fake.next_control()
    assert ack.body == {"n": 1, "done": [[1, m.FRAME, 99]]}
    assert fake.worker.running and fake.worker.counters()["ShmFrames"] == 1


ENTERED = threading.Event()
RELEASE = threading.Event()


def hold_until_released(frame, meta):
    """A step that stays inside until the test lets it go (to change the slot meanwhile)."""
    ENTERED.set()
    assert RELEASE.wait(10)
    return {"image": frame}


def test_results_from_a_slot_taken_back_while_computing_are_dropped():
    ENTERED.clear()
    RELEASE.clear()
    fake = FakeMaster(steps=["tests.test_shm:hold_until_released"])
    try:
        fake.ring = ring = shm.FrameRing(1, 4096)
        fake.announce(ring.announcement())
        first = np.full((8, 8), 7, dtype="<u2")
        handle = ring.put(first)
        fake.frame(0, handle)
        assert ENTERED.wait(5)
        # the master declares the worker lost and gives the slot to another frame
        ring.release(handle)
        assert ring.put(np.zeros((8, 8), "<u2"))["slot"] == handle["slot"]
        RELEASE.set()
        msg = fake.next_control()
        assert msg.kind == m.CREDIT and msg.body["refused"] == [[1, m.FRAME, 0]]
        assert "taken back" in msg.body["reason"]
        assert not fake.results.poll(300)
        c = fake.worker.counters()
        assert c["ShmStale"] == 1 and c["InFlight"] == 0
    finally:
        RELEASE.set()
        fake.close()


def test_a_frame_is_acknowledged_only_after_the_sorter_confirmed_its_result(tmp_path):
    # nobody listens on the sorter's endpoint yet: the result waits in the worker, and the
    # master must not hear "done" (it would reuse the slot and forget the frame)
    fake = FakeMaster(results_endpoint=f"ipc://{tmp_path}/results")
    try:
        fake.ring = ring = shm.FrameRing(1, 256 * 256 * 2)  # > zmq's copy threshold: sent zero-copy
        fake.announce(ring.announcement())
        first = np.arange(256 * 256, dtype="<u2").reshape(256, 256)
        handle = ring.put(first)
        fake.frame(0, handle)
        with pytest.raises(AssertionError, match="sent nothing"):
            fake.next_control(timeout=1.0)
        fake.bind_results()
        assert fake.results.poll(5000)
        result = fake.take_result()  # received and confirmed, as the sorter does
        ack = fake.next_control()
        assert ack.body == {"n": 1, "done": [[1, m.FRAME, 0]]}
        ring.release(handle)
        assert ring.put(np.zeros_like(first))["slot"] == handle["slot"]  # the slot is the master's again
        np.testing.assert_array_equal(result.arrays["image"], first)
    finally:
        fake.close()


def test_views_of_the_input_are_copied_and_other_results_are_not():
    frame = np.arange(100, dtype="<u2").reshape(10, 10)
    independent = np.ones(3)
    owned = own_arrays({"image": frame, "row": frame[2], "binned": independent}, frame)
    assert not np.may_share_memory(owned["image"], frame) and not np.may_share_memory(owned["row"], frame)
    np.testing.assert_array_equal(owned["image"], frame)
    assert owned["binned"] is independent


def test_the_segment_is_unlinked_when_the_master_stops(tmp_path):
    p = Pipeline(tmp_path)
    try:
        p.add_worker("w")
        p.scan(10)
        name = p.master.shm_segment
        assert name.startswith(shm.NAME_PREFIX) and segment_exists(name)
    finally:
        p.stop()
    assert not segment_exists(name) and p.master.shm_segment == ""


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_segments_of_dead_masters_are_removed_when_a_master_starts():
    stale = os.path.join(shm.SHM_DIR, f"{shm.NAME_PREFIX}{dead_pid()}-0123abcd")
    alive = os.path.join(shm.SHM_DIR, f"{shm.NAME_PREFIX}{os.getpid()}-0123abcd")
    unrelated = os.path.join(shm.SHM_DIR, f"tangopipe-other-{dead_pid()}")
    for path in (stale, alive, unrelated):
        Path(path).write_bytes(b"x" * 100)
    master = MasterEngine(SimulatedDetector(shape=[8, 8]))
    try:
        master.bind_now()
        assert not os.path.exists(stale)
        assert os.path.exists(alive) and os.path.exists(unrelated)
    finally:
        master.stop()
        for path in (stale, alive, unrelated):
            if os.path.exists(path):
                os.unlink(path)


def test_a_master_process_killed_leaves_no_segment():
    script = (
        "import os, signal\n"
        "from pipelines.shm import FrameRing\n"
        "ring = FrameRing(2, 4096)\n"
        "print(ring.name, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == -signal.SIGKILL
    name = proc.stdout.strip()
    assert name.startswith(shm.NAME_PREFIX)
    wait_for(lambda: not segment_exists(name), timeout=10, what="the resource tracker to unlink the segment")


WORKER_PROCESS = """
import json, sys
from pipelines.worker import WorkerEngine
worker = WorkerEngine(["passthrough"], name="process", credit=3)
worker.start()
worker.connect(sys.argv[1], sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()  # until the test says stop
counters = worker.counters()
worker.stop()
print(json.dumps({k: counters[k] for k in ("ShmFrames", "ShmRefused", "FramesOut")}), flush=True)
"""


def test_a_worker_process_reads_the_ring_and_its_exit_keeps_the_segment(tmp_path):
    p = Pipeline(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER_PROCESS, p.master.endpoint, p.sorter.collect_endpoint],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        wait_for(lambda: "process" in p.master.worker_names(), what="the worker process")
        results = read_results_passthrough(p.scan(30))
        assert list(results["index"]) == list(range(30)) and results["valid"].all()
        for i in range(30):
            np.testing.assert_array_equal(results["image"][i], p.source.frame(i))
        name = p.master.shm_segment
        out, _ = proc.communicate("stop\n", timeout=30)
        assert proc.returncode == 0
        counters = json.loads(out.strip().splitlines()[-1])
        assert counters["ShmFrames"] == 30 and counters["ShmRefused"] == 0
        assert p.master.counters()["ShmFrames"] == 30
        wait_for(lambda: "process" not in p.master.worker_names(), what="the worker process to leave")
        time.sleep(0.5)  # time for a resource tracker of the worker process to act, were there one
        assert segment_exists(name)
        # the ring still serves the next worker and scan
        worker = p.add_worker("w", steps=["passthrough"])
        results = read_results_passthrough(p.scan(10))
        assert results["valid"].all() and worker.counters()["ShmFrames"] == 10
        assert p.master.shm_segment == name
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        p.stop()
