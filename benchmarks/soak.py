"""Soak: run a pipeline for a long time and watch every process's memory, the rates and the losses.

A leak of a few bytes per frame, a queue that is not bounded after all, a counter
that drifts: none of them shows in a one-minute test, all of them show after half
an hour. The soak deploys a pipeline as ``tangopipe up`` does (an embedded
pytango-db in its own state folder, or the database of ``TANGO_HOST``; real server
processes; ``config/demo.yaml`` unless ``--config``), runs scans back to back for
the given time and every ``--every`` seconds prints one row: elapsed time, the
resident memory (VmRSS) of every server process and of the embedded database,
input and output rates, frames dropped by the overflow policy and frames missing
(gaps that no policy explains). Each scan's files are deleted once the scan is
counted, unless ``--keep-files``, so a long run does not fill the disk. At the end
it prints a summary (each process's RSS in the first and in the last quarter of the
run, its peak, total frames, losses) and saves it as JSON, with every sample as CSV beside it.

    python -m benchmarks.soak --minutes 30
    python -m benchmarks.soak --minutes 5 --config config/xrd.yaml --out soak.json
    python -m benchmarks.soak --minutes 1 --step-ms 400 --rate-hz 50 --policy drop_oldest   # overload

Exit code 0 when nothing went missing and every process lived to the end, else 1.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks.__main__ import machine

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "config" / "demo.yaml"
PACED_STEP = "benchmarks.soak:paced"
FINISH_S = 120.0  # the scan in hand at the end gets this long to be written


# -- a step of known duration --------------------------------------------------------------
def paced(frame: np.ndarray, meta: dict, *, ms: float = 200.0) -> dict[str, Any]:
    """Take ``ms`` milliseconds of wall time per frame (sleeping, so it costs no CPU).

    Sleeping rather than computing makes a worker's rate known whatever else the
    machine runs, so a source can be set to a known multiple of it (overload).
    The results name the frame (its index and a checksum of a sparse grid of
    pixels), so a test can tell every result belongs to its own frame.
    """
    if isinstance(ms, bool) or not isinstance(ms, int | float) or not 0 <= ms <= 60_000:
        raise ValueError(f"paced: parameter ms must be a number of milliseconds in [0, 60000], got {ms!r}")
    time.sleep(ms / 1000.0)
    return {"frame_index": int(meta.get("index", -1)), "checksum": frame_checksum(frame)}


def frame_checksum(frame: np.ndarray) -> int:
    """Sum of every 16th pixel of every 16th row: cheap, and different for every simulated frame."""
    return int(np.asarray(frame)[::16, ::16].sum(dtype=np.int64))


# -- memory of a process -------------------------------------------------------------------
def rss_mb(pid: int) -> float | None:
    """Resident memory of ``pid`` in MiB (VmRSS of /proc/PID/status); None if it is gone."""
    return memory_mb(pid)[0]


def memory_mb(pid: int) -> tuple[float | None, float | None]:
    """VmRSS and its shared-memory part RssShmem of ``pid`` in MiB; (None, None) if it is gone.

    RssShmem is what the process touched of shared memory (the master's frame ring): it is
    counted in every process that mapped it, and grows until each slot was read once."""
    values: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key = line.split(":", 1)[0]
                if key in ("VmRSS", "RssShmem"):
                    values[key] = int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None, None
    return values.get("VmRSS"), values.get("RssShmem")  # a zombie has neither


def processes(session: Any, definition: Any) -> dict[str, int]:
    """Short name -> PID of every process of a deployment: its servers and the embedded database.

    Servers are named by their device without the pipeline's domain (``master/1``,
    ``worker/main-1``, ``sorter/main``, ...), the database ``db``."""
    names = {spec.server: spec.name.split("/", 1)[1] for spec in definition.devices()}
    out = {names.get(server, server): pid for server, pid in session.servers.items()}
    if session.db_pid:
        out["db"] = session.db_pid
    return out


# -- the pipeline to soak ------------------------------------------------------------------
def soak_config(
    config: Path,
    folder: Path,
    *,
    rate_hz: float | None = None,
    policy: str | None = None,
    step_ms: float | None = None,
) -> Path:
    """A copy of ``config`` in ``folder``: files in ``folder/data``, Lavue on a free port,
    and the overrides asked for (simulator rate, overflow policy, a paced step in every group).
    The steps' file parameters (a PONI file, a mask) are made absolute, as seen from ``config``."""
    from pipelines.definition import load_definition

    data = yaml.safe_load(config.read_text())
    resolved = load_definition(config).groups
    for name, group in data["groups"].items():
        group["steps"] = resolved[name]["steps"]
    if isinstance(data.get("sink"), dict):
        data["sink"].setdefault("lavue", {})["port"] = 0
    for name, writer in (data.get("writers") or {}).items():
        writer["directory"] = str(folder / "data" / name)
    for bridge in (data.get("lavue_bridges") or {}).values():
        bridge["port"] = 0
    master = data.setdefault("master", {})
    if rate_hz is not None:
        master.setdefault("source", {"kind": "simulator"})["rate_hz"] = rate_hz
    if policy is not None:
        master["overflow_policy"] = policy
    if step_ms is not None:
        for group in data["groups"].values():
            group["steps"] = [{PACED_STEP: {"ms": step_ms}}]
    path = folder / f"soak-{config.stem}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@dataclass
