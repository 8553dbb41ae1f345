"""End to end: the demo pipeline on a real pytango-db, real server processes,
real sockets and files, driven by the ``tangopipe`` command like a user."""

import json
import os
import subprocess
import time

import h5py
import numpy as np
import pytest
import tango
import zmq

from devices.database import database, pid_alive, register, stop_process
from devices.deploy import start_server
from pipelines.definition import DeviceSpec, load_definition
from pipelines.sources.simulator import SimulatedDetector
from pipelines.steps import StepChain
from tests.waiting import wait_for

from .conftest import demo_config, pids_alive, tangopipe, user_env

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytestmark = pytest.mark.slow

FRAMES = 200
DEVICE_KEYS = {"name", "class", "state", "status", "endpoint", "counters"}



def test_status_json_has_stable_keys_and_every_device_is_on(deployed):
    status = deployed.status()
    assert set(status) == {"devices", "lavue"}
    assert [d["name"] for d in status["devices"]] == [s.name for s in load_definition(deployed.config).devices()]
    for device in status["devices"]:
        assert set(device) == DEVICE_KEYS
        assert device["state"] == "ON", device
        assert {"FramesIn", "FramesOut", "BadMessages"} <= set(device["counters"])
    bound = [d for d in status["devices"] if d["class"] in ("PipelineMaster", "PipelineSorter")]
    assert bound and all(d["endpoint"].startswith("tcp://127.0.0.1:") for d in bound)
    host, port = status["lavue"]["address"].split(":")
    assert host == "127.0.0.1" and int(port) > 0


