"""Offline = online: files replayed through the same pipeline give the same results."""

import h5py
import numpy as np
import pytest
import tifffile

from pipelines.definition import DefinitionError, PipelineDefinition
from pipelines.sources import SourceError, load_source
from pipelines.sources.files import FileSource, count_frames
from pipelines.sources.simulator import SimulatedDetector
from pipelines.writers import WriterSettings

from .writer_harness import ROI_STEPS, InProcessPipeline, MovingSample

RNG = np.random.default_rng(5)


def frames_of(source, scan=None):
    return [(frame.copy(), meta) for frame, meta in source.frames(scan or {})]


def test_replaying_the_raw_frames_of_a_scan_gives_identical_results(tmp_path):
    online = MovingSample(SimulatedDetector(shape=[64, 48], rate_hz=0, frames=50))
    writers = {
        "raw": ("raw", WriterSettings(directory=str(tmp_path / "online"), pattern="{stream}_{scan}.h5")),
        "main": ("main", WriterSettings(directory=str(tmp_path / "online"), pattern="{stream}_{scan}.h5")),
    }
    p = InProcessPipeline(groups={"raw": ["passthrough"], "main": ROI_STEPS}, writers=writers, source=online)
    try:
        files = p.scan(30, scan_id=3, sample="Si")
    finally:
        p.stop()
    replay = FileSource(files=[files["raw"]])
    assert count_frames(files["raw"]) == 30
    p = InProcessPipeline(
        groups={"main": ROI_STEPS},
        source=replay,
        writers={
            "main": (
                "main",
                WriterSettings(directory=str(tmp_path / "offline"), pattern="{stream}_{scan}.h5"),
            )
        },
    )
    try:
        offline = p.scan(30, scan_id=3)["main"]
    finally:
        p.stop()
    with h5py.File(files["main"]) as a, h5py.File(offline) as b:
        first, second = a["entry/main"], b["entry/main"]
        names = sorted(n for n in first if n != "processing_version")
        assert names == sorted(n for n in second if n != "processing_version")
        assert {"binned", "corner_sum", "total_sum", "valid"} <= set(names)
        for name in names:
            np.testing.assert_array_equal(first[name][()], second[name][()], err_msg=name)
        for motor in ("samx", "samy"):  # the positions the raw file recorded come along with the frames
            np.testing.assert_array_equal(
                a[f"entry/scan/positions/{motor}"][()], b[f"entry/scan/positions/{motor}"][()]
            )


def _eiger(tmp_path, parts, compression=True):
    """An Eiger-like master file whose /entry/data/data_00000N link to data files."""
    import hdf5plugin

    master = tmp_path / "series_7_master.h5"
    with h5py.File(master, "w") as m:
        data = m.create_group("entry/data")
        m["entry/instrument/detector/description"] = "Dectris EIGER2 Si 4M"
        for n, frames in enumerate(parts, start=1):
            name = f"series_7_data_{n:06d}.h5"
            with h5py.File(tmp_path / name, "w") as d:
                d.create_dataset(
                    "entry/data/data",
                    data=frames,
                    chunks=(1, *frames.shape[1:]),
                    **(hdf5plugin.Bitshuffle(cname="lz4") if compression else {}),
                )
            data[f"data_{n:06d}"] = h5py.ExternalLink(name, "/entry/data/data")
    return master


def test_an_eiger_master_file_plays_its_data_files_in_order(tmp_path):
    parts = [
        RNG.integers(0, 4000, (5, 16, 12), dtype=np.uint32),
        RNG.integers(0, 4000, (3, 16, 12), dtype=np.uint32),
    ]
    master = _eiger(tmp_path, parts)
    assert count_frames(str(master)) == 8
    played = frames_of(FileSource(files=[str(master)]))
    np.testing.assert_array_equal(np.stack([f for f, _ in played]), np.concatenate(parts))
    assert [meta["source_index"] for _, meta in played] == list(range(8))
    (tmp_path / "series_7_data_000002.h5").unlink()
    with pytest.raises(SourceError, match="data_000002 links to series_7_data_000002.h5"):
        frames_of(FileSource(files=[str(master)]))


def test_tiff_series_a_folder_a_glob_and_a_multipage_file(tmp_path):
    frames = RNG.integers(0, 60000, (6, 10, 14), dtype=np.uint16)
    folder = tmp_path / "series"
    folder.mkdir()
    for i, frame in enumerate(frames):
        tifffile.imwrite(folder / f"img_{i:03d}.tif", frame)
    (folder / "notes.txt").write_text("not an image")
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, frames)
    for spec in (str(folder), str(folder / "img_*.tif"), str(stack)):
        assert count_frames(spec) == 6
        played = frames_of(FileSource(files=[spec]))
        np.testing.assert_array_equal(np.stack([f for f, _ in played]), frames, err_msg=spec)


def test_each_scan_plays_the_next_file_or_the_one_startscan_names(tmp_path):
    paths = []
    for n in range(3):
        path = tmp_path / f"f{n}.h5"
        with h5py.File(path, "w") as f:
            f["entry/instrument/detector/data"] = np.full((2, 4, 4), n, np.uint16)
        paths.append(str(path))
    source = FileSource(files=paths[:2])
    assert frames_of(source)[0][0][0, 0] == 0
    assert frames_of(source, {"file": paths[2]})[0][0][0, 0] == 2  # named: the turn is not used up
    assert frames_of(source)[0][0][0, 0] == 1
    assert len(frames_of(FileSource(files=paths), {"frames": 1})) == 1
    with pytest.raises(SourceError, match="all 2 inputs were played"):
        frames_of(source)
    with pytest.raises(SourceError, match="no frames found"):
        with h5py.File(tmp_path / "flat.h5", "w") as f:
            f["x"] = np.zeros(3)
        frames_of(FileSource(files=[str(tmp_path / "flat.h5")]))


def test_the_files_source_in_a_definition(tmp_path):
    spec = {"kind": "files", "files": [str(tmp_path / "a.h5")], "rate_hz": 5}
    d = PipelineDefinition(
        {"name": "re", "master": {"source": spec}, "groups": {"main": {"steps": ["passthrough"]}}}
    )
    assert d.source["kind"] == "files"
    assert isinstance(load_source(d.source), FileSource)
    with pytest.raises(DefinitionError, match="unknown parameter 'file'"):
        PipelineDefinition(
            {"name": "re", "master": {"source": {"kind": "files", "file": "a.h5"}}, "groups": {"main": {}}}
        )
