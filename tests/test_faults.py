"""kill -9 of each kind of device during a scan, then ``tangopipe restart``.

A real pipeline (embedded database, real servers): the devices next to the killed
one say so (UNKNOWN or ALARM, naming it), the restarted server finds its peers
again through the database and they find it, the pipeline carries on. Workers:
nothing lost. Sorter, sink, writer: what is lost is recorded with its exact indices
(gap rows in the file, ``ConsumerLosses`` at the sorter), and a restarted writer
carries on in the same file. A restarted master ends the interrupted scan and
numbers the next one after it.
"""

import json
import os
import signal
import time

import h5py
import numpy as np
import pytest
import tango
import yaml

from devices.database import pid_alive

from .conftest import ROOT, Deployed, demo_config, pids_alive, tangopipe
from .waiting import wait_for

pytestmark = pytest.mark.slow

FRAMES = 500
RATE_HZ = 25.0  # a 20 s scan; the kill comes after about 4 s
KILL_AFTER = 100


def fault_pipeline(folder):
    demo = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    demo["master"]["source"].update(shape=[256, 256], rate_hz=RATE_HZ, frames=FRAMES)
    main = demo["groups"]["main"]
    main["steps"] = [{"roi_stats": {"rois": {"center": [96, 160, 96, 160]}, "bin": 1}}]
    main["sorter"]["gap_timeout_s"] = 3
    return demo_config(folder, master=demo["master"], groups=demo["groups"])


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    deployed = Deployed(folder, fault_pipeline(folder))
    try:
        yield deployed
    finally:
        started = json.loads((deployed.state / "session.json").read_text())  # with the restarted servers
        deployed.down()
        pids = [started["db_pid"], *started["servers"].values()]
        deadline = time.monotonic() + 10
        while pids_alive(pids) and time.monotonic() < deadline:
            time.sleep(0.1)


def counters(pipeline, name):
    return json.loads(pipeline.proxy(name).Counters)


def state_and_status(pipeline, name):
    try:
        dev = pipeline.proxy(name)
        return str(dev.State()), dev.Status()
    except tango.DevFailed:
        return "DOWN", ""


def session(pipeline):
    return json.loads((pipeline.state / "session.json").read_text())


def kill(pipeline, server):
    pid = session(pipeline)["servers"][server]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid), what=f"{server} gone")


def start_scan(pipeline):
    """StartScan; the master's proxy, the scan id and a wait until ``n`` of its results are sorted."""
    before = counters(pipeline, "demo/sorter/main")["FramesOut"]
    master = pipeline.proxy("demo/master/1")
    scan = master.StartScan(json.dumps({"frames": FRAMES}))

    def sorted_(n):
        wait_for(lambda: counters(pipeline, "demo/sorter/main")["FramesOut"] - before >= n, timeout=60,
                 what=f"{n} results of scan {scan} sorted")  # fmt: skip

    return master, scan, sorted_


def finish_scan(pipeline, master):
    wait_for(lambda: not master.Acquiring, timeout=120, what="acquisition done")
    master.EndScan()
    writer = pipeline.proxy("demo/writer/hdf5")
    wait_for(lambda: writer.State() == tango.DevState.ON and not json.loads(writer.Counters)["HeldMessages"],
             timeout=60, what="file closed")  # fmt: skip
    return writer.LastFile


def notices(pipeline, name, states, text, timeout=20):
    """Wait until device ``name`` is in one of ``states`` with ``text`` in its Status."""
    wait_for(lambda: (lambda s: s[0] in states and text in s[1])(state_and_status(pipeline, name)),
             timeout=timeout, what=f"{name} {'/'.join(states)} naming {text}")  # fmt: skip


def restart(pipeline, server, flowing):
    """``tangopipe restart SERVER``; seconds until ``flowing()`` (from the command's start)."""
    began = time.monotonic()
    tangopipe("restart", server, env=pipeline.env, cwd=pipeline.folder, timeout=120)
    ready = time.monotonic() - began
    wait_for(flowing, timeout=30, what=f"flow after restarting {server}")
    resumed = time.monotonic() - began
    print(f"\n{server}: restarted and ready in {ready:.1f} s, data flowing {resumed:.1f} s after the restart began")
    return resumed


def file_rows(path):
    with h5py.File(path, "r") as f:
        data = f["entry/main"]
        return {
            "index": data["index"][:],
            "valid": data["valid"][:],
            "gaps": sorted(int(g) for g in f["entry/gaps"][:]),
            "center_sum": data["center_sum"][:],
            "frames_written": int(f["entry/frames_written"][()]),
            "frames_acquired": int(f["entry/frames_acquired"][()]),
        }


def assert_exact_rows(rows, frames, lost):
    """Every frame has a row, valid unless it is one of ``lost``, which are the gap rows."""
    assert list(rows["index"]) == list(range(frames))
    invalid = sorted(int(i) for i in np.flatnonzero(~rows["valid"]))
    assert invalid == sorted(lost) == rows["gaps"]
    assert np.all(rows["center_sum"][rows["valid"]] > 0)
    assert rows["frames_written"] == frames - len(lost)


def lost_for(pipeline, consumer, scan):
    losses = json.loads(pipeline.proxy("demo/sorter/main").ConsumerLosses)
    return sorted(i for a, b in losses.get(consumer, {}).get(str(scan), []) for i in range(a, b))


