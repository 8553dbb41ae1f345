"""The modality presets in config/: each loads, runs through the real engines (its source,
master, sorters, workers with its steps, writers and sink, wired in this process), and its
files hold the physics its simulator put in. One preset also runs for real with
``tangopipe demo``."""

import json
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from devices.cli import scan_request
from devices.database import DeploymentError
from pipelines.definition import load_definition
from pipelines.master import MasterEngine
from pipelines.query import SinkClient
from pipelines.sink import SinkEngine
from pipelines.sorter import SorterEngine
from pipelines.sources import load_source
from pipelines.steps.tomo import fbp
from pipelines.worker import WorkerEngine
from pipelines.writers import WriterEngine
from tests.waiting import wait_for

from .conftest import BIN, user_env

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config"
PRESETS = ("xrd", "xrf", "dpc", "hits", "tomo")



class PresetPipeline:
    """A preset's pipeline as its definition describes it, engines in this process;
    ``source_changes`` adjust the source (tests run without pacing, on smaller scans)."""

    def __init__(self, name: str, folder: Path, **source_changes):
        self.definition = d = load_definition(CONFIG / f"{name}.yaml")
        self.source = load_source({**d.source, "rate_hz": 0, **source_changes})
        m = d.master
        self.master = MasterEngine(
            self.source,
            groups=list(d.groups),
            queue_capacity=m["queue_capacity"],
            overflow_policy=m["overflow_policy"],
            heartbeat_timeout_s=m["heartbeat_timeout_s"],
        )
        self.engines = [self.master]
        self.master.bind_now()
        self.sorters = {}
        for group, g in d.groups.items():
            s = g["sorter"]
            sorter = SorterEngine(
                name=f"sorter-{group}",
                window=s["window"],
                gap_timeout_s=s["gap_timeout_s"],
                outbox_capacity=s["outbox_capacity"],
                batch_size=s["batch_size"],
                batch_latency_ms=s["batch_latency_ms"],
            )
            self.engines.append(sorter)
            sorter.bind_now()
            self.sorters[group] = sorter
            for n in range(1, g["workers"] + 1):
                worker = WorkerEngine(g["steps"], name=f"{group}-{n}", group=group, credit=g["credit"])
                self.engines.append(worker)
                worker.start()
                worker.connect(self.master.endpoint, sorter.collect_endpoint)
                wait_for(lambda w=worker: w.name in self.master.worker_names(), what=f"worker {worker.name}")
        self.writers = {}
        for wname, w in d.writers.items():
            writer = WriterEngine(name=wname, directory=str(folder), pattern=w["pattern"], pipeline=d.name)
            self.engines.append(writer)
            writer.start()
            writer.connect(self.sorters[w["group"]].endpoint)
            self.writers[wname] = writer
        self.sink = SinkEngine()
        self.engines.append(self.sink)
        self.sink.start()
        self.sink.connect(self.sorters[d.sink["group"]].endpoint)
        consumers = {
            g: sum(w["group"] == g for w in d.writers.values()) + (d.sink["group"] == g) for g in d.groups
        }
        for group, count in consumers.items():
            wait_for(
                lambda g=group, c=count: len(self.sorters[g].consumers) == c, what=f"consumers of {group}"
            )

    def scan(self, meta: dict) -> tuple[int | str, dict[str, str]]:
        """One scan; returns its id and each writer's file."""
        done = {name: w.scans_done for name, w in self.writers.items()}
        scan_id = self.master.start_scan(meta)
        wait_for(lambda: not self.master.acquiring, timeout=120, what="acquisition")
        self.master.end_scan()
        for name, writer in self.writers.items():
            wait_for(
                lambda w=writer, n=name: w.scans_done > done[n], timeout=120, what=f"file of writer {name}"
            )
        return scan_id, {name: w.last_file for name, w in self.writers.items()}

    def stop(self):
        for engine in self.engines:
            engine.stop()


