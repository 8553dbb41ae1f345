"""Overload: a source at ten times what the workers can do, on a deployed pipeline.

Real Tango database, real server processes: two workers whose step takes a known
time per frame (``benchmarks.soak:paced``, sleeping 400 ms: 5 frames/s together),
a simulated detector at 50 frames/s of 1 MiB, and a master with a drop policy.
While it runs, the resident memory of every process is sampled from /proc; the
frames are big so that a leak of one frame per dropped frame would add hundreds of
MB. Then: memory plateaus, the master's queue stayed within its bounds in frames
and bytes, every drop was counted and every index is either a right result or a
gap at exactly a dropped index (in the file, in the sink and in the sorter's
stream), and a scan at a rate the workers manage flows again with no drop.

``TANGOPIPE_OVERLOAD_S=60`` runs the overload for the full minute;
``python -m benchmarks.soak --step-ms 400 --rate-hz 50 --policy drop_oldest``
keeps it up for as long as wanted.
"""

import json
import os
import threading
import time

import h5py
import pytest
import tango
import yaml

from benchmarks.soak import PACED_STEP, frame_checksum, processes, rss_mb
from devices.deploy import Session
from pipelines import message as m
from pipelines.consumer import ConsumerEngine
from pipelines.definition import load_definition
from pipelines.query import SinkClient
from pipelines.sources.simulator import SimulatedDetector
from tests.waiting import wait_for

from .conftest import Deployed, demo_config, pids_alive

pytestmark = pytest.mark.slow

SHAPE = [1024, 512]  # uint16: 1 MiB a frame
FRAME_MB = SHAPE[0] * SHAPE[1] * 2 / 2**20
WORKERS = 2
STEP_MS = 400.0
CAPACITY_HZ = WORKERS * 1000.0 / STEP_MS  # what the workers can do: 5 frames/s
RATE_HZ = 10 * CAPACITY_HZ
OVERLOAD_S = float(os.environ.get("TANGOPIPE_OVERLOAD_S", "24"))
RECOVERY_FRAMES = 15
RECOVERY_HZ = CAPACITY_HZ / 2
SAMPLE_S = 0.25
#: growth allowed from the first half of the overload to the second, per process; a leak
#: of one frame per drop would be ~45 MB/s here (the test checks it would exceed 4x this)
RSS_MARGIN_MB = 40.0
DROP_REASON = "dropped by overflow policy"


def overload_config(folder, policy: str, capacity: int, queue_mb: int):
    path = demo_config(folder)
    data = yaml.safe_load(path.read_text())
    data["master"].update(
        source={"kind": "simulator", "shape": SHAPE, "dtype": "uint16", "rate_hz": RATE_HZ, "frames": 100},
        queue_capacity=capacity,
        queue_mb=queue_mb,
        overflow_policy=policy,
    )
    data["groups"]["main"].update(workers=WORKERS, credit=2, steps=[{PACED_STEP: {"ms": STEP_MS}}])
    data["sink"]["memory_limit_mb"] = 64
    path.write_text(yaml.safe_dump(data))
    return path


class Tap(ConsumerEngine):
    """One more consumer of the sorter's ordered stream: what each index became, and why."""

    def __init__(self):
        super().__init__("overload-tap", credit=64)
        self.seen: dict[str, dict[int, tuple[str, str]]] = {}

    def handle(self, msg: m.Message) -> None:
        if msg.kind in (m.RESULT, m.GAP):
            by_index = self.seen.setdefault(str(msg.scan), {})
            assert msg.index not in by_index, f"index {msg.index} of scan {msg.scan} passed on twice"
            by_index[msg.index] = (msg.kind, str(msg.body.get("reason", "")))


class Sampler(threading.Thread):
    """RSS of every process and the master's queue, every SAMPLE_S, until stopped."""

    def __init__(self, pids: dict[str, int], master_name: str, tango_host: str):
        super().__init__(name="rss-sampler", daemon=True)
        self.pids = pids
        self.master_name = f"tango://{tango_host}/{master_name}"
        self.samples: list[dict] = []
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            master = tango.DeviceProxy(self.master_name)
            master.set_timeout_millis(3000)
            start = time.monotonic()
            while not self._stop_event.is_set():
                counters = json.loads(master.Counters)
                rss = {name: rss_mb(pid) for name, pid in self.pids.items()}
                self.samples.append({"t": time.monotonic() - start, "rss": rss, **counters})
                self._stop_event.wait(SAMPLE_S)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def stop(self) -> list[dict]:
        self._stop_event.set()
        self.join(10)
        assert self.error is None, f"sampling failed: {self.error!r}"
        return self.samples


