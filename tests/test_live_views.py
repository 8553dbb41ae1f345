"""Live views end to end: LavueBridge devices on a real pipeline, the sink's pushed
images and spectra, and the Taurus GUI, on a real database with real server processes.

The pipeline runs the test step ``tests.lavue_steps:typed_images`` (one image per
dtype, made from each simulated frame) beside 1D and 2D azimuthal integration, so
every value Lavue and Taurus show is recomputed here from the simulated frame.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # lavuelib and Taurus import Qt; no display here

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tango  # noqa: E402
import yaml  # noqa: E402
from lavuelib.imageSource import NXSFileSource, ZMQSource  # noqa: E402

from devices.database import database, register, stop_process  # noqa: E402
from devices.deploy import start_server  # noqa: E402
from pipelines.definition import DeviceSpec, load_definition  # noqa: E402
from pipelines.sources.simulator import SimulatedDetector  # noqa: E402
from tests.waiting import wait_for

from .conftest import ROOT, Deployed, pids_alive, tangopipe  # noqa: E402
from .lavue_steps import DTYPES, typed_image  # noqa: E402

pytestmark = pytest.mark.slow

SHAPE = [48, 80]  # rows, columns: not square, so a transposed view shows
PONI = """poni_version: 2.1
Detector: Detector
Detector_config: {"pixel1": 7.5e-05, "pixel2": 7.5e-05, "max_shape": [48, 80], "orientation": 3}
Distance: 0.05
Poni1: 0.0018
Poni2: 0.003
Rot1: 0.0
Rot2: 0.0
Rot3: 0.0
Wavelength: 1e-10
"""
SPECTRUM_EVENT_HZ = 1.0
TIMEOUT_S = 60.0


def pipeline_config(folder: Path) -> Path:
    poni = folder / "det.poni"
    poni.write_text(PONI)
    data = {
        "name": "views",
        "master": {
            "source": {"kind": "simulator", "shape": SHAPE, "dtype": "uint16", "rate_hz": 20, "frames": 10000}
        },
        "groups": {
            "main": {
                "workers": 1,
                "steps": [
                    {"tests.lavue_steps:typed_images": {}},
                    {"azimuthal": {"poni": str(poni), "npt": 40}},
                    {"azimuthal2d": {"poni": str(poni), "npt": 40, "npt_azim": 36, "prefix": "c_"}},
                ],
            }
        },
        "sink": {
            "group": "main",
            "lavue": {"port": 0},
            "spectrum_result": "intensity",
            "image_event_rate_hz": SPECTRUM_EVENT_HZ,
            "scalar_attributes": ["total"],
        },
        "lavue_bridges": {
            "live": {"group": "main"},
            "picked": {"group": "main", "topics": ["img_float32"], "max_rate_hz": 5},
        },
    }
    path = folder / "views.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    folder = tmp_path_factory.mktemp("views")
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), before) if p)  # workers import tests.*
    try:
        pipeline = Deployed(folder, pipeline_config(folder))
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = before
    try:
        yield pipeline
    finally:
        pipeline.down()
        pids = [pipeline.session["db_pid"], *pipeline.session["servers"].values()]
        deadline = time.monotonic() + 15
        while pids_alive(pids) and time.monotonic() < deadline:
            time.sleep(0.1)



def counters(dev) -> dict:
    return json.loads(dev.Counters)


class Scan:
    """StartScan on the master; ``finish()`` waits until every consumer has seen the end.

    Scan ids must not repeat (the sorter drops a repeated (scan, index) as a
    duplicate): tests give ids 1000 apart, the scans between take the next ones.
    """

    def __init__(self, live, frames: int, **meta):
        self.live = live
        self.master = live.proxy("views/master/1")
        self.consumers = [live.proxy(n) for n in ("views/sink/1", "views/lavue/live", "views/lavue/picked")]
        self.done = [counters(c).get("ScansDone", 0) for c in self.consumers]
        self.id = self.master.StartScan(json.dumps({"frames": frames, **meta}))

    def finish(self) -> None:
        wait_for(lambda: not self.master.Acquiring, what="acquisition")
        self.master.EndScan()
        wait_for(
            lambda: all(
                counters(c).get("ScansDone", 0) > d for c, d in zip(self.consumers, self.done, strict=True)
            ),
            what="scan end at the sink and the bridges",
        )


class Lavue:
    """Lavue's own ZMQ clients on a bridge, disconnected at the end."""

    def __init__(self, address: str):
        self.address = address
        self.sources: dict[str, ZMQSource] = {}

    def watch(self, topic: str) -> ZMQSource:
        source = ZMQSource()
        source.setConfiguration(f"{self.address}/{topic}")
        assert source.connect()
        self.sources[topic] = source
        return source

    def close(self) -> None:
        for source in self.sources.values():
            source.disconnect()