class Totals:
    """Counters of the whole run, read from the devices (cumulative since they started)."""

    sent: int = 0
    processed: int = 0
    written: int = 0
    dropped: int = 0
    gaps: int = 0

    @property
    def missing(self) -> int:
        """Indices the sorter gave up on that no policy dropped: lost frames."""
        return max(self.gaps - self.dropped, 0)


@dataclass
class Sample:
    t: float
    rss: dict[str, float | None]
    totals: Totals
    scans: int
    shared: dict[str, float | None] = field(default_factory=dict)  # RssShmem, part of rss


@dataclass
class ScanRecord:
    scan: str
    acquired: int
    processed: int
    written: int
    dropped: int
    missing: int
    seconds: float


@dataclass
class Soak:
    """Scans back to back on a deployed pipeline, with memory and counters sampled."""

    session: Any
    definition: Any
    scan_frames: int
    scan_meta: dict[str, Any]
    keep_files: bool = False
    samples: list[Sample] = field(default_factory=list)
    scans: list[ScanRecord] = field(default_factory=list)
    died: dict[str, float] = field(default_factory=dict)  # process -> seconds into the run
    problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        from devices import deploy

        host = self.session.tango_host
        d = self.definition
        self.pids = processes(self.session, d)
        self.master = deploy.proxy(d.master_name, host, 10_000)
        self.sorters = [deploy.proxy(d.sorter_name(g), host, 10_000) for g in d.groups]
        self.writers = {name: deploy.proxy(d.writer_name(name), host, 10_000) for name in d.writers}
        self._scan: dict[str, Any] | None = None

    # -- counters ------------------------------------------------------------------------
    def totals(self) -> Totals:
        # downstream first, so that a frame counted downstream is counted upstream too
        written = [w.FramesWritten for w in self.writers.values()]
        sorters = [json.loads(s.Counters) for s in self.sorters]
        master = json.loads(self.master.Counters)
        return Totals(
            sent=int(master.get("FramesIn", 0)),
            processed=min((int(s.get("FramesOut", 0)) for s in sorters), default=0),
            written=min(written, default=0),
            dropped=int(master.get("DroppedFrames", 0)),
            gaps=max((int(s.get("MissingFrames", 0)) for s in sorters), default=0),
        )

    def sample(self, t: float) -> Sample:
        memory = {name: memory_mb(pid) for name, pid in self.pids.items()}
        rss = {name: m[0] for name, m in memory.items()}
        for name, value in rss.items():
            if value is None and name not in self.died:
                self.died[name] = t
        s = Sample(t, rss, self.totals(), len(self.scans), {name: m[1] for name, m in memory.items()})
        self.samples.append(s)
        return s

    # -- scans ---------------------------------------------------------------------------
    def drive(self, stop: bool = False) -> bool:
        """Advance the scan in hand by one step (start, end, count and clean up); True while
        a scan is open or being written. With ``stop``, end the scan in hand and start no other."""
        scan = self._scan
        if scan is None:
            if stop:
                return False
            before = self.totals()
            writers = {n: w.ScansDone for n, w in self.writers.items()}
            scan_id = self.master.StartScan(json.dumps(dict(self.scan_meta, frames=self.scan_frames)))
            self._scan = {"id": scan_id, "before": before, "writers": writers, "t0": time.monotonic(), "acquired": None}
            return True
        if scan["acquired"] is None:
            if self.master.Acquiring and not stop:
                return True
            scan["acquired"] = int(self.master.EndScan())
            scan["ended"] = time.monotonic()
        if any(w.ScansDone <= scan["writers"][n] for n, w in self.writers.items()):
            return True  # the files are not closed yet
        before, after = scan["before"], self.totals()
        passed_on = after.processed + after.gaps - before.processed - before.gaps
        if not self.writers and passed_on < scan["acquired"] and time.monotonic() - scan["ended"] < 60:
            return True  # no writer to wait for: wait until the sorters passed on every index
        dropped = after.dropped - before.dropped
        self.scans.append(
            ScanRecord(
                scan=str(scan["id"]),
                acquired=scan["acquired"],
                processed=after.processed - before.processed,
                written=after.written - before.written,
                dropped=dropped,
                missing=max(after.gaps - before.gaps - dropped, 0),
                seconds=round(time.monotonic() - scan["t0"], 2),
            )
        )
        if not self.keep_files:
            self._remove_files()
        self._scan = None
        return False

    def _remove_files(self) -> None:
        for writer in self.definition.writers.values():
            folder = Path(writer["directory"])
            if folder.is_dir():
                for path in folder.iterdir():
                    if path.is_dir():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)