def counters(pipeline: Deployed) -> dict[str, dict]:
    names = ["demo/master/1", "demo/sorter/main", "demo/sink/1", "demo/writer/hdf5"]
    names += [f"demo/worker/main-{i}" for i in range(1, WORKERS + 1)]
    return {name: json.loads(pipeline.proxy(name).Counters) for name in names}


def scan(pipeline: Deployed, frames: int, rate_hz: float, during=None) -> dict:
    """One scan of ``frames`` at ``rate_hz``; the counters' changes and the file."""
    master, writer = pipeline.proxy("demo/master/1"), pipeline.proxy("demo/writer/hdf5")
    before, done = counters(pipeline), writer.ScansDone
    scan_id = master.StartScan(json.dumps({"frames": frames, "rate_hz": rate_hz}))
    wait_for(lambda: master.Acquiring or master.ScanFrames >= frames, timeout=30, what="acquisition started",
             period=0.05)
    if during is not None:
        during()
    wait_for(lambda: not master.Acquiring, timeout=frames / rate_hz * 4 + 60, what="acquisition", period=0.1)
    state_at_end = {name: pipeline.proxy(name).state() for name in ("demo/master/1", "demo/sorter/main")}
    acquired = master.EndScan()
    wait_for(lambda: writer.ScansDone > done, timeout=120, what="the scan's file closed", period=0.1)

    def settled() -> bool:  # the last confirmations and the counters' cache may lag the file by a moment
        nonlocal delta
        after = counters(pipeline)
        delta = {n: {k: v - before[n].get(k, 0) for k, v in c.items() if isinstance(v, int)} for n, c in after.items()}
        results = delta["demo/sorter/main"]["FramesOut"]
        workers = sum(delta[f"demo/worker/main-{i}"]["FramesOut"] for i in range(1, WORKERS + 1))
        return workers == results == delta["demo/sink/1"]["FramesIn"]

    delta: dict = {}
    try:
        wait_for(settled, timeout=10, what="counters settled", period=0.2)
    except AssertionError:
        pass  # the checks below say which counter disagrees
    return {"id": scan_id, "acquired": acquired, "delta": delta, "file": writer.LastFile, "state": state_at_end}


def check_every_index(result: dict, tap: Tap, sink_endpoint: str) -> tuple[int, int]:
    """Each index of the scan is a result of its own frame or a policy gap, the same in the file,
    the sink and the sorter's stream; returns (processed, dropped)."""
    acquired, delta = result["acquired"], result["delta"]
    dropped = delta["demo/master/1"]["DroppedFrames"]
    processed = sum(delta[f"demo/worker/main-{i}"]["FramesOut"] for i in range(1, WORKERS + 1))
    assert dropped == acquired - processed, (acquired, processed, dropped)
    assert delta["demo/sorter/main"]["FramesOut"] == processed
    assert delta["demo/sorter/main"]["MissingFrames"] == dropped  # no index given up on: only policy drops
    assert delta["demo/writer/hdf5"]["FramesWritten"] == processed
    assert delta["demo/sink/1"]["FramesIn"] == processed

    source = SimulatedDetector(shape=SHAPE, dtype="uint16")
    with h5py.File(result["file"]) as f:
        data = f["entry/main"]
        assert list(data["index"][:]) == list(range(acquired))
        valid = data["valid"][:]
        present = [i for i in range(acquired) if valid[i]]
        gaps = sorted(set(range(acquired)) - set(present))
        assert sorted(f["entry/gaps"][:].tolist()) == gaps
        assert f["entry/frames_dropped"][()] == dropped and f["entry/frames_acquired"][()] == acquired
        frame_index, checksum = data["frame_index"][:], data["checksum"][:]
    assert len(present) == processed and len(gaps) == dropped
    for i in present:
        assert frame_index[i] == i and checksum[i] == frame_checksum(source.frame(i)), f"index {i}"

    stream = tap.seen.get(str(result["id"]), {})
    assert sorted(stream) == list(range(acquired))
    tap_gaps = sorted(i for i, (kind, _) in stream.items() if kind == m.GAP)
    assert tap_gaps == gaps
    assert all(DROP_REASON in stream[i][1] for i in tap_gaps), {stream[i][1] for i in tap_gaps}

    client = SinkClient(sink_endpoint)
    try:
        (dataset,) = [d for d in client.datasets() if str(d["scan"]) == str(result["id"])]
        assert (dataset["frames"], dataset["gaps"]) == (processed, dropped)
        if present:
            indices, values = client.slice(dataset["scan"], "main", "frame_index")
            assert indices.tolist() == present and values.tolist() == present
    finally:
        client.close()
    return processed, dropped


