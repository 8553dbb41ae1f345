"""Data plane: frames/s and latency of real server processes against a raw pyzmq chain.

Everything runs in one go on this machine:

- baseline: the detector process (``python -m pipelines.sources.stream``) pushes
  2048 x 2048 uint16 frames through a relay process to a consumer process, raw
  pyzmq PUSH/PULL over tcp on 127.0.0.1, zero-copy; frames/s from the consumer's
  first to last frame, and the latency at 50 Hz (detector stamp -> consumer).
- tangopipe: the same detector process feeding a pipeline deployed like
  ``tangopipe up`` does (embedded Tango database in a temporary state folder,
  ``config/bench.yaml``): master (``stream`` source) -> workers -> sorter -> sink.
  Frames/s from the sink's FramesIn, first to last result; latency at 50 Hz from
  the sink's LatencyP50Ms/LatencyP99Ms (master acquisition -> sink).
- scaling: ``benchmarks.steps:busy`` (40 ms of CPU per frame, 256 x 256 frames so
  the data plane is negligible) with 2 workers, then 1 (the second one stopped,
  then started again for the next round).
- pass-through: one worker running ``benchmarks.steps:first_pixel`` (one scalar
  out), so only frames moving master -> worker are measured; over tcp and through
  shared memory when the pipeline definition has the switch (``master.shared_memory``).
- CPU per frame of every process (user + system), which does not depend on what
  else the machine runs: on a shared machine the frames/s swing, this does not.

A full run repeats each measurement 3 times, the raw chain alternating with the
pipeline (and 2 workers with 1), and reports medians; ratios are medians of the
per-round ratios. ``--quick`` is a smoke run: one round, few frames, default path.

    python -m benchmarks [--quick] dataplane
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import yaml
import zmq

ROOT = Path(__file__).resolve().parent.parent
BIG = (2048, 2048)
SMALL = (256, 256)
BUSY_MS = 40.0
LATENCY_HZ = 50.0
HWM = 4  # as the stream source's: frames wait in queues of known size, not in ZeroMQ
PASS_STEP = "benchmarks.steps:first_pixel"


# -- helpers -------------------------------------------------------------------------------
@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _free_port() -> int:
    sock = zmq.Context.instance().socket(zmq.PULL)
    try:
        return sock.bind_to_random_port("tcp://127.0.0.1")
    finally:
        sock.close(0)


class Detector:
    """The stream detector as its own process, sending one series."""

    def __init__(self, port: int, frames: int, shape: tuple[int, int], rate_hz: float = 0.0):
        cmd = [
            sys.executable,
            "-m",
            "pipelines.sources.stream",
            "--port",
            str(port),
            "--frames",
            str(frames),
            "--shape",
            str(shape[0]),
            str(shape[1]),
            "--rate-hz",
            str(rate_hz),
            "--timeout-s",
            "60",
        ]
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        )
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        line = self.proc.stdout.readline()
        if "sending on" not in line:
            self.stop()
            raise RuntimeError(f"the detector process did not start: {line}{self.proc.stderr.read()}")
        self.endpoint = line.split()[-1]
        self.cpu_s = float("nan")

    def finish(self, timeout: float = 30.0) -> None:
        """Wait until the detector has sent everything and exited; note its CPU time for the series."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise RuntimeError("the detector process did not finish its series") from None
        if self.proc.returncode != 0:
            raise RuntimeError(f"the detector process exited {self.proc.returncode}: {err.strip()}")
        if ", cpu " in out:
            self.cpu_s = float(out.rsplit(", cpu ", 1)[1].split()[0])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def _rate(first: tuple[float, int], last: tuple[float, int]) -> float:
    (t0, n0), (t1, n1) = first, last
    return (n1 - n0) / (t1 - t0) if t1 > t0 else float("nan")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


# -- raw pyzmq chain (the baseline) --------------------------------------------------------
def _relay(source: str, sink_port: int, count: int, results: mp.Queue) -> None:
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.rcvhwm = push.sndhwm = HWM
    pull.connect(source)
    push.connect(f"tcp://127.0.0.1:{sink_port}")
    push.send_multipart(pull.recv_multipart(copy=False), copy=False)
    cpu = time.process_time()  # from the first frame on
    for _ in range(count - 1):
        push.send_multipart(pull.recv_multipart(copy=False), copy=False)
    results.put(("relay", time.process_time() - cpu))
    push.close(30_000)  # until delivered
    pull.close(0)
    ctx.term()