# -- report --------------------------------------------------------------------------------
def _fmt(value: float | None, width: int = 0, digits: int = 0) -> str:
    return ("-" if value is None else f"{value:.{digits}f}").rjust(width)


def table_header(names: list[str]) -> str:
    cols = ["elapsed", "done", "scans", *names, "in Hz", "out Hz", "sent", "processed", "dropped", "missing"]
    widths = _widths(names)
    return (
        "columns: RSS of each process in MB; rates over the row's interval; frames since the start\n"
        + "  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))
    )


def _widths(names: list[str]) -> list[int]:
    return [7, 5, 5, *(max(len(n), 6) for n in names), 6, 6, 9, 9, 7, 7]


def table_row(sample: Sample, previous: Sample | None, total_s: float, names: list[str]) -> str:
    widths = _widths(names)
    dt = sample.t - previous.t if previous is not None else 0.0
    if previous is not None and dt > 0:
        in_hz = (sample.totals.sent - previous.totals.sent) / dt
        out_hz = (sample.totals.processed - previous.totals.processed) / dt
    else:
        in_hz = out_hz = None
    minutes, seconds = divmod(int(sample.t), 60)
    cells = [
        f"{minutes}:{seconds:02d}",
        f"{min(sample.t / total_s, 1.0) * 100:.0f}%" if total_s > 0 else "-",
        str(sample.scans),
        *(_fmt(sample.rss.get(n)) for n in names),
        _fmt(in_hz, digits=1),
        _fmt(out_hz, digits=1),
        str(sample.totals.sent),
        str(sample.totals.processed),
        str(sample.totals.dropped),
        str(sample.totals.missing),
    ]
    return "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))