def read_lavue(source: ZMQSource):
    """One message as Lavue reads it: ("image", array, name, meta), ("topics", list) or None."""
    image, name, meta = source.getData()
    if name == "__ERROR__":
        raise AssertionError(f"Lavue could not read the message: {image}")
    if isinstance(image, np.ndarray):
        return "image", image, name, json.loads(meta)
    if isinstance(image, str) and image == "" and meta:
        return "topics", json.loads(meta).get("datasources")
    return None


def images_of_scan(lavue: Lavue, scan_id: str, topics: list[str], timeout: float = TIMEOUT_S) -> dict:
    """The first image of scan ``scan_id`` each topic delivers: {topic: (array, name, meta)}."""
    got: dict[str, tuple] = {}
    deadline = time.monotonic() + timeout
    while len(got) < len(topics) and time.monotonic() < deadline:
        idle = True
        for topic in topics:
            message = read_lavue(lavue.sources[topic])
            if message is None:
                continue
            idle = False
            if message[0] == "image" and topic not in got and str(message[3].get("scan")) == scan_id:
                got[topic] = message[1:]
        if idle:
            time.sleep(0.005)
    missing = sorted(set(topics) - set(got))
    assert not missing, f"no image of scan {scan_id} from {missing}"
    return got


def source_frame(live, index: int) -> np.ndarray:
    params = {k: v for k, v in load_definition(live.config).source.items() if k != "kind"}
    return SimulatedDetector(**params).frame(index)


# -- Lavue ---------------------------------------------------------------------------------
def test_every_dtype_reaches_lavue_exactly_and_upright(live, tmp_path):
    lavue = Lavue(live.proxy("views/lavue/live").Address)
    topics = [f"main.img_{name}" for name in DTYPES]
    for topic in topics:
        lavue.watch(topic)
    try:
        Scan(live, 4).finish()  # the subscriptions are live from here on
        scan = Scan(live, 60, scan_id=1000)
        got = images_of_scan(lavue, scan.id, topics)
        scan.finish()
    finally:
        lavue.close()
    for name, dtype in DTYPES.items():
        image, frame_name, meta = got[f"main.img_{name}"]
        expected = typed_image(source_frame(live, meta["index"]), dtype)
        wire = np.dtype(np.uint8) if expected.dtype == bool else expected.dtype
        assert image.dtype == wire, name  # byte order included
        assert image.shape == (SHAPE[1], SHAPE[0]), name  # (columns, rows): Lavue draws axis 0 across
        np.testing.assert_array_equal(image, expected.T.astype(wire), err_msg=name)
        assert frame_name == f"scan 1000 #{meta['index']}"
    # upright: the same image read by Lavue's file source (which transposes) looks the same
    image, _, meta = got["main.img_uint16"]
    path = tmp_path / "frame.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("entry/data", data=typed_image(source_frame(live, meta["index"]), "uint16"))
    files = NXSFileSource()
    files.setConfiguration(f"{path},/entry/data,-1,0,False,False")
    assert files.connect()
    np.testing.assert_array_equal(image, files.getData()[0])
    # the filtered bridge publishes only what its Topics property names
    assert live.proxy("views/lavue/picked").Topics == ("main.img_float32",)


