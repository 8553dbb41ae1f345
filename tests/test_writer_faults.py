"""Storage faults: a full disk or an unwritable folder stops the writer, not the data.

A full disk is simulated with a file-size limit (``RLIMIT_FSIZE``) in a child
process that runs the pipeline's engines: writes beyond the limit fail as they do
on a full disk (EFBIG instead of ENOSPC), it needs no privileges and leaves no
mount behind; raising the limit again is "freeing space". The unwritable folder
is a path through a regular file, which stops root as well as anyone.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipelines.engine import Health
from pipelines.sources.simulator import SimulatedDetector
from pipelines.writers import WriterSettings

from .writer_harness import InProcessPipeline, wait_for

ROOT = Path(__file__).resolve().parent.parent
FRAMES = 240
SHAPE = [512, 512]
LIMIT = 8 << 20  # bytes a file may have while the "disk" is full; the scan needs ~120 MiB


def full_disk_scenario(directory: str) -> None:
    """Run in a child process: a scan of raw frames into a file that hits the size limit."""
    import resource
    import signal
    import time

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def say(**what):
        print(json.dumps(what), flush=True)

    source = SimulatedDetector(shape=SHAPE, rate_hz=0, frames=FRAMES)
    p = InProcessPipeline(
        groups={"raw": ["passthrough"]},
        source=source,
        capacity=8,
        retry_s=0.3,
        outbox_capacity=8,
        writers={"hdf5": ("raw", WriterSettings(directory=directory, flush_s=0.1))},
    )
    writer = p.writers["hdf5"]
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, hard))
        p.start_scan(FRAMES)
        wait_for(lambda: bool(writer.fault), what="the storage fault")
        time.sleep(2.0)  # what was on its way settles in the buffers
        sorter = p.sorters["raw"].counters()
        say(
            state=writer.health.value,
            status=writer.status,
            file=writer.last_file,
            held=len(writer._held),
            written=writer.frames_written,
            dropped=p.master.stats.dropped,
            blocked=writer.blocked(),
            sorter_backlog=sorter["Backlog"],
            sorter_missing=sorter["MissingFrames"],
        )
        sys.stdin.readline()  # the parent reads the file meanwhile
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space is back
        p.end_scan()
        say(
            state=writer.health.value,
            written=writer.frames_written,
            faults=writer.storage_faults,
            acquired=p.master.scan_frames,
            dropped=p.master.stats.dropped,
            missing=p.sorters["raw"].counters()["MissingFrames"],
        )
    finally:
        p.stop()


def test_a_full_disk_holds_the_data_and_the_scan_completes_when_space_is_back(tmp_path):
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from tests.test_writer_faults import full_disk_scenario; "
            f"full_disk_scenario({str(tmp_path / 'data')!r})",
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        fault = json.loads(child.stdout.readline() or "{}")
        assert fault["state"] == "FAULT", fault
        assert fault["file"] in fault["status"] and "Retrying" in fault["status"]
        assert fault["blocked"] and fault["held"] >= 1
        # no credit from the writer: the sorter holds its ordered results for it, nothing is dropped
        assert fault["sorter_backlog"] >= 8 and fault["dropped"] == 0 and fault["sorter_missing"] == 0
        source = SimulatedDetector(shape=SHAPE, rate_hz=0, frames=FRAMES)
        with h5py.File(fault["file"], "r", libver="latest", swmr=True) as f:  # readable during the fault
            valid = f["entry/raw/valid"][()]
            images = f["entry/raw/image"]
            good = np.flatnonzero(valid)
            assert len(good) >= 4 and list(good) == list(range(len(good)))
            for i in good:
                np.testing.assert_array_equal(images[i], source.frame(i))
        child.stdin.write("go\n")
        child.stdin.flush()
        done = json.loads(child.stdout.readline() or "{}")
        assert child.wait(timeout=120) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert done["state"] == "ON" and done["written"] == FRAMES and done["acquired"] == FRAMES
    assert done["faults"] == 1 and done["dropped"] == 0 and done["missing"] == 0
    with h5py.File(fault["file"]) as f:
        valid = f["entry/raw/valid"][()]
        assert len(valid) == FRAMES and valid.all()
        images = f["entry/raw/image"]
        for i in range(FRAMES):
            np.testing.assert_array_equal(images[i], source.frame(i))
        assert f["entry/frames_written"][()] == FRAMES
    assert [p.name for p in Path(fault["file"]).parent.iterdir()] == [Path(fault["file"]).name]


def test_an_unwritable_folder_gives_fault_naming_it_and_nothing_is_lost(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the folder should be")
    folder = blocker / "data"
    source = SimulatedDetector(shape=[32, 32], rate_hz=0, frames=60)
    p = InProcessPipeline(
        source=source,
        capacity=4,
        retry_s=0.2,
        writers={"hdf5": ("main", WriterSettings(directory=str(folder)))},
    )
    writer = p.writers["hdf5"]
    try:
        p.start_scan(60)
        wait_for(lambda: writer.health is Health.FAULT, what="FAULT")
        assert str(folder) in writer.status and writer.blocked()
        wait_for(lambda: p.master.scan_frames > 0, what="some frames")
        held_back = p.master.scan_frames
        assert held_back < 60 and p.master.stats.dropped == 0
        assert writer.counters()["HeldMessages"] >= 1
        blocker.unlink()  # the folder can be made now
        p.end_scan()
    finally:
        p.stop()
    assert writer.health is Health.ON and writer.frames_written == 60
    with h5py.File(writer.last_file) as f:
        assert Path(writer.last_file).parent == folder
        assert f["entry/main/valid"][()].all() and len(f["entry/main/valid"]) == 60
        assert f["entry/main/total_sum"][59] == float(source.frame(59).sum(dtype=np.float64))


def test_status_and_counters_name_the_fault_in_a_device_friendly_way(tmp_path):
    os.chmod(tmp_path, 0o755)
    blocker = tmp_path / "f"
    blocker.write_text("x")
    p = InProcessPipeline(
        source=SimulatedDetector(shape=[16, 16], rate_hz=0, frames=5),
        retry_s=60,
        writers={"h": ("main", WriterSettings(directory=str(blocker / "d")))},
    )
    writer = p.writers["h"]
    try:
        p.start_scan(5)
        wait_for(lambda: bool(writer.fault), what="fault")
        assert writer.counters()["StorageFaults"] == 1
        assert writer.fault.startswith(f"cannot write {blocker / 'd'}")
        blocker.unlink()
        assert writer.call(writer.retry)  # the Tango command Retry: at once, not after RetryPeriod
        p.end_scan()
    finally:
        p.stop()
    assert writer.frames_written == 5


def failing_write_scenario(path: str, flush_every: int) -> None:
    """Run in a child process: HDF5 itself fails (no space check), then the file recovers."""
    import resource
    import signal

    from pipelines import message as m
    from pipelines.writers.nexus import NexusScanFile

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    f = NexusScanFile(path, m.Message(m.SCAN_START, scan=1, stream="raw"), space_margin=None)

    def frame(i):
        return m.Message(
            m.RESULT,
            scan=1,
            index=i,
            stream="raw",
            arrays={"image": np.full((512, 512), i, np.uint16)},
            scalars={"i": i},
        )

    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, hard))
    i, failed = 0, None
    while i < 60 and failed is None:
        try:
            f.write(frame(i))
            i += 1
            if i % flush_every == 0:
                f.flush(force=True)
        except (OSError, RuntimeError) as exc:
            failed = str(exc).splitlines()[0]
    try:
        f.recover()  # still no room: it must fail cleanly, and can be tried again
        early = "recovered"
    except (OSError, RuntimeError) as exc:
        early = str(exc).splitlines()[0]
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    f.recover()
    while i < 60:  # the message that failed, and the rest
        f.write(frame(i))
        i += 1
    f.close()
    print(json.dumps({"failed": failed, "early": early}), flush=True)


@pytest.mark.parametrize("flush_every", [1, 1000], ids=["fails-in-flush", "fails-in-write"])
def test_a_write_that_fails_inside_hdf5_is_recovered_without_losing_rows(tmp_path, flush_every):
    path = tmp_path / "s.h5"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            f"from tests.test_writer_faults import failing_write_scenario; "
            f"failing_write_scenario({str(path)!r}, {flush_every})",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["failed"] and report["early"] != "recovered"
    with h5py.File(path) as f:
        assert f["entry/raw/valid"][()].all() and len(f["entry/raw/valid"]) == 60
        assert list(f["entry/raw/i"][()]) == list(range(60))
        images = f["entry/raw/image"]
        assert all(images[i, 0, 0] == i and images[i, -1, -1] == i for i in range(60))