def _consume(ports: mp.Queue, results: mp.Queue, count: int) -> None:
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.rcvhwm = HWM
    ports.put(pull.bind_to_random_port("tcp://127.0.0.1"))
    stamps, latencies = [], []
    cpu = 0.0
    for i in range(count):
        parts = pull.recv_multipart(copy=False)
        if i == 0:
            cpu = time.process_time()
        now = time.time()
        stamps.append(time.perf_counter())
        sent = json.loads(parts[0].bytes).get("times", {}).get("detector")
        if sent:
            latencies.append(now - sent)
    results.put(("consumer", {"stamps": stamps, "latencies": latencies, "cpu_s": time.process_time() - cpu}))
    pull.close(0)
    ctx.term()


def raw_chain(frames: int, rate_hz: float = 0.0) -> dict[str, Any]:
    """Detector -> relay -> consumer, three processes; frames/s and latency at the consumer."""
    spawn = mp.get_context("spawn")
    ports, results = spawn.Queue(), spawn.Queue()
    count = frames + 1  # and the series end
    detector = Detector(0, frames, BIG, rate_hz)
    consumer = spawn.Process(target=_consume, args=(ports, results, count), daemon=True)
    relay = None
    try:
        consumer.start()
        port = ports.get(timeout=30)
        relay = spawn.Process(target=_relay, args=(detector.endpoint, port, count, results), daemon=True)
        relay.start()
        got = dict(results.get(timeout=120 + frames / 10) for _ in range(2))
        detector.finish()
    finally:
        for proc in (relay, consumer):
            if proc is not None:
                proc.join(5)
                if proc.is_alive():
                    proc.terminate()
                    proc.join(5)
        detector.stop()
    result = got["consumer"]
    stamps = result["stamps"][:frames]
    latencies = result["latencies"][:frames]
    cpu = {"detector": detector.cpu_s, "relay": got["relay"], "consumer": result["cpu_s"]}
    return {
        "frames_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
        "p50_ms": _percentile(latencies, 50) * 1e3,
        "p99_ms": _percentile(latencies, 99) * 1e3,
        "cpu_ms_per_frame": {k: v * 1e3 / frames for k, v in cpu.items()},
    }


# -- the pipeline --------------------------------------------------------------------------
SHM_KEYS = ("shared_memory", "use_shm")  # the switch of the same-host fast path, by its possible names


def _schema_switches() -> list[tuple[str, ...]]:
    """Where the pipeline definition lets the shared-memory path be switched (may be nowhere)."""
    from pipelines import definition

    switches: list[tuple[str, ...]] = []
    for key in SHM_KEYS:
        if key in definition.MASTER:
            switches.append(("master", key))
        if key in definition.GROUP:
            switches.append(("groups", "main", key))
    return switches


