"""The NeXus scan file: rows and gaps, derived streams, metadata, defaults, SWMR, compression."""

import importlib.metadata
import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from pipelines import message as m
from pipelines.steps import StepChain
from pipelines.writers import WriterSettings
from pipelines.writers.nexus import NexusScanFile

from .writer_harness import ROI_STEPS, InProcessPipeline, MovingSample, wait_for


def _result(index, **scalars):
    return m.Message(
        m.RESULT,
        scan=3,
        index=index,
        stream="main",
        scalars=dict(scalars),
        version=1,
        arrays={"img": np.full((2, 3), index, np.uint16)},
    )


def test_rows_gaps_and_ragged_derived_streams(tmp_path):
    start = m.Message(m.SCAN_START, scan=3, stream="main", meta={"sample": "Si", "processing": {"main": {}}})
    f = NexusScanFile(tmp_path / "s.h5", start, "p")
    peaks = {0: np.ones((2, 4), np.float32), 3: np.full((5, 4), 3, np.float32)}
    for i in range(5):
        if i == 2:
            f.write(m.Message(m.GAP, scan=3, index=2, stream="main"))
            continue
        msg = _result(i, n=i, x=i * 0.5)
        if i in peaks:
            msg.arrays["hits/peaks"] = peaks[i]
            msg.scalars["hits/n_peaks"] = len(peaks[i])
        f.write(msg)
    with pytest.raises(ValueError, match="written twice or out of order"):
        f.write(m.Message(m.RESULT, scan=3, index=1, stream="main"))
    f.close()
    assert (tmp_path / "s-hits.h5").exists()  # SWMR: the derived stream has its own file, linked at the end
    with h5py.File(tmp_path / "s.h5") as h:
        main = h["entry/main"]
        assert list(main["valid"][:]) == [True, True, False, True, True]
        assert list(main["n"][:]) == [0, 1, 0, 3, 4]
        assert np.isnan(main["x"][2]) and main["x"][4] == 2.0
        assert main["img"].shape == (5, 2, 3) and main["img"][3, 0, 0] == 3
        hits = h["entry/hits"]
        assert list(hits["index"][:]) == [0, 3]
        assert list(hits["peaks_count"][:]) == [2, 5] and hits["peaks"].shape == (7, 4)
        np.testing.assert_array_equal(hits["peaks"][2:], peaks[3])
        assert list(hits["n_peaks"][:]) == [2, 5]
        assert list(h["entry/gaps"][:]) == [2]
        assert h["entry/scan/sample"][()] == b"Si"
        assert h["entry"].attrs["default"] == "main"


def test_without_swmr_derived_streams_stay_in_the_one_file(tmp_path):
    f = NexusScanFile(tmp_path / "s.h5", m.Message(m.SCAN_START, scan=3, stream="main"), swmr=False)
    for i in range(3):
        msg = _result(i, n=i)
        if i == 2:
            msg.arrays["hits/peaks"] = np.ones((3, 4), np.float32)
        f.write(msg)
    f.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]
    with h5py.File(tmp_path / "s.h5") as h:
        assert isinstance(h["entry"].get("hits", getlink=True), h5py.HardLink)
        assert list(h["entry/hits/index"][:]) == [2] and h["entry/hits/peaks"].shape == (3, 4)


def test_never_overwrites_an_existing_file(tmp_path):
    (tmp_path / "s.h5").write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        NexusScanFile(tmp_path / "s.h5", m.Message(m.SCAN_START, scan=1), "p")
    assert (tmp_path / "s.h5").read_bytes() == b"precious"


META = {
    "sample": "LaB6",
    "sample_temperature_K": 295.0,
    "command": "ascan samx 0 1 4 0.1",
    "motors": ["samx"],
    "processing": {"main": {"steps": ROI_STEPS, "version": 1}},
    "source": {"detector": "simulator", "shape": [64, 48], "dtype": "uint16", "pixel_size_um": 75.0},
}