def test_metadata_lavue_uses_arrives_with_each_frame(live):
    lavue = Lavue(live.proxy("views/lavue/live").Address)
    topics = ["main.c_cake", "main.img_float32", "main.map.total"]
    for topic in topics:
        lavue.watch(topic)
    motors = {"samy": [0.0, 2.0], "samx": [10.0, 13.5]}
    try:
        Scan(live, 4).finish()
        scan = Scan(live, 40, scan_id=2000, scan_shape=[5, 8], motors=motors)
        got = images_of_scan(lavue, scan.id, topics)
        scan.finish()
    finally:
        lavue.close()
    cake, name, meta = got["main.c_cake"]
    assert name == f"scan 2000 #{meta['index']}" and cake.shape == (40, 36)  # (radial, chi) as Lavue draws it
    assert meta["axislabels"] == ["2theta", "chi", "deg", "deg"]
    assert len(meta["axisscales"]) == 4 and meta["axisscales"][2] > 0 and meta["axisscales"][3] > 0
    assert meta["wavelength"] == [pytest.approx(1.0), "A"] and meta["detector_distance"] == [
        pytest.approx(50.0),
        "mm",
    ]
    _, _, meta = got["main.img_float32"]
    assert meta["pixel_size"] == [pytest.approx(75.0), "um", pytest.approx(75.0), "um"]
    assert meta["beam_center_x"] == [pytest.approx(40.0), "pixels"]  # poni2 / pixel size
    assert meta["beam_center_y"] == [pytest.approx(24.0), "pixels"]
    assert {"scan", "index", "stream", "result"} <= set(meta)
    _, _, meta = got["main.map.total"]
    assert meta["axisscales"] == pytest.approx([10.0, 0.0, 0.5, 0.5])
    assert meta["axislabels"] == ["samx", "samy", "", ""]


def test_datasources_change_at_once_when_a_worker_is_reconfigured(live):
    worker, bridge = live.proxy("views/worker/main-1"), live.proxy("views/lavue/live")
    original = json.loads(worker.StepChain)
    fewer = [{"tests.lavue_steps:typed_images": {"dtypes": ["uint8", "float32"]}}, *original[1:]]
    pushed: list[tuple[str, ...]] = []
    lavue = Lavue(bridge.Address)
    source = lavue.watch("main.img_uint8")
    event_id = bridge.subscribe_event(
        "Topics",
        tango.EventType.CHANGE_EVENT,
        lambda e: pushed.append(tuple(e.attr_value.value or ())) if not e.err else None,
    )

    def lavue_lists_topics(want: list[str]) -> None:
        seen = []
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            message = read_lavue(source)
            if message is not None and message[0] == "topics":
                if sorted(message[1]) == sorted(want):  # the publisher keeps its own order
                    return
                seen.append(message[1])
            if message is None:
                time.sleep(0.005)
        raise AssertionError(
            f"Lavue never read the topic list {want}; it read {seen[-3:]}; bridge has {bridge.Topics}"
        )

    try:
        Scan(live, 4).finish()
        full = list(bridge.Topics)
        assert [t for t in full if t.startswith("main.img_")] == [f"main.img_{n}" for n in DTYPES]
        worker.Reconfigure(json.dumps(fewer))
        scan = Scan(live, 6)
        lavue_lists_topics(["main.img_uint8", "main.img_float32", "main.c_cake"])
        scan.finish()
        assert list(bridge.Topics) == ["main.img_uint8", "main.img_float32", "main.c_cake"]
        wait_for(lambda: ("main.img_uint8", "main.img_float32", "main.c_cake") in pushed, what="Topics event")
        worker.Reconfigure(json.dumps(original))
        scan = Scan(live, 6)
        lavue_lists_topics(full)
        scan.finish()
        wait_for(lambda: pushed and sorted(pushed[-1]) == sorted(full), what="Topics change event")
    finally:
        bridge.unsubscribe_event(event_id)
        worker.Reconfigure(json.dumps(original))
        lavue.close()


def test_publish_rate_setpoint_bounds_what_lavue_gets(live):
    picked = live.proxy("views/lavue/picked")
    picked.PublishRateHz = 2.0
    try:
        assert picked.PublishRateHz == 2.0
        scan = Scan(live, 120)  # 6 s at 20 Hz
        time.sleep(1.0)
        t0, before = time.monotonic(), picked.Published
        time.sleep(3.0)
        after, t1 = picked.Published, time.monotonic()
        scan.finish()
        interval = t1 - t0 + 0.2  # counters are read at most 0.1 s old, at both ends
        assert 2 <= after - before <= 2.0 * interval + 1
        assert picked.Skipped > 0  # the rest was replaced before it was due: latest only
    finally:
        picked.PublishRateHz = 5.0