def check_plateau(samples: list[dict], names: list[str]) -> str:
    """Max RSS over the second half of the run is not above the first half's by RSS_MARGIN_MB."""
    half = samples[-1]["t"] / 2
    first = [s for s in samples if s["t"] <= half]
    second = [s for s in samples if s["t"] > half]
    assert len(first) >= 5 and len(second) >= 5, "too few samples"
    drops_second = second[-1]["DroppedFrames"] - first[-1]["DroppedFrames"]
    # the test can see a leak of one frame per drop only if such a leak would exceed the margin well
    assert drops_second * FRAME_MB > 4 * RSS_MARGIN_MB, f"only {drops_second} drops in the second half"
    report = []
    for name in names:
        assert all(s["rss"][name] is not None for s in samples), f"{name} died during the overload"
        a = max(s["rss"][name] for s in first)
        b = max(s["rss"][name] for s in second)
        report.append(f"{name} {a:.0f}->{b:.0f} MB")
        assert b - a <= RSS_MARGIN_MB, (
            f"{name}: RSS grew from {a:.0f} MB (first half) to {b:.0f} MB (second half) "
            f"over {drops_second} drops: " + ", ".join(report)
        )
    return ", ".join(report)


def all_on(pipeline: Deployed) -> bool:
    """Every device idle and healthy: nothing still says the overload (ALARM) after a clean scan."""
    return all(d["state"] == "ON" for d in pipeline.status()["devices"])


CASES = [
    pytest.param("drop_newest", 16, 2048, id="drop_newest-bounded-in-frames"),
    pytest.param("drop_oldest", 64, 12, id="drop_oldest-bounded-in-bytes"),
]


@pytest.mark.parametrize(("policy", "capacity", "queue_mb"), CASES)
def test_ten_times_overload_bounded_memory_counted_drops_then_recovery(tmp_path, policy, capacity, queue_mb):
    pipeline = Deployed(tmp_path, overload_config(tmp_path, policy, capacity, queue_mb))
    tap = Tap()
    try:
        pids = processes(Session(**pipeline.session), load_definition(pipeline.config))
        sorter = pipeline.proxy("demo/sorter/main")
        tap.start()
        tap.connect(sorter.DataEndpoint)
        wait_for(lambda: sorter.Consumers == 3, timeout=30, what="the tap connected to the sorter")
        sink_endpoint = pipeline.proxy("demo/sink/1").QueryEndpoint

        sampler = Sampler(pids, "demo/master/1", pipeline.tango_host)
        frames = int(RATE_HZ * OVERLOAD_S)
        overload = scan(pipeline, frames, RATE_HZ, during=sampler.start)
        samples = sampler.stop()
        processed, dropped = check_every_index(overload, tap, sink_endpoint)
        assert processed > 0 and dropped > frames / 2, (processed, dropped)
        alarm = tango.DevState.ALARM
        assert overload["state"] == {"demo/master/1": alarm, "demo/sorter/main": alarm}  # drops show as they happen
        assert max(s["QueueDepth"] for s in samples) <= capacity
        assert max(s["QueuedBytes"] for s in samples) <= queue_mb * 2**20
        plateau = check_plateau(samples, list(pids))

        recovery = scan(pipeline, RECOVERY_FRAMES, RECOVERY_HZ)
        assert recovery["acquired"] == RECOVERY_FRAMES
        assert check_every_index(recovery, tap, sink_endpoint) == (RECOVERY_FRAMES, 0)
        wait_for(lambda: all_on(pipeline), timeout=20, what="every device ON again", period=0.5)
        print(f"{policy}: {frames} frames at {RATE_HZ:g} Hz, {processed} processed, {dropped} dropped; RSS "
              f"max first half -> second half: {plateau}")
    finally:
        tap.stop()
        pipeline.down()
        wait_for(lambda: not pids_alive([pipeline.session["db_pid"], *pipeline.session["servers"].values()]),
                 timeout=15, what="every process stopped")