def test_metadata_sample_detector_process_and_plot_defaults(tmp_path):
    path = tmp_path / "s.h5"
    f = NexusScanFile(path, m.Message(m.SCAN_START, scan=9, stream="main", meta=META), "demo")
    for i in range(4):
        msg = _result(i, total=float(i), mean=i / 2)
        msg.arrays["profile"] = np.linspace(0, i, 5)
        f.write(msg)
    f.close(m.Message(m.SCAN_END, scan=9, meta={"frames": 4, "dropped": 0, "expected": 4}))
    with h5py.File(path) as h:
        entry = h[h.attrs["default"]]  # plain h5py: follow the defaults to the plotted data
        data = entry[entry.attrs["default"]]
        signal = data[data.attrs["signal"]]
        assert data.attrs["NX_class"] == "NXdata" and list(data.attrs["axes"]) == ["index"]
        assert list(signal[:]) == [0.0, 1.0, 2.0, 3.0] and data.attrs["signal"] == "total"
        assert "mean" in list(data.attrs["auxiliary_signals"])
        assert entry["title"][()] == b"ascan samx 0 1 4 0.1"
        assert entry["sample"].attrs["NX_class"] == "NXsample"
        assert entry["sample/name"][()] == b"LaB6" and entry["sample/temperature_K"][()] == 295.0
        det = entry["instrument/detector"]
        assert det.attrs["NX_class"] == "NXdetector" and list(det["shape"][:]) == [64, 48]
        assert det["x_pixel_size"][()] == pytest.approx(75e-6) and det["x_pixel_size"].attrs["units"] == "m"
        proc = entry["process"]
        assert proc.attrs["NX_class"] == "NXprocess"
        assert proc["version"][()].decode() == importlib.metadata.version("tangopipe")
        assert json.loads(proc["configuration_json"][()]) == META["processing"]
        assert json.loads(proc["main/configuration_json"][()])["steps"] == ROI_STEPS
        assert list(proc["processing_version"][:]) == [1, 1, 1, 1]
        assert entry["frames_written"][()] == 4 and entry["frames_acquired"][()] == 4
        assert entry["end_time"][()].startswith(b"20")
    import silx.io
    import silx.io.nxdata

    with silx.io.open(str(path)) as sf:
        nxdata = silx.io.nxdata.get_default(sf)
        assert nxdata is not None and nxdata.is_valid
        assert nxdata.signal_name == "total" and nxdata.signal.shape == (4,)


@pytest.mark.parametrize("compression", ["gzip", "bslz4"])
def test_compressed_arrays_read_back_identical(tmp_path, compression):
    import hdf5plugin  # noqa: F401  (bslz4 readers need the filter)

    rng = np.random.default_rng(1)
    frames = rng.poisson(3, (6, 32, 24)).astype(np.uint16)
    f = NexusScanFile(
        tmp_path / "s.h5", m.Message(m.SCAN_START, scan=1, stream="raw"), compression=compression
    )
    for i, frame in enumerate(frames):
        f.write(
            m.Message(m.RESULT, scan=1, index=i, stream="raw", arrays={"image": frame}, scalars={"s": int(i)})
        )
    f.close()
    with h5py.File(tmp_path / "s.h5") as h:
        raw = h["entry/instrument/detector/data"]
        assert raw.compression == "gzip" if compression == "gzip" else "32008" in raw._filters
        np.testing.assert_array_equal(raw[()], frames)
        np.testing.assert_array_equal(
            h["entry/raw/image"][()], frames
        )  # the same frames from the NXdata group


def test_raw_frames_are_left_out_when_not_saved(tmp_path):
    f = NexusScanFile(tmp_path / "s.h5", m.Message(m.SCAN_START, scan=1, stream="raw"), save_raw=False)
    f.write(
        m.Message(
            m.RESULT,
            scan=1,
            index=0,
            stream="raw",
            arrays={"image": np.ones((4, 4), np.uint16)},
            scalars={"s": 16},
        )
    )
    f.close()
    with h5py.File(tmp_path / "s.h5") as h:
        assert "image" not in h["entry/raw"] and "data" not in h["entry/instrument/detector"]
        assert h["entry/raw/s"][0] == 16


def test_positions_per_point_also_when_reported_only_at_scan_end(tmp_path):
    f = NexusScanFile(
        tmp_path / "s.h5", m.Message(m.SCAN_START, scan=1, stream="main", meta={"motors": ["samx"]})
    )
    for i in range(4):
        msg = _result(i, n=i)
        if i != 2:  # point 2's position came after its frame had left the master
            msg.meta["positions"] = {"samx": 0.5 * i}
        f.write(msg)
    end = {"frames": 4, "positions": {"samx": [0.0, 0.5, 1.0, 1.5], "samy": [7.0, 7.0, None, 7.5]}}
    f.close(m.Message(m.SCAN_END, scan=1, meta=end))
    with h5py.File(tmp_path / "s.h5") as h:
        positions = h["entry/scan/positions"]
        assert list(positions["samx"][:]) == [0.0, 0.5, 1.0, 1.5]
        samy = positions["samy"][:]  # a motor first heard of at scan end: added when the file closed
        assert list(samy[[0, 1, 3]]) == [7.0, 7.0, 7.5] and np.isnan(samy[2])


