"""Random access: the sink answers for evicted datasets from the scan files, the same call."""

import os
import time

import numpy as np
import pytest

from pipelines import message as m
from pipelines.files import ScanFileIndex, read_result
from pipelines.query import QueryError, SinkClient
from pipelines.sources.simulator import SimulatedDetector
from pipelines.writers import WriterSettings
from pipelines.writers.nexus import NexusScanFile

from .writer_harness import InProcessPipeline, wait_for


def sparse_spots(frame, meta, *, every: int = 3):
    """Numbers of every kind, an image, a profile, and a derived stream on some frames only."""
    index = meta["index"]
    out = {
        "total": float(frame.sum(dtype=np.float64)),
        "count": int(index * 7),
        "label": f"point-{index}",
        "flag": bool(index % 2),
        "small": frame[:4, :4].astype(np.float32) / 3,
        "profile": frame.mean(axis=0, dtype=np.float64),
    }
    if index % every == 0:
        n = 1 + index % 4
        out["spots/xy"] = np.arange(2 * n, dtype=np.float32).reshape(n, 2) + index
        out["spots/n"] = n
    return out


STEPS = [{"tests.test_scan_files:sparse_spots": {"every": 3}}]


def assert_same_result(a: m.Message, b: m.Message) -> None:
    assert (a.scan, a.index, a.stream, a.version) == (b.scan, b.index, b.stream, b.version)
    assert sorted(a.arrays) == sorted(b.arrays) and sorted(a.scalars) == sorted(b.scalars)
    for name, value in a.arrays.items():
        assert b.arrays[name].dtype == value.dtype and b.arrays[name].shape == value.shape, name
        np.testing.assert_array_equal(b.arrays[name], value)
    for name, value in a.scalars.items():
        assert type(b.scalars[name]) is type(value) and b.scalars[name] == value, name


def test_a_query_for_an_evicted_dataset_returns_the_same_result_from_the_file(tmp_path):
    settings = WriterSettings(directory=str(tmp_path), pipeline="demo")
    p = InProcessPipeline(
        groups={"main": STEPS},
        writers={"hdf5": ("main", settings)},
        sink_group="main",
        sink_memory=20_000,
        source=SimulatedDetector(shape=[32, 32], rate_hz=0, frames=30),
    )
    client = None
    try:
        p.sink.queries.files = ScanFileIndex(settings.directory, settings.pattern, settings.pipeline)
        client = SinkClient(p.sink.endpoint, timeout_s=20)
        p.scan(24, scan_id=41)
        wait_for(lambda: client.datasets()[-1]["frames"] == 24, what="scan 41 in the sink")
        indices = (0, 3, 5, 23)
        in_memory = {i: client.get(41, "main", i) for i in indices}
        assert "spots/xy" in in_memory[3].arrays and "spots/xy" not in in_memory[5].arrays
        p.scan(24, scan_id=42)  # the sink's memory holds one scan: 41 is evicted
        wait_for(
            lambda: [(d["scan"], d["frames"]) for d in client.datasets()] == [(42, 24)], what="41 evicted"
        )
        assert (41, "main") not in p.sink.store.datasets and p.sink.store.evictions >= 1
        for i in indices:
            from_file = client.get(41, "main", i)  # the same call as before
            assert_same_result(in_memory[i], from_file)
        assert client.get(42, "main", 5).scalars["label"] == "point-5"  # still from memory
        with pytest.raises(QueryError, match="no file"):
            client.get(40, "main", 0)
        with pytest.raises(QueryError, match="not in"):
            client.get(41, "main", 99)
    finally:
        if client is not None:
            client.close()
        p.stop()


def test_a_gap_read_from_a_file_is_reported_as_a_gap(tmp_path):
    f = NexusScanFile(tmp_path / "p_scan00007.h5", m.Message(m.SCAN_START, scan=7, stream="main"), "p")
    f.write(m.Message(m.RESULT, scan=7, index=0, stream="main", scalars={"x": 1.5}))
    f.write(m.Message(m.GAP, scan=7, index=1, stream="main"))
    f.close()
    index = ScanFileIndex(tmp_path, "{pipeline}_scan{scan:05}.h5", "p")
    assert index.read(7, "main", 0).scalars == {"x": 1.5}
    with pytest.raises(KeyError, match="a gap"):
        index.read(7, "main", 1)


def test_the_index_finds_the_newest_file_of_a_repeated_scan_id_and_the_scan_dir(tmp_path):
    index = ScanFileIndex(tmp_path, "{pipeline}_scan{scan:05}.h5", "p")
    older = tmp_path / "p_scan00003.h5"
    newer = tmp_path / "p_scan00003_2.h5"
    for path, value in ((older, 1.0), (newer, 2.0)):
        f = NexusScanFile(path, m.Message(m.SCAN_START, scan=3, stream="main"))
        f.write(m.Message(m.RESULT, scan=3, index=0, stream="main", scalars={"v": value}))
        f.close()
    os.utime(older, (time.time() - 60, time.time() - 60))
    (tmp_path / "p_scan00003_old.h5").write_bytes(b"not one of ours")
    assert index.find(3, "main") == newer
    assert index.read(3, "main", 0).scalars["v"] == 2.0
    elsewhere = tmp_path / "sardana" / "scan3"
    f = NexusScanFile(elsewhere / "mine.h5", m.Message(m.SCAN_START, scan=3, stream="main"))
    f.write(m.Message(m.RESULT, scan=3, index=0, stream="main", scalars={"v": 3.0}))
    f.close()
    meta = {"scan_dir": str(elsewhere), "scan_file": "mine.h5"}
    assert index.read(3, "main", 0, meta).scalars["v"] == 3.0
    assert read_result(elsewhere / "mine.h5", "main", 0, 3).scalars["v"] == 3.0
