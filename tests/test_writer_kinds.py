"""The other writers: TIFF images, PNG graphs, the binned cube; writer kinds in definitions."""

import json
from collections.abc import Iterator, Mapping
from typing import Any

import h5py
import numpy as np
import pytest
import tifffile
import yaml

from pipelines.definition import DefinitionError, PipelineDefinition
from pipelines.sources.simulator import SimulatedDetector
from pipelines.steps import StepChain
from pipelines.writers import WriterSettings
from pipelines.writers.cube import Cube

from .writer_harness import ROI_STEPS, InProcessPipeline, MovingSample

PNG = b"\x89PNG\r\n\x1a\n"


def ring_profile(frame, meta):
    """A stand-in for an azimuthal integration: a profile with its radial axis, and a number."""
    return {
        "radial": np.linspace(0.5, 10.0, frame.shape[1]),
        "intensity": frame.mean(axis=0, dtype=np.float64),
        "total": float(frame.sum(dtype=np.float64)),
    }


class MeshSample:
    """The detector on a two-motor mesh: samy steps once per row, samx along each row."""

    def __init__(self, detector: SimulatedDetector, n_fast: int):
        self.detector, self.n_fast = detector, n_fast

    def frames(self, scan: Mapping[str, Any]) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
        for index, (frame, meta) in enumerate(self.detector.frames(scan)):
            row, col = divmod(index, self.n_fast)
            yield frame, {**meta, "positions": {"samy": 10.0 + row, "samx": 0.5 * col}}

    def stop(self) -> None:
        self.detector.stop()

    def describe(self) -> dict[str, Any]:
        return self.detector.describe()


def test_tiff_writer_one_file_per_frame_named_from_scan_and_index(tmp_path):
    source = SimulatedDetector(shape=[64, 48], rate_hz=0, frames=50)
    settings = WriterSettings(kind="tiff", directory=str(tmp_path), results=["binned"], pipeline="demo")
    earlier = tmp_path / "demo_scan00005"  # a scan 5 of an earlier run: never overwritten
    earlier.mkdir()
    (earlier / "main_binned_00000.tif").write_bytes(b"earlier run")
    p = InProcessPipeline(writers={"tiff": ("main", settings)}, source=source)
    try:
        first = p.scan(6, scan_id=4)["tiff"]
        again = p.scan(2, scan_id=5)["tiff"]
    finally:
        p.stop()
    assert first.endswith("demo_scan00004") and again.endswith("demo_scan00005_2")
    chain = StepChain(ROI_STEPS)
    names = sorted(p.name for p in (tmp_path / "demo_scan00004").iterdir())
    assert names == [f"main_binned_{i:05d}.tif" for i in range(6)]
    for i in range(6):
        with tifffile.TiffFile(tmp_path / "demo_scan00004" / f"main_binned_{i:05d}.tif") as tif:
            np.testing.assert_array_equal(tif.asarray(), chain(source.frame(i), {})["binned"])
            meta = tif.shaped_metadata[0]
            assert (meta["scan"], meta["index"], meta["name"], meta["stream"]) == (4, i, "binned", "main")
    assert len(list((tmp_path / "demo_scan00005_2").iterdir())) == 2
    assert (earlier / "main_binned_00000.tif").read_bytes() == b"earlier run"


def test_graph_writer_plots_profiles_and_maps(tmp_path):
    source = MeshSample(SimulatedDetector(shape=[32, 24], rate_hz=0, frames=50), n_fast=4)
    settings = WriterSettings(
        kind="graphs",
        directory=str(tmp_path),
        results=["intensity"],
        maps=["total"],
        every=5,
        pipeline="demo",
    )
    p = InProcessPipeline(
        groups={"main": [{"tests.test_writer_kinds:ring_profile": {}}]},
        writers={"png": ("main", settings)},
        source=source,
    )
    try:
        p.scan(12, scan_id=2, scan_shape=[3, 4])
        p.scan(6, scan_id=3)  # no grid: the scalar against the motor... two moved: against the index
    finally:
        p.stop()
    files = sorted(f.name for f in tmp_path.iterdir())
    expected = [
        f"demo_scan00002_main_{n}.png"
        for n in (
            "intensity_00000",
            "intensity_00005",
            "intensity_00010",
            "intensity_last",
            "intensity_mean",
            "total_map",
        )
    ]
    expected += [
        f"demo_scan00003_main_{n}.png"
        for n in ("intensity_00000", "intensity_00005", "intensity_last", "intensity_mean", "total_map")
    ]
    assert files == sorted(expected)
    for name in files:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 2000
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert (width, height) in ((800, 500), (800, 640))