def summarise(soak: Soak, seconds: float) -> dict[str, Any]:
    """Frames, losses, and each process's RSS in the first and in the last quarter of the run.

    The medians are compared: a process whose memory plateaus (once its buffers filled,
    in the first seconds) shows no growth, whatever its peaks (a queue filling for a
    moment); one that leaks shifts its whole last quarter up. The peak is reported too."""
    samples = soak.samples
    quarter = max(seconds / 4.0, 1e-9)
    rss: dict[str, dict[str, float | None]] = {}
    for name in soak.pids:
        values = [(s.t, s.rss[name]) for s in samples if s.rss.get(name) is not None]
        first = [v for t, v in values if t <= quarter]
        last = [v for t, v in values if t >= seconds - quarter]
        entry: dict[str, float | None] = {
            "first_quarter_mb": round(statistics.median(first), 1) if first else None,
            "last_quarter_mb": round(statistics.median(last), 1) if last else None,
            "max_mb": round(max(v for _, v in values), 1) if values else None,
            "shared_last_mb": next((round(s.shared[name], 1) for s in reversed(samples)
                                    if s.shared.get(name) is not None), None),
        }
        if first and last:
            growth = statistics.median(last) - statistics.median(first)
            entry["growth_mb"] = round(growth, 1)
            entry["growth_pct"] = round(100.0 * growth / statistics.median(first), 1)
            # the same without shared memory, which is bounded by construction (the ring's size)
            private = [(s.t, s.rss[name] - (s.shared.get(name) or 0.0)) for s in samples if s.rss.get(name) is not None]
            first_p = [v for t, v in private if t <= quarter]
            last_p = [v for t, v in private if t >= seconds - quarter]
            entry["private_growth_mb"] = round(statistics.median(last_p) - statistics.median(first_p), 1)
        rss[name] = entry
    final = samples[-1].totals if samples else Totals()
    first_t = samples[0].totals if samples else Totals()
    sent = final.sent - first_t.sent
    processed = final.processed - first_t.processed
    return {
        "seconds": round(seconds, 1),
        "scans": len(soak.scans),
        "frames": {
            "sent": sent,
            "processed": processed,
            "written": final.written - first_t.written,
            "dropped": final.dropped - first_t.dropped,
            "missing": final.missing - first_t.missing,
        },
        "rates_hz": {
            "input": round(sent / seconds, 2) if seconds > 0 else 0.0,
            "output": round(processed / seconds, 2) if seconds > 0 else 0.0,
        },
        "rss": rss,
        "processes_died": soak.died,
        "problems": soak.problems,
        "scan_records": [vars(r) for r in soak.scans],
    }


def format_summary(summary: dict[str, Any]) -> str:
    f = summary["frames"]
    lines = [
        f"soak: {summary['seconds']:.0f} s, {summary['scans']} scans; frames sent {f['sent']}, processed "
        f"{f['processed']}, written {f['written']}, dropped by policy {f['dropped']}, missing {f['missing']}; "
        f"mean rates in {summary['rates_hz']['input']} Hz, out {summary['rates_hz']['output']} Hz",
        "RSS in MB: median in the first quarter, in the last quarter, growth, growth without shared memory, "
        "peak, shared memory (the frame ring) at the end",
    ]
    for name, r in summary["rss"].items():
        growth = f"{r['growth_mb']:+.1f} ({r['growth_pct']:+.1f}%)" if "growth_mb" in r else "-"
        private = f"{r['private_growth_mb']:+.1f}" if "private_growth_mb" in r else "-"
        lines.append(f"  {name:<16} {_fmt(r['first_quarter_mb'], 8, 1)} {_fmt(r['last_quarter_mb'], 8, 1)} "
                     f"{growth:>18} {private:>8} {_fmt(r['max_mb'], 8, 1)} {_fmt(r['shared_last_mb'], 8, 1)}")
    if summary["processes_died"]:
        died = ", ".join(f"{n} at {t:.0f} s" for n, t in summary["processes_died"].items())
        lines.append(f"processes that died: {died}")
    lines += [f"problem: {p}" for p in summary["problems"]]
    return "\n".join(lines)


def _csv(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def write_csv(path: Path, soak: Soak) -> None:
    names = list(soak.pids)
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["t_s", *(f"rss_mb_{n}" for n in names), *(f"shared_mb_{n}" for n in names), "scans",
                         "sent", "processed", "written", "dropped", "missing"])
        for s in soak.samples:
            rss = [_csv(s.rss.get(n)) for n in names]
            shared = [_csv(s.shared.get(n)) for n in names]
            t = s.totals
            writer.writerow([f"{s.t:.1f}", *rss, *shared, s.scans, t.sent, t.processed, t.written, t.dropped,
                             t.missing])


