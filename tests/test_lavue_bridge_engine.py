"""The Lavue bridge engine in one process (no Tango): real engines and sockets, Lavue's own client."""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # lavuelib imports Qt; no display here

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from lavuelib.imageSource import ZMQSource  # noqa: E402

from lavue_bridge.bridge import (  # noqa: E402
    LavueBridgeEngine,
    geometry_metadata,
    map_axes,
    topic_selected,
)
from pipelines.geometry import read_poni  # noqa: E402
from pipelines.master import MasterEngine  # noqa: E402
from pipelines.sorter import SorterEngine  # noqa: E402
from pipelines.sources.simulator import SimulatedDetector  # noqa: E402
from pipelines.steps import StepChain, load_step  # noqa: E402
from pipelines.steps.azimuthal import Caking  # noqa: E402
from pipelines.steps.maps import MapAssembler  # noqa: E402
from pipelines.worker import WorkerEngine  # noqa: E402
from tests.waiting import wait_for

SHAPE = (48, 80)
PONI = """poni_version: 2.1
Detector: Detector
Detector_config: {"pixel1": 7.5e-05, "pixel2": 7.5e-05, "max_shape": [48, 80], "orientation": 3}
Distance: 0.05
Poni1: 0.0018
Poni2: 0.003
Rot1: 0.01
Rot2: -0.02
Rot3: 0.0
Wavelength: 1.2e-10
"""
TIMEOUT_S = 20.0



def steps(poni: str, bin_factor: int = 2) -> list:
    return [
        {"roi_stats": {"rois": {"c": [0, 16, 0, 16]}, "bin": bin_factor}},
        {"azimuthal2d": {"poni": poni, "npt": 30, "npt_azim": 24, "unit": "q_nm^-1"}},
    ]


class Views:
    """Master, one worker, a sorter and a Lavue bridge, wired with real sockets."""

    def __init__(self, tmp_path, topics=()):
        self.poni = tmp_path / "det.poni"
        self.poni.write_text(PONI)
        self.source = SimulatedDetector(shape=list(SHAPE), rate_hz=40.0, frames=1000)
        self.master = MasterEngine(self.source)
        self.master.bind_now()
        self.sorter = SorterEngine(gap_timeout_s=5.0)
        self.sorter.bind_now()
        self.worker = WorkerEngine(steps(str(self.poni)), name="w1")
        self.worker.start()
        self.worker.connect(self.master.endpoint, self.sorter.collect_endpoint)
        wait_for(lambda: "w1" in self.master.worker_names(), what="worker")
        self.bridge = LavueBridgeEngine(name="lavue", port=0, max_rate_hz=20.0, topics=topics)
        self.bridge.start()
        self.bridge.connect(self.sorter.endpoint)
        wait_for(lambda: len(self.sorter.consumers) == 1, what="bridge connected")
        self.lavues: list[ZMQSource] = []

    def lavue(self, topic: str) -> ZMQSource:
        source = ZMQSource()
        source.setConfiguration(f"{self.bridge.address}/{topic}")
        assert source.connect()
        self.lavues.append(source)
        return source

    def scan(self, frames: int, meta: dict | None = None) -> None:
        """A whole scan; returns once the bridge has seen its end."""
        done = self.bridge.scans_done
        self.master.start_scan(dict(meta or {}, frames=frames))
        wait_for(lambda: not self.master.acquiring, what="acquisition")
        self.master.end_scan()
        wait_for(lambda: self.bridge.scans_done > done, what="scan end at the bridge")

    def stop(self):
        for engine in (self.master, self.worker, self.sorter):
            engine.stop()
        self.bridge.stop()  # publisher closed before Lavue's clients disconnect
        for source in self.lavues:
            source.disconnect()


@pytest.fixture
def views(tmp_path):
    v = Views(tmp_path)
    yield v
    v.stop()


def poll(source: ZMQSource, want, timeout=TIMEOUT_S):
    """Lavue's getData() until ``want(image, name, meta)`` holds for an image; returns it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        image, name, meta = source.getData()
        if name == "__ERROR__":
            raise AssertionError(f"Lavue could not read the message: {image}")
        if isinstance(image, np.ndarray):
            meta = json.loads(meta)
            if want(image, name, meta):
                return image, name, meta
        elif image is None:
            time.sleep(0.005)
    raise AssertionError("Lavue's client saw no matching image")


def datasources(source: ZMQSource, want, timeout=TIMEOUT_S) -> list[str]:
    """The next topic list Lavue's client reads for which ``want(list)`` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        image, _, meta = source.getData()
        if isinstance(image, str) and image == "" and meta:
            topics = json.loads(meta).get("datasources")
            if topics is not None and want(topics):
                return topics
        elif image is None:
            time.sleep(0.005)
    raise AssertionError("Lavue's client saw no matching datasources message")


