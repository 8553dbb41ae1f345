"""The scan file: one row per frame, gaps marked, derived streams ragged."""

import h5py
import numpy as np
import pytest

from pipelines import message as m
from pipelines.writers.nexus import NexusScanFile


def test_rows_gaps_and_ragged_derived_streams(tmp_path):
    start = m.Message(m.SCAN_START, scan=3, stream="main", meta={"sample": "Si", "processing": {"main": {}}})
    f = NexusScanFile(tmp_path / "s.h5", start, "p")
    peaks = {0: np.ones((2, 4), np.float32), 3: np.full((5, 4), 3, np.float32)}
    for i in range(5):
        if i == 2:
            f.write(m.Message(m.GAP, scan=3, index=2, stream="main"))
            continue
        msg = m.Message(m.RESULT, scan=3, index=i, stream="main", scalars={"n": i, "x": i * 0.5},
                        arrays={"img": np.full((2, 3), i, np.uint16)})
        if i in peaks:
            msg.arrays["hits/peaks"] = peaks[i]
            msg.scalars["hits/n_peaks"] = len(peaks[i])
        f.write(msg)
    with pytest.raises(ValueError, match="written twice or out of order"):
        f.write(m.Message(m.RESULT, scan=3, index=1, stream="main"))
    f.close()
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


def test_never_overwrites_an_existing_file(tmp_path):
    (tmp_path / "s.h5").write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        NexusScanFile(tmp_path / "s.h5", m.Message(m.SCAN_START, scan=1), "p")
    assert (tmp_path / "s.h5").read_bytes() == b"precious"