# -- the run -------------------------------------------------------------------------------
def run(
    config: Path,
    minutes: float,
    *,
    every_s: float = 10.0,
    sample_s: float = 1.0,
    scan_frames: int | None = None,
    workdir: Path,
    keep_files: bool = False,
    out: Path | None = None,
    print_fn: Any = print,
    command: str = "",
) -> dict[str, Any]:
    """Deploy ``config``, soak it for ``minutes``, take it down; return the summary."""
    from devices import deploy
    from devices.cli import scan_request
    from pipelines.definition import load_definition

    os.environ["TANGOPIPE_STATE"] = str(workdir / "state")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    definition = load_definition(config)
    frames, meta = scan_request(definition, scan_frames, None, fallback_frames=300)
    print_fn(f"soak: {config} for {minutes:g} min; scans of {frames} frames; state and files in {workdir}")
    session = deploy.up(str(config), os.environ.get("TANGO_HOST"), timeout=120)
    total_s = minutes * 60.0
    started = time.monotonic()
    try:
        soak = Soak(session, definition, frames, meta, keep_files=keep_files)
        names = list(soak.pids)
        print_fn(f"soak: pipeline up (TANGO_HOST={session.tango_host}); processes: "
                 + ", ".join(f"{n}={p}" for n, p in soak.pids.items()))
        print_fn(table_header(names))
        printed: Sample | None = soak.sample(0.0)
        print_fn(table_row(printed, None, total_s, names))
        next_sample, next_print = 0.0, every_s
        try:  # Ctrl-C ends the run early, with its summary
            while True:
                elapsed = time.monotonic() - started
                over = elapsed >= total_s
                busy = soak.drive(stop=over)
                if elapsed >= next_sample:
                    next_sample = elapsed + sample_s
                    sample = soak.sample(elapsed)
                    if elapsed >= next_print:
                        next_print += every_s
                        print_fn(table_row(sample, printed, total_s, names))
                        printed = sample
                if over and not busy:
                    break
                if elapsed > total_s + FINISH_S:
                    soak.problems.append(f"the last scan did not finish within {FINISH_S:.0f} s of the end")
                    print_fn(f"soak: stopping: {soak.problems[-1]}")
                    break
                if soak.died:
                    print_fn(f"soak: stopping: process(es) gone: {', '.join(soak.died)}")
                    break
                time.sleep(0.2)
        except KeyboardInterrupt:
            soak.problems.append("interrupted (Ctrl-C) before the end")
            print_fn(f"soak: {soak.problems[-1]}")
        seconds = time.monotonic() - started
        last = soak.sample(seconds)
        print_fn(table_row(last, printed, total_s, names))
    finally:
        deploy.down(session)
    summary = summarise(soak, seconds)
    summary.update(config=str(config), minutes=minutes, scan_frames=frames, tango_host=session.tango_host,
                   machine=machine(), command=command)
    print_fn(format_summary(summary))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        csv_path = out.with_suffix(".csv")
        write_csv(csv_path, soak)
        summary["samples_csv"] = str(csv_path)
        out.write_text(json.dumps(summary, indent=1))
        print_fn(f"soak: summary in {out}, samples in {csv_path}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="how long to run (default 30)")
    parser.add_argument("--config", type=Path, default=DEMO, help="pipeline definition (default config/demo.yaml)")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between table rows (default 10)")
    parser.add_argument("--sample", type=float, default=1.0, help="seconds between RSS samples (default 1)")
    parser.add_argument("--scan-frames", type=int, help="frames per scan (default: the source's, else 300)")
    parser.add_argument("--rate-hz", type=float, help="the simulator's rate (default: the definition's)")
    parser.add_argument("--policy", choices=["block", "drop_newest", "drop_oldest"], help="the master's overflow policy")
    parser.add_argument("--step-ms", type=float, help="replace every group's steps by a step of this many ms a frame")
    parser.add_argument("--out", type=Path, default=Path("data/soak-result.json"),
                        help="summary JSON (default data/soak-result.json); the samples go beside it as .csv")
    parser.add_argument("--workdir", type=Path, help="state folder and files (default: a temporary folder)")
    parser.add_argument("--keep-files", action="store_true", help="keep the scan files and the server logs")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.every <= 0 or args.sample <= 0:
        parser.error("--minutes, --every and --sample must be > 0")
    temporary = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="tangopipe-soak-")) if temporary else args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config = soak_config(args.config.resolve(), workdir, rate_hz=args.rate_hz, policy=args.policy,
                         step_ms=args.step_ms)
    ok = False
    try:
        summary = run(config, args.minutes, every_s=args.every, sample_s=args.sample, scan_frames=args.scan_frames,
                      workdir=workdir, keep_files=args.keep_files, out=args.out.resolve(),
                      print_fn=lambda text: print(text, flush=True),
                      command=" ".join(["python -m benchmarks.soak", *(argv if argv is not None else sys.argv[1:])]))
        ok = summary["frames"]["missing"] == 0 and not summary["processes_died"] and not summary["problems"]
    finally:
        if temporary and ok and not args.keep_files:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not ok:
            print(f"soak: logs kept in {workdir / 'state' / 'logs'}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
