"""End to end: a real pipeline writes a Sardana-like scan (raw frames and results, motors per
point), then ``tangopipe reprocess`` runs the same definition on the raw file: identical
results, a new processing version, the originals untouched, nothing left running."""

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from pipelines.sources.simulator import SimulatedDetector
from pipelines.steps import StepChain
from tests.waiting import wait_for

from .conftest import Deployed, pids_alive, tangopipe

pytestmark = pytest.mark.slow

FRAMES = 12
SHAPE = [256, 256]
STEPS = [{"roi_stats": {"rois": {"center": [96, 160, 96, 160]}, "bin": 4}}]


def config(folder: Path) -> Path:
    data = yaml.safe_load((Path(__file__).resolve().parent.parent / "config" / "demo.yaml").read_text())
    data["master"]["source"] = {"kind": "simulator", "shape": SHAPE, "rate_hz": 50, "frames": FRAMES}
    data["groups"] = {"main": {"workers": 2, "steps": STEPS}, "raw": {"workers": 1, "steps": ["passthrough"]}}
    data["sink"]["lavue"]["port"] = 0
    pattern = "{pipeline}_{stream}_scan{scan:05}.h5"
    data["writers"] = {
        "hdf5": {"group": "main", "directory": str(folder / "data"), "pattern": pattern},
        "raw": {
            "group": "raw",
            "directory": str(folder / "data"),
            "pattern": pattern,
            "compression": "bslz4",
        },
    }
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return path



def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.timeout(900)
def test_a_point_scan_is_written_and_reprocessed_from_its_raw_frames(tmp_path):
    cfg = config(tmp_path)
    pipeline = Deployed(tmp_path, cfg)
    pids = [pipeline.session["db_pid"], *pipeline.session["servers"].values()]
    try:
        master = pipeline.proxy("demo/master/1")
        writers = [pipeline.proxy("demo/writer/hdf5"), pipeline.proxy("demo/writer/raw")]
        meta = {
            "scan_id": 21,
            "frames": FRAMES,
            "point_trigger": True,
            "motors": ["samx", "samy"],
            "sample": "LaB6",
            "scan_shape": [3, 4],
            "command": "mesh samx 0 1.5 3 samy 0 1 2 0.1",
        }
        master.StartScan(json.dumps(meta))
        for i in range(FRAMES):  # what a Sardana point hook sends after each point
            row, col = divmod(i, 4)
            master.AddPointMetadata(
                json.dumps({"index": i, "positions": {"samx": 0.5 * col, "samy": 0.5 * row}})
            )
        wait_for(lambda: master.ScanFrames == FRAMES and not master.Acquiring, what="every point acquired")
        master.EndScan()
        wait_for(lambda: all(w.ScansDone == 1 for w in writers), what="files closed")
        main_file, raw_file = Path(writers[0].LastFile), Path(writers[1].LastFile)
    finally:
        pipeline.down()
    wait_for(lambda: not pids_alive(pids), timeout=30, what="the servers gone")

    chain = StepChain(STEPS)
    source = SimulatedDetector(shape=SHAPE, rate_hz=0, frames=FRAMES)
    assert main_file.name == "demo_main_scan00021.h5" and raw_file.name == "demo_raw_scan00021.h5"
    with h5py.File(main_file) as f:  # plain h5py: defaults lead to the data
        entry = f[f.attrs["default"]]
        data = entry[entry.attrs["default"]]
        assert data.name == "/entry/main" and data[data.attrs["signal"]].shape == (FRAMES,)
        assert list(data["index"][()]) == list(range(FRAMES)) and data["valid"][()].all()
        for i in range(FRAMES):
            expected = chain(source.frame(i), {})
            assert data["center_sum"][i] == expected["center_sum"]
            np.testing.assert_array_equal(data["binned"][i], expected["binned"])
        positions = entry["scan/positions"]
        assert list(positions["samx"][()]) == [0.5 * (i % 4) for i in range(FRAMES)]
        assert list(positions["samy"][()]) == [0.5 * (i // 4) for i in range(FRAMES)]
        assert json.loads(entry["process/configuration_json"][()])["main"]["steps"] == STEPS
        assert entry["title"][()] == meta["command"].encode() and entry["sample/name"][()] == b"LaB6"
        online = {name: data[name][()] for name in data}
    originals = {p: digest(p) for p in (main_file, raw_file)}

    out = tmp_path / "reprocessed"
    try:
        proc = tangopipe(
            "reprocess",
            str(cfg),
            str(raw_file),
            "--groups",
            "main",
            "--output",
            str(out),
            env=pipeline.env,
            cwd=tmp_path,
            timeout=400,
        )
    finally:  # whatever happened, nothing of the reprocessing pipeline stays up
        tangopipe(
            "down",
            env={**pipeline.env, "TANGOPIPE_STATE": str(tmp_path / "state" / "reprocess")},
            cwd=tmp_path,
            check=False,
        )
    (result,) = json.loads(proc.stdout)
    assert result["frames"] == FRAMES and result["written"] == {"hdf5": FRAMES}
    new_file = Path(result["files"]["hdf5"])
    assert new_file.parent == out and new_file.name == "demo-re_main_scan00021.h5"
    with h5py.File(new_file) as f:
        data = f["entry/main"]
        for name, values in online.items():
            if name == "processing_version":
                assert (data[name][()] == values + 1).all()  # a new version: the raw file's + this run's
            else:
                np.testing.assert_array_equal(data[name][()], values, err_msg=name)
        assert f["entry/process/reprocessed_from"][()].decode() == str(raw_file)
        np.testing.assert_array_equal(f["entry/scan/positions/samx"][()], online_positions(main_file, "samx"))
        assert f["entry/sample/name"][()] == b"LaB6"
    assert {p: digest(p) for p in originals} == originals
    assert not (tmp_path / "state" / "reprocess" / "session.json").exists()


def online_positions(path: Path, motor: str) -> np.ndarray:
    with h5py.File(path) as f:
        return f[f"entry/scan/positions/{motor}"][()]