def write_config(folder: Path, detector_port: int, workers: int, steps: list, use_shm: bool | None) -> Path:
    data = yaml.safe_load((ROOT / "config" / "bench.yaml").read_text())
    data["master"]["source"]["endpoint"] = f"tcp://127.0.0.1:{detector_port}"
    data["groups"]["main"].update(workers=workers, steps=steps)
    if use_shm is not None:
        for path in _schema_switches():
            node = data
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = use_shm
    path = folder / f"bench-{workers}w-{'shm' if use_shm else 'plain'}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class Deployment:
    """A benchmark pipeline brought up and down with devices.deploy, in its own state folder."""

    def __init__(self, folder: Path, config: Path, detector_port: int):
        from devices import deploy
        from pipelines.definition import load_definition

        self.deploy = deploy
        self.folder = folder
        self.definition = load_definition(config)
        self.detector_port = detector_port
        self.state = folder / "state"
        self.session = None
        with self._env():
            self.session = deploy.up(str(config), None, timeout=120)
        self.host = self.session.tango_host

    def _env(self) -> contextlib.AbstractContextManager:
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        return _environ(TANGOPIPE_STATE=str(self.state), PYTHONPATH=path)

    def proxy(self, name: str):
        return self.deploy.proxy(name, self.host, 10_000)

    def counters(self, name: str) -> dict[str, Any]:
        return json.loads(self.proxy(name).Counters)

    def down(self) -> None:
        if self.session is not None:
            with self._env():
                self.deploy.down(self.session)
            self.session = None

    def stop_worker(self, n: int) -> None:
        """Stop worker ``n``'s server (as Astor would) and wait until the master let it go."""
        spec = self.definition.worker_spec("main", n)
        pid = self.session.servers[spec.server]
        with contextlib.suppress(Exception):
            self.proxy(f"dserver/{spec.server}").command_inout("Kill")
        from devices.database import stop_process

        deadline = time.monotonic() + 10
        while self.deploy.pid_alive(pid) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)
        stop_process(pid)
        master = self.proxy(self.definition.master_name)
        want = self.definition.groups["main"]["workers"] - 1
        while master.Workers > want and time.monotonic() < deadline + 10:
            time.sleep(0.1)

    def start_worker(self, n: int) -> None:
        """Start worker ``n``'s server again and wait until the master counts it."""
        spec = self.definition.worker_spec("main", n)
        loopback = self.definition.bind.startswith("127.")
        with self._env():
            self.session.servers[spec.server] = self.deploy.start_server(spec.server, self.host, loopback)
        master = self.proxy(self.definition.master_name)
        want = self.definition.groups["main"]["workers"]
        deadline = time.monotonic() + 60
        while master.Workers < want:
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {n} did not connect to the master again within 60 s")
            time.sleep(0.1)

    def scan(self, frames: int, shape: tuple[int, int], rate_hz: float = 0.0, timeout: float = 300.0) -> dict:
        """One scan from a new detector process; sink frames/s (first to last result) and counters."""
        sink = self.proxy(self.definition.sink_name)
        master = self.proxy(self.definition.master_name)
        before = sink.FramesIn
        master_before = self.counters(self.definition.master_name)
        cpu_before = self.cpu_seconds()
        # the scan first: the detector's series (and its clock, when paced) starts once it is taken
        master.StartScan(json.dumps({"frames": frames}))
        try:
            detector = Detector(self.detector_port, frames, shape, rate_hz)
        except Exception:
            with contextlib.suppress(Exception):
                master.EndScan()
            raise
        try:
            first = last = None
            deadline = time.monotonic() + timeout
            seen = -1
            while True:
                count = sink.FramesIn - before
                now = time.perf_counter()
                if count != seen:  # the time a value was first seen is when it was counted (+-0.1 s cache)
                    seen = count
                    if first is None and count > 0:
                        first = (now, count)
                    last = (now, count)
                if count >= frames:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"scan: the sink has {count} of {frames} results after {timeout:.0f} s"
                    )
                time.sleep(0.05)
            cpu = {k: v - cpu_before.get(k, 0.0) for k, v in self.cpu_seconds().items()}
            acquired = master.EndScan()
            detector.finish()
            cpu["detector"] = detector.cpu_s
        finally:
            detector.stop()
        time.sleep(0.3)  # let the counters' 0.1 s cache refresh
        master_after = self.counters(self.definition.master_name)
        return {
            "frames_per_s": _rate(first, last),
            "cpu_ms_per_frame": {k: v * 1e3 / frames for k, v in cpu.items()},
            "acquired": acquired,
            "sink": self.counters(self.definition.sink_name),
            "sorter": self.counters(self.definition.sorter_name("main")),
            "master": master_after,
            "scan": {k: v - master_before.get(k, 0) for k, v in master_after.items() if isinstance(v, int)},
        }

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) of each running server so far, by device role."""
        out = {}
        for spec in self.definition.devices():
            pid = self.session.servers.get(spec.server, 0)
            try:
                times = psutil.Process(pid).cpu_times()
            except psutil.Error:
                continue
            out[spec.name.split("/", 1)[1]] = times.user + times.system
        return out

    def reconfigure(self, steps: list) -> None:
        for n in range(1, self.definition.groups["main"]["workers"] + 1):
            with contextlib.suppress(Exception):  # a stopped worker
                self.proxy(self.definition.worker_name("main", n)).Reconfigure(json.dumps(steps))


def _shm_note(result: dict) -> str:
    scan = result["scan"]
    if "ShmFrames" not in scan:
        return "frames over tcp (this master has no shared-memory path)"
    if scan["ShmFrames"]:
        return f"frames by shared memory: {scan['ShmFrames']}, over tcp: {scan.get('ShmFallbacks', 0)}"
    return "frames over tcp (none took the shared-memory path)"


def _cpu_note(result: dict) -> str:
    cpu = {k: v for k, v in result["cpu_ms_per_frame"].items() if v == v}  # measured ones
    parts = ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())
    return f"CPU ms/frame: {parts} (sum {sum(cpu.values()):.1f})"


def _check(result: dict, frames: int) -> str:
    """What went wrong in a scan, if anything (lost frames, drops, gaps)."""
    problems = []
    if result["acquired"] != frames:
        problems.append(f"acquired {result['acquired']}")
    if result["sorter"].get("MissingFrames"):
        problems.append(f"{result['sorter']['MissingFrames']} gaps")
    if result["master"].get("DroppedFrames"):
        problems.append(f"{result['master']['DroppedFrames']} dropped")
    return ("; PROBLEM: " + ", ".join(problems)) if problems else ""


def _median(results: list[dict], key: str = "frames_per_s") -> float:
    return statistics.median(r[key] for r in results)


def _runs(results: list[dict]) -> str:
    return "runs " + ", ".join(f"{r['frames_per_s']:.0f}" for r in results)


def _paired_ratio(results: list[dict], baselines: list[dict]) -> float:
    """Median over rounds of result / baseline measured next to it (robust to a drifting machine load)."""
    return statistics.median(
        r["frames_per_s"] / b["frames_per_s"] for r, b in zip(results, baselines, strict=True)
    )


def _cpu_sum(result: dict) -> float:
    return sum(v for v in result["cpu_ms_per_frame"].values() if v == v)


def run(quick: bool = False) -> list[dict]:
    rounds = 1 if quick else 3
    n_big = 60 if quick else 400
    n_busy2, n_busy1 = (16, 10) if quick else (100, 60)
    n_latency = 25 if quick else 500
    busy = [{"benchmarks.steps:busy": {"ms": BUSY_MS}}]
    switches = [] if quick else _schema_switches()  # a smoke run takes the default path only
    raw: dict[str, list[dict]] = {}  # raw chain runs, by the pipeline run they alternate with
    passes: dict[str, list[dict]] = {}
    latency: dict[str, dict] = {}
    one: list[dict] = []
    two: list[dict] = []

    def pass_through(dep: Deployment, kind: str) -> None:
        dep.scan(5, BIG)  # warm-up with big frames
        for _ in range(rounds):  # the raw chain and the pipeline in turn (the pipeline idles meanwhile)
            raw.setdefault(kind, []).append(raw_chain(n_big))
            passes.setdefault(kind, []).append(dep.scan(n_big, BIG))
        latency[kind] = dep.scan(n_latency, BIG, LATENCY_HZ, timeout=n_latency / LATENCY_HZ + 60)

    raw_50 = raw_chain(n_latency, LATENCY_HZ)
    with tempfile.TemporaryDirectory(prefix="tangopipe-bench-") as tmp:
        folder = Path(tmp)
        port = _free_port()
        first = "tcp" if switches else "default"
        plain = False if switches else None  # switch the fast path off where it can be
        dep = Deployment(folder / "a", write_config(_mkdir(folder / "a"), port, 2, busy, plain), port)
        try:
            dep.scan(4, SMALL)  # warm-up: connections, first allocations
            for r in range(rounds):  # 2 and 1 workers in turn, so both see the same machine
                if r:
                    dep.start_worker(2)
                two.append(dep.scan(n_busy2, SMALL))
                dep.stop_worker(2)
                one.append(dep.scan(n_busy1, SMALL))
            dep.reconfigure([PASS_STEP])
            pass_through(dep, first)
        finally:
            dep.down()
        if switches:
            dep = Deployment(
                folder / "b", write_config(_mkdir(folder / "b"), port, 1, [PASS_STEP], True), port
            )
            try:
                pass_through(dep, "shm")
            finally:
                dep.down()

    rows: list[dict] = []
    all_raw = [r for runs in raw.values() for r in runs]
    raw_rate = _median(all_raw)
    rows.append(
        _row(
            "raw pyzmq chain, 2048x2048 u16",
            raw_rate,
            "frames/s",
            note=(
                f"detector -> relay -> consumer processes, PUSH/PULL tcp, zero-copy; {n_big} frames; {_runs(all_raw)}"
            ),
        )
    )
    for kind, results in passes.items():
        took_shm = results[-1]["scan"].get("ShmFrames", 0) > 0
        label = "shared memory" if took_shm else "tcp"
        note = (
            f"detector -> master -> 1 worker (first_pixel) -> sorter -> sink; {n_big} frames; {_runs(results)}; "
            f"ratio: median of per-round ratios to the raw run beside it; {_shm_note(results[-1])}"
            f"{_check(results[-1], n_big)}"
        )
        rows.append(
            _row(
                f"tangopipe pass-through, {label}",
                _median(results),
                "frames/s",
                raw_rate,
                ">= 1.5x raw" if took_shm else ">= 0.8x raw",
                note,
                _paired_ratio(results, raw[kind]),
            )
        )
    if not switches:
        why = (
            "a smoke run takes the default path only"
            if quick
            else "the pipeline definition has no switch for it"
        )
        rows.append(
            _row(
                "tangopipe pass-through, other path",
                None,
                "frames/s",
                note=(f"not measured: {why} (the row above says which path the frames took)"),
            )
        )
    raw_cpu = statistics.median(_cpu_sum(r) for r in all_raw)
    rows.append(
        _row(
            "CPU per frame, raw chain",
            raw_cpu,
            "ms",
            note="median of the runs, all processes, user + system; last run: " + _cpu_note(all_raw[-1]),
        )
    )
    for results in passes.values():
        label = "shared memory" if results[-1]["scan"].get("ShmFrames", 0) else "tcp"
        rows.append(
            _row(
                f"CPU per frame, pass-through, {label}",
                statistics.median(_cpu_sum(r) for r in results),
                "ms",
                raw_cpu,
                "",
                "last run: " + _cpu_note(results[-1]),
            )
        )
    ideal = 1000.0 / BUSY_MS
    rows.append(
        _row(
            f"busy {BUSY_MS:g} ms/frame, 1 worker",
            _median(one),
            "frames/s",
            ideal,
            "",
            (
                f"256x256 frames, {n_busy1} frames; {_runs(one)}; baseline: 1000/{BUSY_MS:g} ms; "
                f"{_cpu_note(one[-1])}{_check(one[-1], n_busy1)}"
            ),
        )
    )
    rows.append(
        _row(
            f"busy {BUSY_MS:g} ms/frame, 2 workers",
            _median(two),
            "frames/s",
            _median(one),
            ">= 1.8x 1 worker",
            (
                f"{n_busy2} frames; {_runs(two)}; baseline: 1 worker; ratio: median of per-round ratios; "
                f"{_cpu_note(two[-1])}{_check(two[-1], n_busy2)}"
            ),
            _paired_ratio(two, one),
        )
    )
    for result in latency.values():
        label = "shared memory" if result["scan"].get("ShmFrames", 0) else "tcp"
        sink, sorter = result["sink"], result["sorter"]
        rows.append(
            _row(
                f"latency p50 at {LATENCY_HZ:g} Hz, {label}",
                sink["LatencyP50Ms"],
                "ms",
                raw_50["p50_ms"],
                "",
                f"{n_latency} frames, 1 worker (first_pixel); master acquisition -> sink; baseline: "
                f"detector -> consumer of the raw chain{_check(result, n_latency)}",
            )
        )
        rows.append(
            _row(
                f"latency p99 at {LATENCY_HZ:g} Hz, {label}",
                sink["LatencyP99Ms"],
                "ms",
                raw_50["p99_ms"],
                "",
                f"sorter p50/p99: {sorter['LatencyP50Ms']:.1f}/{sorter['LatencyP99Ms']:.1f} ms",
            )
        )
    return rows


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _row(
    name: str,
    value: float | None,
    unit: str,
    baseline: float | None = None,
    goal: str = "",
    note: str = "",
    ratio: float | None = None,
) -> dict:
    """One table row: value in unit, the baseline it is compared with, value / baseline, the goal."""
    if ratio is None and value is not None and baseline:
        ratio = value / baseline
    return {
        "benchmark": name,
        "value": round(value, 2) if value is not None else "-",
        "unit": unit,
        "baseline": round(baseline, 2) if baseline is not None else "-",
        "ratio": round(ratio, 2) if ratio is not None else "-",
        "goal": goal,
        "note": note,
    }


if __name__ == "__main__":
    from benchmarks.__main__ import format_table

    print(format_table(run(quick="--quick" in sys.argv)))