def test_caked_and_binned_images_carry_axes_and_geometry_lavue_reads(views, tmp_path):
    cake_view, binned_view = views.lavue("main.cake"), views.lavue("main.binned")
    views.scan(2)  # the subscriptions are live by the next scan
    views.master.start_scan({"frames": 40, "scan_id": 9})
    cake, cake_name, cake_meta = poll(cake_view, lambda i, n, m: m.get("scan") == 9)
    binned, binned_name, binned_meta = poll(binned_view, lambda i, n, m: m.get("scan") == 9)
    wait_for(lambda: not views.master.acquiring, what="acquisition")
    views.master.end_scan()

    chain = StepChain(steps(str(views.poni)))
    index = cake_meta["index"]
    assert cake_name == f"scan 9 #{index}"
    expected = chain(views.source.frame(index), {})
    np.testing.assert_array_equal(cake, expected["cake"].T)  # (azimuth, radial) sent as Lavue draws it
    # the axes are those the caking step itself gives Lavue (x = radial columns, y = chi rows)
    own = Caking(**steps(str(views.poni))[1]["azimuthal2d"]).lavue_metadata()
    assert cake_meta["axisscales"] == pytest.approx(own["axisscales"], rel=1e-9, abs=1e-9)
    assert cake_meta["axislabels"] == ["q", "chi", "nm^-1", "deg"] == own["axislabels"]
    assert cake_meta["wavelength"] == [pytest.approx(1.2), "A"]
    assert cake_meta["detector_distance"] == [pytest.approx(50.0), "mm"]
    assert "pixel_size" not in cake_meta and "beam_center_x" not in cake_meta

    # the 2x2 binned image: pixel size doubled, beam centre halved (Lavue's units given)
    geometry = read_poni(views.poni)
    x, y = geometry.beam_center
    assert binned_name == f"scan 9 #{binned_meta['index']}"
    np.testing.assert_array_equal(binned, chain(views.source.frame(binned_meta["index"]), {})["binned"].T)
    assert binned_meta["pixel_size"] == [pytest.approx(150.0), "um", pytest.approx(150.0), "um"]
    assert binned_meta["beam_center_x"] == [pytest.approx(x / 2), "pixels"]
    assert binned_meta["beam_center_y"] == [pytest.approx(y / 2), "pixels"]
    assert binned_meta["energy"][1] == "eV" and binned_meta["energy"][0] == pytest.approx(
        12398.42 / 1.2, rel=1e-5
    )


def test_scalars_become_live_maps_on_the_motor_grid(views):
    view = views.lavue("main.map.c_sum")
    views.scan(2)
    motors = {"samy": [0.0, 1.5], "samx": {"start": 10.0, "stop": 12.0, "unit": "mm"}}
    views.scan(20, {"scan_shape": [4, 5], "motors": motors, "scan_id": 3})
    image, name, meta = poll(view, lambda i, n, m: m.get("scan") == 3 and m.get("filled") == 20)

    step = load_step(steps(str(views.poni))[0])
    expected = MapAssembler([4, 5])
    for i in range(20):
        expected.add(i, step(views.source.frame(i), {})["c_sum"])
    np.testing.assert_array_equal(image, expected.map.T)
    assert name == "scan 3 #19"
    assert meta["axisscales"] == pytest.approx([10.0, 0.0, 0.5, 0.5])
    assert meta["axislabels"] == ["samx", "samy", "mm", ""]
    assert "main.map.c_sum" in views.bridge.topics and "main.map.total_sum" in views.bridge.topics


def test_topics_follow_the_worker_configuration_and_the_filter(tmp_path):
    views = Views(tmp_path, topics=["binned", "map.c_mean"])
    try:
        view = views.lavue("main.binned")
        views.scan(3)
        assert views.bridge.topics == ["main.binned"]  # not main.cake: filtered out
        datasources(view, lambda t: t == ["main.binned"])
        views.worker.reconfigure(steps(str(views.poni), bin_factor=1))  # no binned image any more
        views.scan(3)
        assert views.bridge.topics == []
        assert datasources(view, lambda t: t == []) == []
        views.worker.reconfigure(steps(str(views.poni)))
        views.scan(3, {"scan_shape": [1, 3]})  # one row: no map
        assert views.bridge.topics == ["main.binned"]
        views.scan(4, {"scan_shape": [2, 2]})
        assert views.bridge.topics == ["main.binned", "main.map.c_mean"]
        datasources(view, lambda t: t == ["main.binned", "main.map.c_mean"])
    finally:
        views.stop()