def test_a_bridge_on_the_master_is_refused_with_advice(live):
    spec = DeviceSpec("views/lavue/wrong", "LavueBridge", "LavueBridge/views-wrong",
                      {"Upstream": "views/master/1", "Port": 0}, "lavue")  # fmt: skip
    register(database(live.tango_host), load_definition(live.config), [spec])
    pid = start_server(spec.server, live.tango_host, loopback=True)
    try:
        dev = live.proxy(spec.name)
        wait_for(lambda: _state(dev) == tango.DevState.FAULT, what="FAULT")
        status = dev.status()
        assert "views/master/1" in status and "PipelineMaster" in status and "passthrough" in status
        assert "views/lavue/wrong" not in live.proxy("views/sorter/main").ConsumerNames
    finally:
        stop_process(pid)
        database(live.tango_host).delete_server(spec.server)


def _state(dev):
    try:
        return dev.state()
    except tango.DevFailed:
        return None


# -- Tango events --------------------------------------------------------------------------
def test_sink_image_and_spectrum_events_come_no_faster_than_configured(live):
    sink = live.proxy("views/sink/1")
    arrivals: dict[str, list[float]] = {"LatestImage": [], "LatestSpectrum": []}
    last: dict[str, np.ndarray] = {}
    lock = threading.Lock()

    def listener(name):
        def on_event(event):
            if event.err:
                return
            with lock:
                arrivals[name].append(time.monotonic())
                last[name] = np.array(event.attr_value.value)

        return on_event

    ids = [sink.subscribe_event(n, tango.EventType.CHANGE_EVENT, listener(n)) for n in arrivals]
    try:
        scan = Scan(live, 120)  # 20 frames a second
        time.sleep(1.0)
        t0 = time.monotonic()
        time.sleep(4.0)
        t1 = time.monotonic()
        scan.finish()
    finally:
        for event_id in ids:
            sink.unsubscribe_event(event_id)
    for name, times in arrivals.items():
        count = sum(t0 <= t <= t1 for t in times)
        assert 2 <= count <= SPECTRUM_EVENT_HZ * (t1 - t0) + 1, (name, count)
    assert last["LatestSpectrum"].shape == (40,) and np.all(np.isfinite(last["LatestSpectrum"]))
    assert last["LatestImage"].shape == tuple(SHAPE)


def test_every_attribute_sends_change_events_and_a_scalar_column_follows_the_results(live):
    """Clients (Taurus, Sardana) subscribe to any attribute: none is left to a client's
    keep-alive thread retrying every 10 s, which can deadlock a pytango client."""
    refused = []
    for spec in load_definition(live.config).devices():
        dev = live.proxy(spec.name)
        for name in dev.get_attribute_list():
            try:
                dev.unsubscribe_event(dev.subscribe_event(name, tango.EventType.CHANGE_EVENT, lambda e: None))
            except tango.DevFailed as exc:
                refused.append(f"{spec.name}/{name}: {exc.args[0].reason}")
    assert not refused

    sink = live.proxy("views/sink/1")
    values: list[float] = []
    event_id = sink.subscribe_event(
        "total", tango.EventType.CHANGE_EVENT, lambda e: None if e.err else values.append(e.attr_value.value)
    )
    try:
        Scan(live, 20).finish()
        newest = json.loads(sink.LatestScalars)
        expected = source_frame(live, newest["index"]).sum(dtype=float)
        assert newest["total"] == pytest.approx(expected)
        wait_for(lambda: values and values[-1] == newest["total"], what="the newest total as an event")
    finally:
        sink.unsubscribe_event(event_id)
    assert len(values) >= 2  # the value at subscription, then the scan's