def test_a_result_name_first_seen_after_the_switch_to_swmr_is_counted_not_written(tmp_path):
    f = NexusScanFile(tmp_path / "s.h5", m.Message(m.SCAN_START, scan=1, stream="main"))
    f.write(_result(0, n=0))
    f.write(_result(1, n=1, late=5.0))
    f.close()
    assert f.skipped == {"late"}
    with h5py.File(tmp_path / "s.h5") as h:
        assert "late" not in h["entry/main"] and list(h["entry/main/n"][:]) == [0, 1]


# -- the writer in a running pipeline ------------------------------------------------------
def test_scan_file_of_a_pipeline_has_every_frame_motors_and_configuration(tmp_path):
    source = MovingSample(pipeline_detector())
    p = InProcessPipeline(
        writers={"hdf5": ("main", WriterSettings(directory=str(tmp_path), pipeline="demo"))}, source=source
    )
    try:
        path = p.scan(40, sample="LaB6", motors=["samx", "samy"], scan_id=12)["hdf5"]
    finally:
        p.stop()
    chain = StepChain(ROI_STEPS)
    assert path.endswith("demo_scan00012.h5")
    with h5py.File(path) as h:
        data = h["entry/main"]
        assert list(data["index"][:]) == list(range(40)) and data["valid"][:].all()
        for i in range(40):
            expected = chain(source.frame(i), {})
            assert data["corner_sum"][i] == expected["corner_sum"]
            assert data["total_sum"][i] == expected["total_sum"]
            np.testing.assert_array_equal(data["binned"][i], expected["binned"])
        positions = h["entry/scan/positions"]
        assert list(positions["samx"][:]) == [source.position(i)["samx"] for i in range(40)]
        assert list(positions["samy"][:]) == [source.position(i)["samy"] for i in range(40)]
        config = json.loads(h["entry/process/configuration_json"][()])
        assert config["main"]["steps"] == ROI_STEPS
        assert list(h["entry/process/processing_version"][:]) == [config["main"]["version"]] * 40
        assert h["entry/sample/name"][()] == b"LaB6"
        assert h["entry/instrument/detector/shape"][:].tolist() == [64, 48]
        assert h["entry/frames_written"][()] == 40 and h["entry/frames_acquired"][()] == 40
        assert data.attrs["signal"] in data and data[data.attrs["signal"]].shape == (40,)


def pipeline_detector(rate_hz: float = 0.0):
    from pipelines.sources.simulator import SimulatedDetector

    return SimulatedDetector(shape=[64, 48], rate_hz=rate_hz, frames=50)


READER = r"""
import json, sys, time
import h5py
path, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
with h5py.File(path, "r", libver="latest", swmr=True) as f:
    valid, total = f["entry/main/valid"], f["entry/main/total_sum"]
    while time.monotonic() < deadline:
        valid.refresh(); total.refresh()
        rows = valid.shape[0]
        ok = int(valid[:rows].sum())
        print(json.dumps({"rows": rows, "valid": ok, "first": float(total[0]) if rows else None}), flush=True)
        if rows >= int(sys.argv[3]):
            break
        time.sleep(0.05)
"""


def test_a_reader_in_another_process_sees_frames_while_the_scan_runs(tmp_path):
    source = pipeline_detector(rate_hz=20.0)
    p = InProcessPipeline(
        writers={"hdf5": ("main", WriterSettings(directory=str(tmp_path), flush_s=0.2))}, source=source
    )
    reader = None
    try:
        p.start_scan(10_000)  # far more than will be taken: the scan ends when the reader has seen enough
        writer = p.writers["hdf5"]
        wait_for(lambda: writer.frames_written >= 2, what="first rows written")
        reader = subprocess.Popen(
            [sys.executable, "-c", READER, writer.last_file, "120", "30"], stdout=subprocess.PIPE, text=True
        )
        seen = []
        for line in reader.stdout:
            seen.append(json.loads(line))
            if seen[-1]["rows"] >= 30:
                break
        assert p.master.acquiring, "the scan must still be running while the reader reads"
        reader.wait(timeout=60)
        p.end_scan(wait_acquired=False)
    finally:
        if reader is not None and reader.poll() is None:
            reader.kill()
            reader.wait()
        p.stop()
    growing = [s["valid"] for s in seen]
    assert growing[-1] >= 30 and len(set(growing)) >= 2, growing  # it saw the file grow, frame by frame
    assert growing == sorted(growing)
    expected_first = float(source.frame(0).sum(dtype=np.float64))
    assert all(s["first"] == expected_first for s in seen if s["rows"])
    with h5py.File(writer.last_file) as h:
        rows = h["entry/main/valid"].shape[0]  # every frame acquired is in the closed file
        assert rows >= 30 and h["entry/main/valid"][:].all()
        assert h["entry/frames_acquired"][()] == rows == h["entry/frames_written"][()]