def test_scan_of_200_frames_processed_once_in_order_written_shown_in_lavue(deployed):
    from lavuelib.imageSource import ZMQSource

    status = deployed.status()
    lavue = ZMQSource()
    lavue.setConfiguration(f"{status['lavue']['address']}/main.binned")
    lavue.connect()
    # malformed messages at every bound data port, before and during the scan
    ctx = zmq.Context.instance()
    targets = {
        "demo/master/1": (zmq.DEALER, deployed.proxy("demo/master/1").DataEndpoint),
        "demo/sorter/main": (zmq.DEALER, deployed.proxy("demo/sorter/main").CollectEndpoint),
    }
    bad_before = {name: deployed.proxy(name).BadMessages for name in targets}
    sockets = []
    for kind, endpoint in targets.values():
        sock = ctx.socket(kind)
        sock.linger = 0
        sock.connect(endpoint)
        sockets.append(sock)
    for sock in sockets:
        sock.send_multipart([b'{"protocol": "tangopipe/1", "kind": "result", "scan": 1, "index": -1}'])
    meta = {"sample": "LaB6", "motors": {"samx": [0.0, 1.0]}, "scan_id": 7}
    scan = subprocess.Popen(
        [str(deployed.env["PATH"].split(":")[0] + "/tangopipe"), "scan", "--frames", str(FRAMES),
         "--meta", json.dumps(meta)], env=deployed.env, cwd=deployed.folder, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    images = []
    garbage_sent = False
    deadline = time.monotonic() + 120
    while scan.poll() is None and time.monotonic() < deadline:
        img, name, _ = lavue.getData()
        if img is not None and name:
            images.append((name, np.array(img)))
        else:
            time.sleep(0.02)
        if len(images) >= 5 and not garbage_sent:
            garbage_sent = True
            for sock in sockets:
                sock.send_multipart([b"garbage during the scan"])
    out, err = scan.communicate(timeout=60)
    assert scan.returncode == 0, err
    assert garbage_sent
    quiet_until = time.monotonic() + 1.5
    while time.monotonic() < quiet_until:
        img, name, _ = lavue.getData()
        if img is not None and name:
            images.append((name, np.array(img)))
            quiet_until = time.monotonic() + 1.0
        time.sleep(0.02)
    lavue.disconnect()
    for sock in sockets:
        sock.close(0)
    result = json.loads(out)
    assert result["scan"] == "7" and result["acquired"] == FRAMES
    assert "scan 7 [" in err  # the progress bar

    # counters agree along the pipeline
    master, sorter = deployed.proxy("demo/master/1"), deployed.proxy("demo/sorter/main")
    sink, writer = deployed.proxy("demo/sink/1"), deployed.proxy("demo/writer/hdf5")
    workers = [deployed.proxy(f"demo/worker/main-{i}") for i in (1, 2)]
    assert master.ScanFrames == FRAMES and master.DroppedFrames == 0 and master.Redispatched == 0
    assert sum(w.FramesOut for w in workers) == FRAMES and all(w.FramesOut > 0 for w in workers)
    assert sorter.FramesOut == FRAMES and sorter.Duplicates == 0 and sorter.MissingFrames == 0
    assert writer.FramesWritten == FRAMES and sink.FramesIn == FRAMES
    for name in targets:
        assert deployed.proxy(name).BadMessages == bad_before[name] + 2

    # the file holds every frame once, in order, with the scan metadata, results right
    definition = load_definition(deployed.config)
    chain = StepChain(definition.groups["main"]["steps"])
    source = SimulatedDetector(**{k: v for k, v in definition.source.items() if k != "kind"})
    with h5py.File(writer.LastFile) as f:
        data = f["entry/main"]
        assert list(data["index"][:]) == list(range(FRAMES)) and data["valid"][:].all()
        assert json.loads(f["entry/scan/metadata_json"][()])["sample"] == "LaB6"
        assert f["entry/scan/scan_id"][()] == 7
        for i in (0, 1, 99, FRAMES - 1):
            expected = chain(source.frame(i), {})
            assert data["center_sum"][i] == expected["center_sum"]
            np.testing.assert_array_equal(data["binned"][i], expected["binned"])
        last_row = {k: data[k][FRAMES - 1] for k in ("center_sum", "ring1_mean", "total_sum")}

    # the sink's latest result is the last frame's
    latest = json.loads(sink.LatestScalars)
    assert latest["index"] == FRAMES - 1 and sink.LatestIndex == FRAMES - 1
    for key, value in last_row.items():
        assert latest[key] == value
    latest_image = sink.LatestImage
    np.testing.assert_array_equal(latest_image, chain(source.frame(FRAMES - 1), {})["binned"])

    # Lavue got the images, the last one equal to the sink's latest, upright (transposed on the wire)
    assert len(images) >= 3
    name, last = images[-1]
    assert name == f"scan 7 #{FRAMES - 1}"
    np.testing.assert_array_equal(last, latest_image.T)
    assert "main.binned" in deployed.status()["lavue"]["topics"]


def _register_and_start(deployed, spec: DeviceSpec) -> int:
    register(database(deployed.tango_host), load_definition(deployed.config), [spec])
    return start_server(spec.server, deployed.tango_host, loopback=True)


def test_upstream_not_in_database_gives_fault_naming_it(deployed):
    spec = DeviceSpec("demo/worker/stray-1", "PipelineWorker", "PipelineWorker/stray",
                      {"Upstream": "demo/master/99", "Sorter": "demo/sorter/main", "Group": "main"}, "worker")
    pid = _register_and_start(deployed, spec)
    try:
        dev = deployed.proxy(spec.name)
        wait_for(lambda: _state(dev) == tango.DevState.FAULT, what="FAULT")
        assert "demo/master/99" in dev.status() and "not defined in the Tango database" in dev.status()
    finally:
        stop_process(pid)
        database(deployed.tango_host).delete_server(spec.server)


def test_upstream_defined_but_not_running_gives_unknown_then_recovers(deployed):
    ghost = DeviceSpec("demo/sorter/ghost", "PipelineSorter", "PipelineSorter/ghost", {}, "sorter")
    register(database(deployed.tango_host), load_definition(deployed.config), [ghost])
    spec = DeviceSpec("demo/writer/orphan", "PipelineWriter", "PipelineWriter/orphan",
                      {"Upstream": ghost.name, "Directory": str(deployed.folder / "orphan")}, "writer")
    pid = _register_and_start(deployed, spec)
    ghost_pid = 0
    try:
        dev = deployed.proxy(spec.name)
        wait_for(lambda: _state(dev) == tango.DevState.UNKNOWN, what="UNKNOWN")
        assert "demo/sorter/ghost" in dev.status() and "not reachable" in dev.status()
        ghost_pid = start_server(ghost.server, deployed.tango_host, loopback=True)
        wait_for(lambda: _state(dev) == tango.DevState.ON, what="ON once the upstream runs")
        wait_for(lambda: deployed.proxy(ghost.name).Consumers == 1, what="connected")
    finally:
        for p in (pid, ghost_pid):
            if p:
                stop_process(p)
        db = database(deployed.tango_host)
        for server in (spec.server, ghost.server):
            db.delete_server(server)


def _state(dev):
    try:
        return dev.state()
    except tango.DevFailed:
        return None


def test_demo_command_sends_processes_and_writes_300_frames_then_leaves_nothing(tmp_path):
    env = user_env(tmp_path / "state")
    summary_path = tmp_path / "s.json"
    proc = tangopipe("demo", "--frames", "300", "--summary", str(summary_path),
                     "--config", str(demo_config(tmp_path)), env=env, cwd=tmp_path, timeout=300)
    summary = json.loads(summary_path.read_text())
    assert summary["frames"] == {"sent": 300, "processed": 300, "written": 300, "lost": 0}
    assert "lost 0" in proc.stdout
    with h5py.File(summary["file"]) as f:
        assert f["entry/main/valid"][:].sum() == 300
    assert summary["devices"]["demo/writer/hdf5"]["FramesWritten"] == 300
    assert not (tmp_path / "state" / "session.json").exists()


def test_down_stops_every_process_it_started(tmp_path):
    from .conftest import Deployed

    pipeline = Deployed(tmp_path)
    pids = [pipeline.session["db_pid"], *pipeline.session["servers"].values()]
    assert len(pids_alive(pids)) == len(pids) == 7
    out = pipeline.down().stdout
    assert "PyDatabaseds" in out
    wait_for(lambda: not pids_alive(pids), timeout=15, what="all processes gone")
    assert not any(pid_alive(p) for p in pids)