# -- Taurus GUI ----------------------------------------------------------------------------
def test_taurus_gui_shows_live_values_by_events_and_saves_a_screenshot(live, tmp_path):
    import taurus
    from taurus.external.qt import QtCore
    from taurus.qt.qtgui.panel import TaurusForm

    from devices.gui import create_gui, gui_spec, qt_application, save_screenshot, spec_models, write_spec

    Scan(live, 20).finish()
    spec = gui_spec(load_definition(live.config), live.tango_host, str(live.config))
    spec_path = write_spec(spec, tmp_path / "gui.json")
    app = qt_application()
    gui = create_gui(spec_path, tmp_path / "gui.ini")
    gui.SAVE_SETTINGS_ON_CLOSE = False
    gui.resize(1600, 1000)
    gui.show()
    overview = gui.getPanel("Pipeline").widget()
    master, sink, bridge = (live.proxy(n) for n in ("views/master/1", "views/sink/1", "views/lavue/live"))
    checked = {  # (device, attribute) shown in the overview -> value read by a DeviceProxy now
        ("views/master/1", "ScanFrames"): lambda: master.ScanFrames,
        ("views/sink/1", "FramesIn"): lambda: sink.FramesIn,
        ("views/lavue/live", "Published"): lambda: bridge.Published,
        ("views/sink/1", "Status"): lambda: sink.status(),
    }
    shot = tmp_path / "gui.png"
    result: dict = {"phase": "first values", "error": None, "seen": {}}
    deadline = time.monotonic() + 120

    def shown(device: str, attribute: str) -> str | None:
        form: TaurusForm = overview.forms[device]
        for item in form.getItems():
            if item.getModelName().lower().endswith(f"/{device}/{attribute}".lower()):
                widget = item.readWidget()
                return widget.text() if widget is not None else None
        return None

    def agree() -> bool:
        for (device, attribute), read in checked.items():
            text, value = shown(device, attribute), read()
            result["seen"][(device, attribute)] = (text, value)
            if text is None or text.strip() != str(value):
                return False
        return True

    def step():
        try:
            if time.monotonic() > deadline:
                raise AssertionError(f"GUI stuck in phase {result['phase']}: {result['seen']}")
            if result["phase"] == "first values" and agree():
                result["before"] = master.ScanFrames
                result["scan"] = master.StartScan(json.dumps({"frames": 30, "scan_id": 5000}))
                result["phase"] = "scan"
            elif result["phase"] == "scan" and not master.Acquiring:
                master.EndScan()
                result["phase"] = "after scan"
            elif (
                result["phase"] == "after scan"
                and master.ScanFrames == 30
                and shown("views/master/1", "ScanFrames") == "30"
                and agree()
            ):
                result["phase"] = "done"
                spectrum = gui.getPanel("Spectrum").widget()
                curves = [c for c in spectrum.getPlotItem().listDataItems() if c.yData is not None]
                result["spectrum"] = [np.array(c.yData) for c in curves]
                image = gui.getPanel("Image").widget().image.image
                result["image_shape"] = None if image is None else image.shape
                result["events"] = {m: taurus.Attribute(m).isUsingEvents() for m in spec_models(spec)}
                result["size"] = (gui.width(), gui.height())
                result["saved"] = save_screenshot(gui, shot)
                app.quit()
                return
        except Exception as exc:  # reported after the loop
            result["error"] = exc
            app.quit()
            return
        QtCore.QTimer.singleShot(200, step)

    QtCore.QTimer.singleShot(500, step)
    app.exec_()
    gui.close()
    if result["error"] is not None:
        raise result["error"]
    assert result["scan"] == "5000"
    # every attribute the GUI shows came by events, none by Taurus' slow polling
    assert result["events"] and all(result["events"].values()), [
        m for m, ok in result["events"].items() if not ok
    ]
    assert result["image_shape"] == tuple(SHAPE)
    spectrum = np.asarray(sink.LatestSpectrum)
    assert any(y.shape == spectrum.shape for y in result["spectrum"])
    assert result["saved"]
    from taurus.external.qt import QtGui

    picture = QtGui.QImage(str(shot))
    assert (picture.width(), picture.height()) == result["size"]  # the whole window
    assert picture.width() >= 1600 and picture.height() >= 1000  # (its minimum may be larger in some styles)
    colours = {picture.pixel(x, y) for x in range(0, 1600, 7) for y in range(0, 1000, 7)}
    assert len(colours) > 50  # panels, plots and an image: not a blank window


def test_gui_command_writes_a_screenshot_of_the_pipeline(live, tmp_path):
    shot = tmp_path / "status.png"
    tangopipe("gui", str(live.config), "--screenshot", str(shot), "--after", "4", env=live.env, cwd=live.folder,
              timeout=180)  # fmt: skip
    from taurus.external.qt import QtGui

    picture = QtGui.QImage(str(shot))
    assert (picture.width(), picture.height()) == (1600, 1000)
    assert (live.state / "gui-views.json").exists()
