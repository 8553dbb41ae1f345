"""Delivery rules with real server processes: a killed worker, workers added and
removed during a scan. Nothing lost, nothing twice, order kept."""

import json
import os
import signal
import subprocess
import time

import h5py
import pytest

from .conftest import BIN, Deployed, tangopipe

pytestmark = pytest.mark.slow


def fast_config(folder, steps=None, **master):
    from .conftest import demo_config

    path = demo_config(folder)
    import yaml

    data = yaml.safe_load(path.read_text())
    data["master"]["source"].update(shape=[512, 512], rate_hz=0)
    data["master"].update(heartbeat_timeout_s=1.0, **master)
    data["groups"]["main"]["steps"] = steps or [{"roi_stats": {"rois": {"center": [200, 300, 200, 300]}, "bin": 4}}]
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def fast_pipeline(tmp_path, request):
    fast_config(tmp_path, getattr(request, "param", None))
    pipeline = Deployed(tmp_path, config=tmp_path / "pipeline.yaml")
    yield pipeline
    pipeline.down()


def start_scan(pipeline, frames, **meta):
    return subprocess.Popen(
        [str(BIN / "tangopipe"), "scan", "--frames", str(frames), "--meta", json.dumps(meta)],
        env=pipeline.env, cwd=pipeline.folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finish(scan):
    out, err = scan.communicate(timeout=240)
    assert scan.returncode == 0, err
    return json.loads(out)


def assert_complete(path, frames):
    with h5py.File(path) as f:
        data = f["entry/main"]
        assert list(data["index"][:]) == list(range(frames))
        assert data["valid"][:].all()


# workers slower than the source (5 ms of CPU a frame): each always holds frames when killed
@pytest.mark.parametrize("fast_pipeline", [[{"benchmarks.steps:busy": {"ms": 5}}]], indirect=True)
def test_kill_9_of_a_worker_mid_scan_loses_nothing(fast_pipeline):
    master = fast_pipeline.proxy("demo/master/1")
    scan = start_scan(fast_pipeline, 2000)
    deadline = time.monotonic() + 60
    while master.ScanFrames < 400 and time.monotonic() < deadline:
        time.sleep(0.02)
    victim = fast_pipeline.session["servers"]["PipelineWorker/demo-main-1"]
    os.kill(victim, signal.SIGKILL)
    result = finish(scan)
    assert result["acquired"] == 2000
    assert_complete(result["files"]["hdf5"], 2000)
    assert master.LostWorkers == 1
    assert master.Redispatched >= 1  # the killed worker held frames (the queue was never empty)
    sorter = fast_pipeline.proxy("demo/sorter/main")
    assert sorter.MissingFrames == 0 and sorter.FramesOut == 2000
    assert fast_pipeline.proxy("demo/writer/hdf5").FramesWritten == 2000


def test_workers_added_and_removed_during_a_scan(fast_pipeline):
    master = fast_pipeline.proxy("demo/master/1")
    scan = start_scan(fast_pipeline, 1500, rate_hz=150)
    deadline = time.monotonic() + 60
    while master.ScanFrames < 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    tangopipe("scale", str(fast_pipeline.config), "workers", "3", env=fast_pipeline.env, cwd=fast_pipeline.folder)
    new = fast_pipeline.proxy("demo/worker/main-3")
    while new.FramesOut == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    joined_after = time.monotonic() - started
    assert new.FramesOut > 0 and master.ScanFrames < 1500, "the new worker got frames during the scan"
    tangopipe("scale", str(fast_pipeline.config), "workers", "1", env=fast_pipeline.env, cwd=fast_pipeline.folder)
    assert master.ScanFrames < 1500, "workers were removed during the scan"
    result = finish(scan)
    assert_complete(result["files"]["hdf5"], 1500)
    status = fast_pipeline.status()
    assert [d["name"] for d in status["devices"] if "worker" in d["name"]] == ["demo/worker/main-1"]
    assert master.Workers == 1
    print(f"new worker received frames {joined_after:.1f} s after the scale command")
