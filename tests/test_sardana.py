"""Sardana drives tangopipe: a real Sardana (pool + MacroServer + Door, ``sar_demo``
motors and counters) on the pipeline's own database, the hook macros of
config/sardana defined with ``defgh``, step scans run through the Door.

tangopipe must receive each scan's id, grid and per-point positions and write
them to its file; the sink's scalar attribute must appear as a scan column.
Run with ``-p no:sardana_pool_plugins`` (Sardana installs a pytest plugin).
"""

import json
import math
import re
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import tango
import yaml
from sardana.tango.core.util import register_sardana

from devices.database import pid_alive, stop_process
from devices.sardana_cli import DEFGH_LINES, macro_folder
from devices.sink import PipelineSink

from .conftest import BIN, ROOT, Deployed, demo_config, pids_alive, tangopipe, user_env
from .servers import DeviceServerContext

pytestmark = pytest.mark.slow

INSTANCE = "tangopipe_test"
FINAL = {"finish", "exception", "abort", "stop"}


def small_pipeline(folder: Path) -> Path:
    """The demo pipeline on a 256x256 simulated detector with one worker; roi_stats without
    binning (no kernel to compile, so results come within a scan point)."""
    demo = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    demo["master"]["source"].update(shape=[256, 256], rate_hz=50)
    main = demo["groups"]["main"]
    main["workers"] = 1
    main["steps"] = [{"roi_stats": {"rois": {"center": [96, 160, 96, 160]}, "bin": 1}}]
    return demo_config(folder, master=demo["master"], groups=demo["groups"])