@pytest.fixture
def preset(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # presets name their geometry and mask files relative to the repository
    running = []

    def start(name, **source_changes):
        running.append(PresetPipeline(name, tmp_path, **source_changes))
        return running[-1]

    yield start
    for pipeline in running:
        pipeline.stop()


@pytest.mark.parametrize("path", sorted(CONFIG.glob("*.yaml")), ids=lambda p: p.name)
def test_every_pipeline_file_in_config_loads(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    definition = load_definition(path)
    assert definition.devices()


@pytest.mark.parametrize("name", PRESETS)
def test_presets_say_what_they_show_and_how_to_run_them(name):
    text = (CONFIG / f"{name}.yaml").read_text()
    header = text[: text.index("\nname:")]
    assert all(line.startswith("#") for line in header.splitlines())
    assert f"tangopipe demo --config config/{name}.yaml" in header and "What it shows" in header
    definition = load_definition(CONFIG / f"{name}.yaml")
    assert definition.source["kind"].startswith("simulator_")  # runnable anywhere
    assert sum(g["workers"] for g in definition.groups.values()) <= 2  # two cores


def test_scans_of_a_mapping_preset_get_the_source_grid_unless_told_otherwise():
    xrf = load_definition(CONFIG / "xrf.yaml")
    assert scan_request(xrf, None, None, fallback_frames=300) == (
        600,
        {"scan_shape": [20, 30], "snake": True},
    )
    frames, meta = scan_request(xrf, 80, '{"scan_shape": [8, 10], "sample": "leaf"}', fallback_frames=300)
    assert frames == 80 and meta == {"scan_shape": [8, 10], "snake": True, "sample": "leaf"}
    assert scan_request(load_definition(CONFIG / "tomo.yaml"), None, None, fallback_frames=300) == (180, {})
    assert scan_request(load_definition(CONFIG / "demo.yaml"), None, None, fallback_frames=300) == (300, {})
    with pytest.raises(DeploymentError, match="--meta '\\[8, 10\\]' must be a JSON object"):
        scan_request(xrf, None, "[8, 10]", fallback_frames=300)


def test_xrd_profile_peaks_at_the_rings_and_cake_shows_texture(preset):
    p = preset("xrd")
    source = p.source
    _, files = p.scan({"frames": 6})
    with h5py.File(files["profile"]) as f:
        data = f["entry/profile"]
        assert data["valid"][:].all() and len(data["valid"]) == 6
        radial, intensity = data["radial"][0], data["intensity"][:]
        width = radial[1] - radial[0]
        assert np.isfinite(intensity).all()
        for row in intensity:
            for angle in source.two_theta_deg:
                near = np.abs(radial - angle) < 0.3
                assert abs(radial[near][np.argmax(row[near])] - angle) <= 2 * width
        ring = np.argmin(np.abs(radial - source.two_theta_deg[0]))
        # rings strengthen frame by frame as simulated; hot pixels and gaps were masked out
        assert intensity[1, ring] / intensity[0, ring] == pytest.approx(source.ring_gain(1), rel=0.03)
        assert intensity.max() < 1.5 * max(source.ring_gain(i) for i in range(6)) * max(source.intensities)
        assert (data["ring_111_mean"][:] > 10 * data["background_mean"][:]).all()
    with h5py.File(files["cake"]) as f:
        data = f["entry/cake"]
        cake, radial, chi = data["cake"][:], data["radial"][0], np.radians(data["azimuthal"][0])
        assert cake.shape == (6, 72, 500)
        for n, angle in enumerate(source.two_theta_deg):
            column = cake[0, :, np.argmin(np.abs(radial - angle))]
            seen = column > 0  # bins with pixels
            amplitude = np.polyfit(np.cos(2 * chi[seen]), column[seen], 1)[0] / column[seen].mean()
            if n in source.textured:
                assert amplitude == pytest.approx(source.texture, abs=0.08)
            else:  # solid angle and polarisation corrected: flat around the ring
                assert abs(amplitude) < 0.03 and column[seen].std() < 0.05 * column[seen].mean()


def test_xrf_element_maps_follow_the_simulated_concentrations(preset):
    p = preset("xrf")
    source = p.source
    scan_id, files = p.scan({"frames": 80, "scan_shape": [8, 10], "snake": True})
    with h5py.File(files["hdf5"]) as f:
        data = f["entry/main"]
        assert data["valid"][:].all() and len(data["valid"]) == 80
        assert list(f["entry/scan/scan_shape"][()]) == [8, 10]
        rows, cols = data["map_row"][:], data["map_col"][:]
        assert sorted(zip(rows, cols, strict=True)) == [(r, c) for r in range(8) for c in range(10)]
        assert list(cols[10:20]) == list(range(9, -1, -1))  # the snake's second line runs back
        maps = {}
        for element in source.elements:
            maps[element] = np.full((8, 10), np.nan)
            maps[element][rows, cols] = data[element][:]
            truth = source.concentration_map(element, [8, 10])
            assert np.corrcoef(maps[element].ravel(), truth.ravel())[0, 1] > 0.97, element
        for i in (0, 17, 79):
            np.testing.assert_array_equal(data["spectrum"][i], source.frame(i, [8, 10], True).sum(axis=0))
    client = SinkClient(p.sink.endpoint)
    try:  # the sink assembles the same maps while the scan runs
        np.testing.assert_array_equal(client.map(scan_id, "main", "Fe"), maps["Fe"])
    finally:
        client.close()


def test_dpc_centre_of_mass_maps_follow_the_beam_and_the_absorption(preset):
    p = preset("dpc")
    source = p.source
    _, files = p.scan({"frames": 12 * 16, "scan_shape": [12, 16], "snake": False})
    with h5py.File(files["hdf5"]) as f:
        data = f["entry/main"]
        assert data["valid"][:].all()
        rows, cols = data["map_row"][:], data["map_col"][:]
        maps = {}
        for name in ("com_row", "com_col", "com_total"):
            maps[name] = np.full((12, 16), np.nan)
            maps[name][rows, cols] = data[name][:]
    shift_rows, shift_cols = source.shift_maps([12, 16])
    for measured, truth in (
        (maps["com_row"] - source.centre[0], shift_rows),
        (maps["com_col"] - source.centre[1], shift_cols),
    ):
        assert np.corrcoef(measured.ravel(), truth.ravel())[0, 1] > 0.99
        slope, offset = np.polyfit(truth.ravel(), measured.ravel(), 1)
        assert slope == pytest.approx(1.0, abs=0.05) and abs(offset) < 0.05
    transmission = np.array(
        [[source.transmission(r * 16 + c, [12, 16]) for c in range(16)] for r in range(12)]
    )
    assert np.corrcoef(maps["com_total"].ravel(), transmission.ravel())[0, 1] > 0.99


def test_hits_stream_holds_exactly_the_frames_with_peaks_and_finds_them(preset):
    p = preset("hits")
    source = p.source
    hits = [i for i in range(60) if source.is_hit(i)]
    assert len(hits) >= 3  # the seed gives a few hits among blanks
    _, files = p.scan({"frames": 60})
    with h5py.File(files["hdf5"]) as f:
        data = f["entry/main"]
        assert list(data["hit"][:]) == [int(i in hits) for i in range(60)]
        blanks = [i for i in range(60) if i not in hits]
        assert data["n_peaks"][blanks].max() < 10
        photons = [source.photons(i).sum() for i in (0, hits[0])]
        assert list(data["total_photons"][[0, hits[0]]]) == pytest.approx(photons, rel=0.002)
        stream = f["entry/hits"]
        assert list(stream["index"][:]) == hits
        counts = stream["peaks_count"][:]
        assert list(counts) == list(data["n_peaks"][hits])
        found_lists = np.split(stream["peaks"][:], np.cumsum(counts)[:-1])
        frames = stream["frame"][:].reshape(len(hits), *source.shape)
        for i, found, frame in zip(hits, found_lists, frames, strict=True):
            truth = source.peaks(i)
            distance = np.hypot(truth[:, None, 0] - found[None, :, 0], truth[:, None, 1] - found[None, :, 1])
            assert (distance.min(axis=1) < 1.5).mean() > 0.9  # nearly every Bragg peak found, in place
            assert len(found) <= len(truth) + 3
            np.testing.assert_allclose(frame, (source.frame(i).astype(np.float32) - 1000) / 10, atol=1e-4)


def test_tomo_sinograms_are_the_projection_rows_and_reconstruct_the_slices(preset):
    p = preset("tomo", angle_step=3.0)
    source = p.source
    _, files = p.scan({"frames": 60})
    with h5py.File(files["hdf5"]) as f:
        data = f["entry/main"]
        angles = data["angle"][:]
        assert list(angles) == [3.0 * i for i in range(60)]
        for i in (0, 31, 59):
            transmission = source.frame(i).astype(np.float32) / np.float32(10000)
            np.testing.assert_allclose(data["sino_64"][i], -np.log(transmission[64]), rtol=1e-5, atol=1e-6)
            preview = transmission.reshape(64, 2, 80, 2).mean(axis=(1, 3))
            np.testing.assert_allclose(data["preview"][i], preview, rtol=1e-5, atol=1e-6)
        for row in (32, 64, 96):
            image = fbp(data[f"sino_{row}"][:], angles, source.centre)
            truth = source.slice_image(row)
            assert np.corrcoef(image.ravel(), truth.ravel())[0, 1] > 0.93, row


@pytest.mark.slow
def test_tangopipe_demo_runs_the_xrf_preset_and_writes_its_maps(tmp_path):
    """The XRF preset as a user runs it: servers, embedded database, the source's grid in StartScan."""
    data = yaml.safe_load((CONFIG / "xrf.yaml").read_text())
    data["sink"]["lavue"]["port"] = 0
    data["writers"]["hdf5"]["directory"] = str(tmp_path / "data")
    config = tmp_path / "xrf.yaml"
    config.write_text(yaml.safe_dump(data))
    summary = tmp_path / "summary.json"
    proc = subprocess.run(
        [str(BIN / "tangopipe"), "demo", "--config", str(config), "--summary", str(summary)],
        env=user_env(tmp_path / "state"), cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "sent 600, processed 600, written 600, lost 0" in proc.stdout
    result = json.loads(summary.read_text())
    source = load_source(load_definition(config).source)
    with h5py.File(result["file"]) as f:
        assert list(f["entry/scan/scan_shape"][()]) == [20, 30] and bool(f["entry/scan/snake"][()])
        main = f["entry/main"]
        assert main["valid"][:].all() and len(main["valid"]) == 600
        fe = np.full((20, 30), np.nan)
        fe[main["map_row"][:], main["map_col"][:]] = main["Fe"][:]
    assert np.corrcoef(fe.ravel(), source.concentration_map("Fe").ravel())[0, 1] > 0.98