def test_cube_bins_results_by_a_motor(tmp_path):
    source = MovingSample(SimulatedDetector(shape=[64, 48], rate_hz=0, frames=50), step_mm=0.25)
    settings = WriterSettings(
        kind="cube",
        directory=str(tmp_path),
        by="samx",
        bins=[0, 2, 4, 6],
        results=["total_sum", "binned"],
        pipeline="demo",
    )
    p = InProcessPipeline(writers={"cube": ("main", settings)}, source=source)
    try:
        path = p.scan(28, scan_id=8)["cube"]  # samx = 0 ... 6.75: the last 3 frames are out of range
    finally:
        p.stop()
    chain = StepChain(ROI_STEPS)
    results = [chain(source.frame(i), {}) for i in range(28)]
    assert path.endswith("demo_scan00008_main_cube.h5")
    with h5py.File(path) as f:
        cube = f["entry"][f["entry"].attrs["default"]]
        assert cube.attrs["signal"] == "total_sum" and list(cube.attrs["axes"]) == ["samx"]
        assert list(cube["samx"][()]) == [1.0, 3.0, 5.0] and list(cube["frames"][()]) == [8, 8, 9]
        assert cube.attrs["out_of_range"] == 3 and cube.attrs["without_value"] == 0
        for b, members in enumerate((range(0, 8), range(8, 16), range(16, 25))):
            totals = [results[i]["total_sum"] for i in members]
            assert cube["total_sum_sum"][b] == pytest.approx(sum(totals))
            assert cube["total_sum"][b] == pytest.approx(np.mean(totals))
            images = np.sum([results[i]["binned"] for i in members], axis=0, dtype=np.float64)
            np.testing.assert_allclose(cube["binned_sum"][b], images)
        config = json.loads(f["entry/process/configuration_json"][()])
        assert config["main"]["steps"] == ROI_STEPS


def test_cube_edges_are_half_open_and_the_last_closed():
    cube = Cube([0.0, 1.0, 2.0], ["v"])
    for value in (0.0, 0.5, 1.0, 2.0, 2.5, -0.1):
        cube.add(value, {"v": value})
    assert list(cube.frames) == [2, 2] and cube.out_of_range == 2
    assert list(cube.mean("v")) == [0.25, 1.5]
    cube.add(None, {"v": 1.0})
    assert cube.without_value == 1


# -- kinds in pipeline definitions -----------------------------------------------------------
BASE = {"name": "k", "groups": {"main": {"steps": ["passthrough"]}}}


def definition(**writers):
    return PipelineDefinition(
        yaml.safe_load(yaml.safe_dump({**BASE, "writers": writers, "sink": {"group": "main"}}))
    )


def test_definition_writer_kinds_become_device_properties():
    d = definition(
        h5={"group": "main", "compression": "bslz4", "save_raw": False, "directory": "/data/x"},
        tif={"group": "main", "kind": "tiff", "results": ["image"]},
        png={"group": "main", "kind": "graphs", "maps": ["roi"], "every": 10},
        cube={"group": "main", "kind": "cube", "by": "delay", "bins": {"start": 0, "stop": 1, "count": 4}},
    )
    props = {s.name.rsplit("/", 1)[-1]: s.properties for s in d.devices() if s.cls == "PipelineWriter"}
    assert (
        props["h5"]["Kind"] == "nexus"
        and props["h5"]["Compression"] == "bslz4"
        and not props["h5"]["SaveRaw"]
    )
    assert props["h5"]["FilePattern"] == "{pipeline}_scan{scan:05}.h5"
    assert props["tif"]["Kind"] == "tiff" and props["tif"]["Results"] == "image"
    assert props["tif"]["FilePattern"] == "{pipeline}_scan{scan:05}/{stream}_{name}_{index:05}.tif"
    assert props["png"]["Maps"] == "roi" and props["png"]["PlotEvery"] == 10
    assert props["cube"]["CubeBy"] == "delay" and props["cube"]["CubeBins"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    sink = next(s for s in d.devices() if s.cls == "PipelineSink").properties
    assert sink["ScanFileDirectory"] == "/data/x" and sink["ScanFilePattern"] == "{pipeline}_scan{scan:05}.h5"
    assert sink["Pipeline"] == "k"
    assert json.loads(
        next(s for s in d.devices() if s.name == "k/writer/cube").tango_properties()["CubeBins"][0]
    )


@pytest.mark.parametrize(
    ("writer", "message"),
    [
        ({"kind": "hdf4"}, "writers.w.kind: expected one of nexus, tiff, graphs, cube, got 'hdf4'"),
        ({"maps": ["a"]}, "writers.w.maps: only for writers of kind graphs, this one is 'nexus'"),
        ({"compression": "zip"}, "writers.w.compression: expected one of none, gzip, bslz4, got 'zip'"),
        ({"kind": "cube", "bins": [0, 1]}, "writers.w.by: a cube needs the scan variable"),
        ({"kind": "cube", "by": "e", "bins": [1, 0]}, "writers.w.bins: expected at least 2 increasing edges"),
        (
            {"kind": "tiff", "pattern": "{scan}.tif"},
            "writers.w.pattern: FilePattern '{scan}.tif' must contain {index}",
        ),
        ({"every": 3}, "writers.w.every: only for writers of kind graphs"),
    ],
)
def test_definition_writer_mistakes_name_the_key(writer, message):
    with pytest.raises(
        DefinitionError, match=message.replace("{", r"\{").replace("}", r"\}").replace("(", r"\(")
    ):
        definition(w={"group": "main", **writer})