class Beamline:
    """A deployed pipeline and a Sardana on its database, driven through the Door."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.scan_dir = folder / "scans"
        self.scan_dir.mkdir()
        self.pipeline = Deployed(folder, small_pipeline(folder))
        self.host = self.pipeline.tango_host
        self.sardana_pid = 0
        self.subscription = None
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        hostname, _, port = self.host.rpartition(":")
        self.db = tango.Database(hostname, int(port))
        # the sink's scalar results as attributes: property, then Init
        self.db.put_device_property("demo/sink/1", {"ScalarAttributes": ["center_sum"]})
        self.sink = self.pipeline.proxy("demo/sink/1")
        self.sink.Init()
        self.master = self.pipeline.proxy("demo/master/1")
        self.door = self._start_sardana()

    def _start_sardana(self) -> tango.DeviceProxy:
        register_sardana(self.db, "Sardana", INSTANCE)
        devices = list(self.db.get_device_class_list(f"Sardana/{INSTANCE}"))
        by_class = dict(zip(devices[1::2], devices[::2], strict=True))
        self.db.put_device_property(
            by_class["MacroServer"],
            {"MacroPath": [str(macro_folder())], "EnvironmentDb": [str(self.folder / "ms_env.db")]},
        )
        env = dict(self.pipeline.env, TANGO_HOST=self.host)
        with open(self.folder / "sardana.log", "w") as log:
            proc = subprocess.Popen(
                [str(BIN / "Sardana"), INSTANCE, "-ORBendPoint", "giop:tcp:127.0.0.1:0"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.sardana_pid = proc.pid
        door = tango.DeviceProxy(f"tango://{self.host}/{by_class['Door']}")
        deadline = time.monotonic() + 120
        while True:
            try:
                door.ping()
                if door.State() == tango.DevState.ON:
                    break
            except tango.DevFailed:
                pass
            if not pid_alive(proc.pid) or time.monotonic() > deadline:
                raise AssertionError(f"Sardana did not start; see {self.folder / 'sardana.log'}")
            time.sleep(0.3)
        door.set_timeout_millis(30000)  # a loaded machine: the first RunMacro loads a lot
        self.statuses: list[dict] = []  # MacroStatus events: [{"id", "state", ...}]
        self.subscription = door.subscribe_event(
            "MacroStatus", tango.EventType.CHANGE_EVENT, self._on_macro_status
        )
        return door

    def _on_macro_status(self, event) -> None:
        if not event.err and event.attr_value is not None and event.attr_value.value[1]:
            self.statuses.extend(json.loads(event.attr_value.value[1]))

    def run(self, *macro: str, timeout: float = 300.0) -> dict:
        """Run a macro through the Door until it ends; its final state and log lines."""
        xml = self.door.RunMacro([str(part) for part in macro])[0]
        macro_id = re.search(r'id="([^"]+)"', xml).group(1)
        deadline = time.monotonic() + timeout
        idle_since = None
        next_look = time.monotonic() + 2.0
        while True:
            final = [
                s["state"] for s in list(self.statuses) if s.get("id") == macro_id and s["state"] in FINAL
            ]
            if final and self._door_state() not in (tango.DevState.RUNNING, None):
                break
            if not final and time.monotonic() >= next_look:
                # a status event may be lost on a loaded machine: a Door idle for 10 s has finished
                next_look = time.monotonic() + 2.0
                door_state = self._door_state()
                idle = door_state in (tango.DevState.ON, tango.DevState.ALARM)
                idle_since = (idle_since or time.monotonic()) if idle else None
                if idle_since is not None and time.monotonic() - idle_since > 10.0:
                    final = ["finish" if door_state == tango.DevState.ON else "exception"]
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"macro {macro} still running after {timeout} s\n{self.diagnosis()}")
            time.sleep(0.05)
        logs = {
            level: list(self.door.read_attribute(level).value or ())
            for level in ("Output", "Warning", "Error")
        }
        return {"state": final[-1], **logs}

    def diagnosis(self) -> str:
        """What the Door and Sardana say, for a macro that does not end."""
        lines = [f"Door state {self._door_state()}; MacroStatus events: {self.statuses[-5:]}"]
        for level in ("Output", "Warning", "Error", "Debug"):
            try:
                lines.append(f"Door {level}: {list(self.door.read_attribute(level).value or ())[-10:]}")
            except tango.DevFailed as exc:
                lines.append(f"Door {level}: unreadable ({exc.args[0].desc.strip()[:100] if exc.args else exc})")
        log = self.folder / "sardana.log"
        tail = log.read_text(errors="replace").splitlines()[-40:] if log.exists() else []
        return "\n".join(lines + ["sardana.log (last lines):", *tail])

    def _door_state(self):
        """The Door's state, or None while it is too busy to answer."""
        try:
            return self.door.State()
        except tango.DevFailed:
            return None

    def setup_scans(self) -> None:
        master = f"tango://{self.host}/demo/master/1"
        sink = f"tango://{self.host}/demo/sink/1"
        for macro in (
            ["sar_demo"],
            ["senv", "ScanDir", str(self.scan_dir)],
            ["senv", "ScanFile", "scans.dat"],
            ["senv", "TangopipeMaster", master],
            ["senv", "TangopipePointTrigger", "True"],
            ["defmeas", "mg_tangopipe", "ct01", f"{sink}/center_sum", f"{sink}/LatestIndex"],
            ["senv", "ActiveMntGrp", "mg_tangopipe"],
            *(line.split() for line in DEFGH_LINES),
        ):
            result = self.run(*macro)
            assert result["state"] == "finish", (macro, result)

    def close(self) -> None:
        pids = []
        if self.subscription is not None:
            self.door.unsubscribe_event(self.subscription)
        if self.sardana_pid:
            stop_process(self.sardana_pid)
            pids.append(self.sardana_pid)
        self.pipeline.down()
        pids += [self.pipeline.session["db_pid"], *self.pipeline.session["servers"].values()]
        deadline = time.monotonic() + 10
        while pids_alive(pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pids_alive(pids)


@pytest.fixture(scope="module")
def beamline(tmp_path_factory):
    line = None
    try:
        line = Beamline(tmp_path_factory.mktemp("sardana"))
        line.setup_scans()
        yield line
    finally:
        if line is not None:
            line.close()


def spec_scans(path: Path) -> dict[int, dict]:
    """Sardana's SPEC file: scan number -> {"title", "columns": {label: values}}."""
    scans: dict[int, dict] = {}
    current = None
    for line in path.read_text().splitlines():
        if line.startswith("#S "):
            number, _, title = line[3:].partition(" ")
            current = scans[int(number)] = {"title": title, "labels": [], "rows": []}
        elif current is not None and line.startswith("#L "):
            current["labels"] = line[3:].split("  ")
        elif current is not None and line and not line.startswith("#"):
            current["rows"].append([float(v) for v in line.split()])
    for scan in scans.values():
        rows = np.array(scan.pop("rows"), dtype=float).reshape(-1, len(scan["labels"]))
        scan["columns"] = {label.strip(): rows[:, i] for i, label in enumerate(scan.pop("labels"))}
    return scans


def column(scan: dict, name: str) -> np.ndarray:
    """A SPEC column by (the end of) its label: external channels are labelled by attribute."""
    found = [label for label in scan["columns"] if label == name or label.lower().endswith(name.lower())]
    assert len(found) == 1, (name, list(scan["columns"]))
    return scan["columns"][found[0]]


def scan_and_file(beamline: Beamline, *macro: str) -> tuple[dict, dict, Path]:
    """Run a scan macro; its Door result, its SPEC record and tangopipe's file once closed."""
    writer = beamline.pipeline.proxy("demo/writer/hdf5")
    done = writer.ScansDone
    result = beamline.run(*macro)
    assert result["state"] == "finish", result
    scans = spec_scans(beamline.scan_dir / "scans.dat")
    scan_id = max(scans)
    assert scans[scan_id]["title"].startswith(" ".join(macro[:2])), scans[scan_id]
    deadline = time.monotonic() + 60
    while writer.ScansDone <= done:
        assert time.monotonic() < deadline, f"tangopipe did not close the file of scan {scan_id}"
        time.sleep(0.1)
    return result, scans[scan_id], beamline.scan_dir / f"demo_scan{scan_id:05}.h5"


def scalars_match_their_index(scan: dict, results: np.ndarray) -> int:
    """Each row's center_sum is the result of frame LatestIndex (the frame Sardana saw);
    the simulator's frame i is the same in every scan, so an index left over from the
    previous scan gives the same value. Returns the rows that had a result."""
    values, indices = column(scan, "center_sum"), column(scan, "LatestIndex")
    seen = 0
    for value, index in zip(values, indices, strict=True):
        if index < 0:
            assert math.isnan(value)
            continue
        seen += 1
        assert value == pytest.approx(results[int(index)], rel=1e-6)
    return seen


def test_ascan_gives_scan_id_positions_and_a_tangopipe_column(beamline):
    result, sardana, path = scan_and_file(beamline, "ascan", "mot01", "0", "1", "4", "0.1")
    assert not result["Warning"], result
    scan_id = int(path.stem[-5:])
    with h5py.File(path, "r") as f:
        entry = f["entry"]
        assert entry["scan_id"][()].decode() == str(scan_id)
        scan = entry["scan"]
        assert scan["scan_id"][()] == scan_id
        assert scan["macro"][()].decode() == "ascan"
        assert json.loads(scan["motors"][()]) == ["mot01"]
        assert list(scan["scan_shape"][()]) == [1, 5]
        assert scan["frames"][()] == 5
        assert scan["scan_dir"][()].decode() == str(beamline.scan_dir)
        assert entry["frames_written"][()] == 5
        assert list(entry["main/index"][()]) == [0, 1, 2, 3, 4]
        results = entry["main/center_sum"][()]
        positions = scan["positions/mot01"][()]
    # the position tangopipe stored with frame i is the one Sardana recorded at point i
    assert positions == pytest.approx(column(sardana, "mot01"))
    assert positions == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert beamline.master.PointsReported == 5
    # the tangopipe scalar is a column of the scan, with the frame it came from
    assert len(column(sardana, "center_sum")) == 5
    assert scalars_match_their_index(sardana, results) >= 1


def test_snake_mesh_gives_grid_and_positions_in_acquisition_order(beamline):
    # the point hook also works at pre-acq (positions known before the frame is taken)
    assert beamline.run("udefgh", "tangopipe_point")["state"] == "finish"
    assert beamline.run("defgh", "tangopipe_point", "pre-acq")["state"] == "finish"
    macro = ("mesh", "mot01", "0", "1", "2", "mot02", "0", "0.5", "1", "0.1", "True")
    try:
        result, sardana, path = scan_and_file(beamline, *macro)
    finally:
        assert beamline.run("udefgh", "tangopipe_point")["state"] == "finish"
        assert beamline.run(*DEFGH_LINES[1].split())["state"] == "finish"
    scan_id = int(path.stem[-5:])
    with h5py.File(path, "r") as f:
        scan = f["entry/scan"]
        assert scan["scan_id"][()] == scan_id
        assert list(scan["scan_shape"][()]) == [2, 3]  # [slow mot02, fast mot01]
        assert bool(scan["snake"][()]) is True
        assert json.loads(scan["motors"][()]) == ["mot01", "mot02"]
        assert f["entry/frames_written"][()] == 6
        results = f["entry/main/center_sum"][()]
        positions = {motor: scan[f"positions/{motor}"][()] for motor in ("mot01", "mot02")}
    for motor in ("mot01", "mot02"):
        assert positions[motor] == pytest.approx(column(sardana, motor))
    # frame i is point i: the second row of a snake runs backwards
    assert positions["mot01"] == pytest.approx([0.0, 0.5, 1.0, 1.0, 0.5, 0.0])
    assert positions["mot02"] == pytest.approx([0.0, 0.0, 0.0, 0.5, 0.5, 0.5])
    # the sink assembles the map on the Sardana grid
    query = json.dumps({"scan": scan_id, "stream": "main", "name": "center_sum"})
    grid = np.array(json.loads(beamline.sink.GetMap(query))["map"])
    assert grid.shape == (2, 3)
    assert grid[1, ::-1] == pytest.approx(results[3:6])  # snake: row 1 measured from right to left
    assert scalars_match_their_index(sardana, results) >= 1


def test_master_down_warns_and_the_scan_goes_on_or_aborts_when_asked(beamline):
    # a master that is defined in the database but whose server is not running
    info = tango.DbDevInfo()
    info.name, info._class, info.server = "demo/master/down", "PipelineMaster", "PipelineMaster/down"
    beamline.db.add_device(info)
    before = len(spec_scans(beamline.scan_dir / "scans.dat"))
    assert (
        beamline.run("senv", "TangopipeMaster", f"tango://{beamline.host}/demo/master/down")["state"]
        == "finish"
    )
    try:
        result = beamline.run("ascan", "mot01", "0", "1", "2", "0.05")
        assert result["state"] == "finish", result
        warnings = " ".join(result["Warning"])
        assert "tangopipe" in warnings and "demo/master/down" in warnings and "goes on" in warnings, result
        scans = spec_scans(beamline.scan_dir / "scans.dat")
        assert len(scans) == before + 1 and len(column(scans[max(scans)], "mot01")) == 3

        assert beamline.run("senv", "TangopipeAbortOnError", "True")["state"] == "finish"
        result = beamline.run("ascan", "mot01", "0", "1", "2", "0.05")
        assert result["state"] == "exception", result
        errors = " ".join(result["Error"])
        assert "demo/master/down" in errors and "TangopipeAbortOnError" in errors, result
        assert len(spec_scans(beamline.scan_dir / "scans.dat")) == before + 1  # no scan ran
    finally:
        beamline.run("senv", "TangopipeAbortOnError", "False")
        beamline.run("senv", "TangopipeMaster", f"tango://{beamline.host}/demo/master/1")
        beamline.db.delete_server("PipelineMaster/down")
    assert not beamline.master.ScanOpen


def test_sardana_path_prints_the_folder_of_the_hook_macros(tmp_path):
    out = tangopipe(
        "sardana-path", "--setup", "--master", "demo/master/1", env=user_env(tmp_path), cwd=tmp_path
    )
    folder = Path(out.stdout.splitlines()[0])
    assert (folder / "tangopipe_hooks.py").is_file()
    assert "senv TangopipeMaster demo/master/1" in out.stdout
    assert all(line in out.stdout for line in DEFGH_LINES)


def test_scalar_attributes_are_named_after_results_and_a_clash_gives_fault_naming_it():
    properties = {"ScalarAttributes": ["hits/count", "2theta_peak"], "LavuePort": -1}
    with DeviceServerContext(PipelineSink, properties=properties) as dev:
        assert {"hits_count", "r_2theta_peak"} <= {a.lower() for a in dev.get_attribute_list()}
        assert math.isnan(dev.hits_count)  # no result yet
        assert dev.get_attribute_config("hits_count").data_format == tango.AttrDataFormat.SCALAR
    properties = {"ScalarAttributes": ["center_sum", "State"], "LavuePort": -1}
    with DeviceServerContext(PipelineSink, properties=properties) as dev:
        assert dev.state() == tango.DevState.FAULT
        assert "ScalarAttributes" in dev.status() and "'State'" in dev.status()
        assert "center_sum" not in dev.get_attribute_list()  # all or nothing