def test_map_axes_from_motors_or_point_numbers():
    assert map_axes([2, 3], None) == {
        "axislabels": ["column", "row", "", ""],
        "axisscales": [0.0, 0.0, 1.0, 1.0],
    }
    listed = map_axes([2, 3], {"y": [5.0, 7.0], "x": [1.0, 1.25, 1.5]})
    assert listed == {"axislabels": ["x", "y", "", ""], "axisscales": [1.0, 5.0, 0.25, 2.0]}
    uneven = map_axes([2, 3], {"y": [5.0, 7.0], "x": [1.0, 1.1, 1.5]})
    assert uneven == {"axislabels": ["x", "y", "", ""]}  # labels, but no scale Lavue could draw
    assert map_axes([2, 3], {"y": "bad", "x": [1, 2]})["axislabels"][:2] == ["column", "row"]


def test_geometry_keys_only_for_images_on_the_pixel_grid(tmp_path):
    path = tmp_path / "det.poni"
    path.write_text(PONI)
    g = read_poni(path)
    full = geometry_metadata(g, SHAPE, None)
    assert full["pixel_size"] == [pytest.approx(75.0), "um", pytest.approx(75.0), "um"]
    assert full["beam_center_x"][0] == pytest.approx(g.beam_center[0])
    quarter = geometry_metadata(g, (12, 20), None)
    assert quarter["pixel_size"][0] == pytest.approx(300.0) and quarter["beam_center_y"][0] == pytest.approx(
        g.beam_center[1] / 4
    )
    for shape in ((24, 20), (7, 80), (30,)):  # unequal binning, not a divisor, not an image
        meta = geometry_metadata(g, shape, None)
        assert "pixel_size" not in meta and meta["wavelength"] == [pytest.approx(1.2), "A"]


def test_topic_filter_and_parameter_errors():
    assert topic_selected("main.cake", [])
    assert topic_selected("main.cake", ["cake"]) and topic_selected("main.cake", ["main.cake"])
    assert not topic_selected("main.cake", ["raw.cake", "binned"])
    with pytest.raises(ValueError, match="topics: entry 3"):
        LavueBridgeEngine(topics=["cake", 3])
    bridge = LavueBridgeEngine(topics=["", " cake "])
    try:
        assert bridge.wanted == ["cake"]
        with pytest.raises(ValueError, match="publish rate = 0"):
            bridge.set_max_rate(0)
        bridge.set_max_rate(2.5)
        assert bridge.max_rate_hz == 2.5
    finally:
        bridge.publisher.close()


def test_definition_adds_bridge_devices_and_checks_their_keys(tmp_path):
    from pipelines.definition import DefinitionError, PipelineDefinition

    base = {"name": "p", "groups": {"main": {"steps": ["passthrough"]}, "raw": {"steps": ["passthrough"]}}}
    definition = PipelineDefinition(
        {**base, "lavue_bridges": {"raw": {"group": "raw", "port": 5557, "topics": ["image"]}}}, "p.yaml"
    )
    (spec,) = [s for s in definition.devices() if s.cls == "LavueBridge"]
    assert (spec.name, spec.server) == ("p/lavue/raw", "LavueBridge/p-raw")
    props = spec.tango_properties()
    assert (
        props["Upstream"] == ["p/sorter/raw"] and props["Port"] == ["5557"] and props["MaxRateHz"] == ["10.0"]
    )
    assert props["Topics"] == ["image"]  # a string array in Jive, not JSON
    assert PipelineDefinition(base, "p.yaml").lavue_bridges == {}
    for bridge, words in (
        ({"group": "nope"}, "lavue_bridges.b.group: no worker group 'nope'"),
        ({"group": "raw", "max_rate_hz": 0}, "lavue_bridges.b.max_rate_hz: expected a number > 0"),
        ({"group": "raw", "topics": ["a/b"]}, "lavue_bridges.b.topics: expected result names"),
        ({"group": "raw", "colour": "red"}, "lavue_bridges.b.colour: unknown key"),
    ):
        with pytest.raises(DefinitionError, match=words.replace("(", r"\(")):
            PipelineDefinition({**base, "lavue_bridges": {"b": bridge}}, "p.yaml")