def test_worker_killed_and_restarted_nothing_lost(pipeline):
    master, scan, wait_sorted = start_scan(pipeline)
    wait_sorted(KILL_AFTER)
    kill(pipeline, "PipelineWorker/demo-main-1")
    notices(pipeline, "demo/master/1", ("ALARM",), "demo/worker/main-1")
    wait_for(lambda: counters(pipeline, "demo/master/1")["LostWorkers"] >= 1, what="LostWorkers counted")

    def worker_busy():
        return counters(pipeline, "demo/worker/main-1")["FramesOut"] > 0

    restart(pipeline, "PipelineWorker/demo-main-1", worker_busy)
    path = finish_scan(pipeline, master)
    assert_exact_rows(file_rows(path), FRAMES, lost=[])
    assert state_and_status(pipeline, "demo/master/1")[0] == "ON"  # the alarm went with the worker's return


def test_sorter_killed_and_restarted_losses_exact(pipeline):
    master, scan, wait_sorted = start_scan(pipeline)
    wait_sorted(KILL_AFTER)
    before = counters(pipeline, "demo/writer/hdf5")["FramesWritten"]
    kill(pipeline, "PipelineSorter/demo-main")
    for name in ("demo/worker/main-1", "demo/sink/1", "demo/writer/hdf5"):
        notices(pipeline, name, ("UNKNOWN",), "demo/sorter/main")

    def writing():
        return counters(pipeline, "demo/writer/hdf5")["FramesWritten"] > before + 10

    restart(pipeline, "PipelineSorter/demo-main", writing)
    path = finish_scan(pipeline, master)
    rows = file_rows(path)
    gaps = rows["gaps"]  # what the old sorter held: taken from the workers, never delivered
    assert_exact_rows(rows, FRAMES, lost=gaps)
    assert len(gaps) <= 300  # bounded by what one sorter holds (window + outboxes)
    assert counters(pipeline, "demo/writer/hdf5")["GapsWritten"] >= len(gaps)


def test_sink_killed_and_restarted_losses_exact_and_the_file_complete(pipeline):
    master, scan, wait_sorted = start_scan(pipeline)
    wait_sorted(KILL_AFTER)
    kill(pipeline, "PipelineSink/demo")
    notices(pipeline, "demo/sorter/main", ("ALARM",), "demo/sink/1")

    def sink_fed():
        return counters(pipeline, "demo/sink/1")["FramesIn"] > 10

    restart(pipeline, "PipelineSink/demo", sink_fed)
    path = finish_scan(pipeline, master)
    assert_exact_rows(file_rows(path), FRAMES, lost=[])  # the writer lost nothing
    lost = lost_for(pipeline, "demo/sink/1", scan)
    assert counters(pipeline, "demo/sorter/main")["LostForConsumers"] >= len(lost)
    sink = pipeline.proxy("demo/sink/1")
    held = json.loads(sink.GetSlice(json.dumps({"scan": int(scan), "stream": "main", "name": "center_sum"})))
    indices = set(held["indices"])
    assert not indices & set(lost)  # a lost index is not claimed as held
    first = min(indices | set(lost))
    assert indices | set(lost) == set(range(first, FRAMES))  # from its return on: held or lost, exactly


def test_writer_killed_and_restarted_continues_the_same_file(pipeline):
    master, scan, wait_sorted = start_scan(pipeline)
    wait_sorted(KILL_AFTER)
    path = pipeline.proxy("demo/writer/hdf5").LastFile
    kill(pipeline, "PipelineWriter/demo-hdf5")
    notices(pipeline, "demo/sorter/main", ("ALARM",), "demo/writer/hdf5")

    def writing():
        return counters(pipeline, "demo/writer/hdf5")["FramesWritten"] > 10

    restart(pipeline, "PipelineWriter/demo-hdf5", writing)
    assert finish_scan(pipeline, master) == path  # the same file
    rows = file_rows(path)
    lost_at_sorter = lost_for(pipeline, "demo/writer/hdf5", scan)
    lost_rows = counters(pipeline, "demo/writer/hdf5")["LostRows"]
    assert_exact_rows(rows, FRAMES, lost=rows["gaps"])
    assert set(lost_at_sorter) <= set(rows["gaps"])
    assert len(rows["gaps"]) == len(lost_at_sorter) + lost_rows  # each loss said once, by whoever saw it


def test_master_killed_and_restarted_ends_the_scan_and_numbers_on(pipeline):
    master, scan, wait_sorted = start_scan(pipeline)
    wait_sorted(KILL_AFTER)
    kill(pipeline, "PipelineMaster/demo")
    for name in ("demo/worker/main-1", "demo/worker/main-2"):
        notices(pipeline, name, ("UNKNOWN",), "demo/master/1")
    restart(pipeline, "PipelineMaster/demo", lambda: counters(pipeline, "demo/master/1")["Workers"] == 2)
    master, next_scan, _ = start_scan(pipeline)
    assert int(next_scan) > int(scan)
    path = finish_scan(pipeline, master)
    assert_exact_rows(file_rows(path), FRAMES, lost=[])
    assert counters(pipeline, "demo/sorter/main")["AbortedScans"] == 1
    writer = pipeline.proxy("demo/writer/hdf5")
    aborted = [p for p in (writer.LastFile.replace(f"{int(next_scan):05}", f"{int(scan):05}"),) if os.path.exists(p)]
    assert aborted, "the interrupted scan's file"
    rows = file_rows(aborted[0])
    n = len(rows["index"])
    assert 0 < n < FRAMES
    assert_exact_rows(rows, n, lost=rows["gaps"])  # closed, readable, every row accounted for
