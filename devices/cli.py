"""The ``tangopipe`` command: deploy, watch, drive and stop pipelines.

    tangopipe up config/demo.yaml     register + start servers (embedded DB if no TANGO_HOST)
    tangopipe status [--json]         every device's state, status, endpoint, counters; Lavue address
    tangopipe scan --frames 300       StartScan, frames from the source, EndScan (with progress)
    tangopipe scale CONFIG workers 4  start or stop workers (also while a scan runs)
    tangopipe down                    stop the servers, then the embedded database
    tangopipe demo                    up + one scan + summary + down
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import tango

from pipelines.definition import DefinitionError, PipelineDefinition, load_definition, schema_reference
from pipelines.sources import SOURCES, load_source

from . import deploy
from .database import DeploymentError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "demo.yaml"

#: modules adding more subcommands: each has ``add_commands(subparsers)``; their
#: functions take the parsed arguments and return an exit code, raising
#: DeploymentError or DefinitionError for the user's mistakes.
COMMAND_MODULES: list[str] = ["devices.starter", "devices.dsconfig_json", "devices.sardana_cli", "devices.gui",
                               "devices.reprocess_cli", "devices.security_cli"]
EXIT_CONFIG = 2


def _session_and_definition(config: str | None = None) -> tuple[deploy.Session, PipelineDefinition]:
    session = deploy.Session.load()
    tango_host = os.environ.get("TANGO_HOST")
    if session is None:
        if not (config and tango_host):
            raise DeploymentError("no pipeline is up: run 'tangopipe up CONFIG' first")
        session = deploy.Session(tango_host=tango_host, config=config)
    if config:
        session.config = config
    return session, session.definition()


# -- status --------------------------------------------------------------------------------
def collect_status(session: deploy.Session, definition: PipelineDefinition) -> dict[str, Any]:
    devices = [deploy.device_report(spec, session.tango_host) for spec in definition.devices()]
    for report in devices:
        report.pop("server", None)
    return {"devices": devices, "lavue": deploy.lavue_report(definition, session.tango_host)}


def format_status(status: dict[str, Any], tango_host: str) -> str:
    keys = ("FramesIn", "FramesOut", "QueueDepth", "InFlight", "InputRateHz", "OutputRateHz", "LatencyP99Ms",
            "BadMessages", "DroppedFrames")
    rows = [("device", "state", *keys, "status")]
    for d in status["devices"]:
        c = d["counters"]
        rows.append((d["name"], d["state"], *(str(c.get(k, "-")) for k in keys), d["status"][:70]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = [f"TANGO_HOST={tango_host}"]
    for r in rows:
        lines.append("  ".join(v.ljust(w) for v, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])
    lavue = status["lavue"]
    if lavue["address"]:
        topics = ", ".join(lavue["topics"]) or "(none yet: topics appear with the first images)"
        lines.append(f"Lavue: {lavue['address']}  topics: {topics}")
        first = lavue["topics"][0] if lavue["topics"] else "TOPIC"
        lines.append(f"  watch: lavue -s zmq -c {lavue['address']}/{first}")
    return "\n".join(lines)


# -- scan ----------------------------------------------------------------------------------
class Progress:
    """A one-line progress bar on stderr (plain lines when not a terminal)."""

    def __init__(self, total: int, label: str):
        self.total = max(total, 1)
        self.label = label
        self.tty = sys.stderr.isatty()
        self._last = 0.0

    def show(self, done: int, extra: str = "", final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last < (0.2 if self.tty else 2.0):
            return
        self._last = now
        frac = min(done / self.total, 1.0)
        bar = "#" * int(frac * 30)
        line = f"{self.label} [{bar:<30}] {done}/{self.total} {extra}"
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if final else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def source_scan_defaults(definition: PipelineDefinition) -> dict[str, Any]:
    """StartScan metadata the pipeline's source suggests for a scan started without it: its
    number of frames and, for a mapping source, ``scan_shape`` and ``snake`` (so the sink and
    the files can assemble maps). Empty for sources that suggest nothing."""
    module_name, _, cls_name = SOURCES[definition.source["kind"]].partition(":")
    if not hasattr(getattr(importlib.import_module(module_name), cls_name), "scan_defaults"):
        return {}
    try:
        return dict(load_source(definition.source).scan_defaults())
    except (ValueError, TypeError, OSError) as exc:
        raise DefinitionError(f"{definition.path}: master.source: {exc}") from None


def scan_request(
    definition: PipelineDefinition, frames: int | None, meta_json: str | None, fallback_frames: int
) -> tuple[int, dict[str, Any]]:
    """Frames and StartScan metadata of a scan: what the user gave, else what the source suggests."""
    meta = source_scan_defaults(definition)
    suggested = meta.pop("frames", fallback_frames)
    if meta_json:
        try:
            given = json.loads(meta_json)
        except json.JSONDecodeError as exc:
            raise DeploymentError(f"--meta {meta_json!r} is not valid JSON: {exc}") from None
        if not isinstance(given, dict):
            raise DeploymentError(f"--meta {meta_json!r} must be a JSON object (a mapping of names to values)")
        meta.update(given)
    return (suggested if frames is None else frames), meta


def run_scan(
    session: deploy.Session, definition: PipelineDefinition, frames: int, meta: dict[str, Any] | None = None,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """StartScan, wait for ``frames`` frames, EndScan, wait until every writer closed the file."""
    host = session.tango_host
    master = deploy.proxy(definition.master_name, host)
    writers = {name: deploy.proxy(definition.writer_name(name), host) for name in definition.writers}
    before = {name: (w.ScansDone, w.FramesWritten) for name, w in writers.items()}
    scan_meta = dict(meta or {}, frames=frames)
    scan_id = master.StartScan(json.dumps(scan_meta))
    progress = Progress(frames, f"scan {scan_id}")
    deadline = time.monotonic() + timeout
    try:
        while True:
            acquired = master.ScanFrames
            written = sum(w.FramesWritten - before[n][1] for n, w in writers.items()) // max(len(writers), 1)
            progress.show(written if writers else acquired, f"acquired {acquired}")
            if acquired >= frames or not master.Acquiring:
                break
            if time.monotonic() > deadline:
                raise DeploymentError(f"scan {scan_id}: only {acquired} of {frames} frames after {timeout:.0f} s")
            time.sleep(0.1)
    finally:
        acquired = master.EndScan()
    while writers:
        done = all(w.ScansDone > before[n][0] for n, w in writers.items())
        written = sum(w.FramesWritten - before[n][1] for n, w in writers.items()) // len(writers)
        progress.show(written, f"acquired {acquired}", final=done)
        if done:
            break
        if time.monotonic() > deadline:
            raise DeploymentError(f"scan {scan_id}: writers did not close the file within {timeout:.0f} s")
        time.sleep(0.1)
    if not writers:
        progress.show(acquired, "", final=True)
    files = {name: w.LastFile for name, w in writers.items()}
    return {
        "scan": scan_id,
        "acquired": acquired,
        "written": {name: w.FramesWritten - before[name][1] for name, w in writers.items()},
        "files": files,
    }


# -- commands ------------------------------------------------------------------------------
def cmd_up(args: argparse.Namespace) -> int:
    config = args.config
    print(f"tangopipe: starting pipeline {config}", file=sys.stderr)
    session = deploy.up(config, os.environ.get("TANGO_HOST"), timeout=args.timeout)
    definition = load_definition(config)
    print(format_status(collect_status(session, definition), session.tango_host))
    if session.db_pid:
        print(f"embedded Tango database: TANGO_HOST={session.tango_host} (state in {deploy.state_folder()})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    session, definition = _session_and_definition(args.config)
    status = collect_status(session, definition)
    if args.json:
        print(json.dumps(status, indent=1))
    else:
        print(format_status(status, session.tango_host))
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    session, definition = _session_and_definition(args.config)
    frames, meta = scan_request(definition, args.frames, args.meta, fallback_frames=100)
    result = run_scan(session, definition, frames, meta)
    print(json.dumps(result, indent=1))
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    session, definition = _session_and_definition(args.config)
    if args.what != "workers":
        raise DeploymentError(f"can only scale 'workers', not {args.what!r}")
    group = args.group or next(iter(definition.groups))
    result = deploy.scale(session, group, args.count)
    print(json.dumps({"group": group, "workers": args.count, **result}, indent=1))
    return 0


def cmd_restart(args: argparse.Namespace) -> int:
    session, _ = _session_and_definition(args.config)
    started = deploy.restart(session, args.servers or None, timeout=args.timeout)
    print("restarted: " + (", ".join(started) if started else "nothing (every server is running)"))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    stopped = deploy.down()
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def summarise(session: deploy.Session, definition: PipelineDefinition, result: dict[str, Any]) -> dict[str, Any]:
    status = collect_status(session, definition)
    by_name = {d["name"]: d for d in status["devices"]}
    sent = result["acquired"]
    sorters = [by_name[definition.sorter_name(g)]["counters"] for g in definition.groups]
    processed = min((s.get("FramesOut", 0) for s in sorters), default=0)
    written = min(result["written"].values(), default=processed)
    return {
        "frames": {"sent": sent, "processed": processed, "written": written, "lost": sent - written},
        "scan": result["scan"],
        "file": next(iter(result["files"].values()), ""),
        "files": result["files"],
        "lavue": status["lavue"],
        "devices": {d["name"]: {"state": d["state"], **d["counters"]} for d in status["devices"]},
    }


def cmd_demo(args: argparse.Namespace) -> int:
    config = args.config
    started = time.monotonic()
    print(f"tangopipe demo: pipeline {config}", file=sys.stderr)
    frames, meta = scan_request(load_definition(config), args.frames, args.meta, fallback_frames=300)
    session = deploy.up(config, os.environ.get("TANGO_HOST"), timeout=args.timeout)
    try:
        definition = load_definition(config)
        print(format_status(collect_status(session, definition), session.tango_host), file=sys.stderr)
        result = run_scan(session, definition, frames, meta)
        summary = summarise(session, definition, result)
    finally:
        deploy.down(session)
    summary["seconds"] = round(time.monotonic() - started, 1)
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=1))
    f = summary["frames"]
    print(
        f"demo done in {summary['seconds']} s: sent {f['sent']}, processed {f['processed']}, "
        f"written {f['written']}, lost {f['lost']}\nfile: {summary['file']}"
    )
    return 0 if f["lost"] == 0 else 1


def cmd_config_help(args: argparse.Namespace) -> int:
    print(schema_reference())
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    definition = load_definition(args.config)
    for warning in definition.security_warnings():
        print(f"tangopipe: warning: {warning}", file=sys.stderr)
    for spec in definition.devices():
        print(f"{spec.name:<28} {spec.cls:<16} {spec.server}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tangopipe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("up", help="register a pipeline, start its servers, wait until ready")
    p.add_argument("config", help="pipeline definition (YAML), e.g. config/demo.yaml")
    p.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for every device (default 90)")
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("status", help="state, status, endpoints and counters of every device")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--config", help="pipeline definition (default: the one that is up)")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("scan", help="StartScan, N frames, EndScan, with progress")
    p.add_argument("--frames", type=int, help="frames to acquire (default: the source's scan, else 100)")
    p.add_argument("--meta", help="extra scan metadata, JSON (wins over the source's scan_shape and snake)")
    p.add_argument("--config", help="pipeline definition (default: the one that is up)")
    p.set_defaults(func=cmd_scan)
    p = sub.add_parser("scale", help="start or stop workers to reach N (also during a scan)")
    p.add_argument("config", help="the pipeline definition that is up")
    p.add_argument("what", choices=["workers"], help="what to scale")
    p.add_argument("count", type=int, help="workers wanted")
    p.add_argument("--group", help="worker group (default: the first)")
    p.set_defaults(func=cmd_scale)
    p = sub.add_parser("restart", help="start again servers of the pipeline that are not running (after a crash)")
    p.add_argument("servers", nargs="*", help="servers to start, e.g. PipelineSorter/demo (default: every stopped one)")
    p.add_argument("--config", help="pipeline definition (default: the one that is up)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait until ready (default 60)")
    p.set_defaults(func=cmd_restart)
    p = sub.add_parser("down", help="stop the servers and the embedded database")
    p.set_defaults(func=cmd_down)
    p = sub.add_parser("demo", help="up + one scan + summary + down")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="pipeline definition (default config/demo.yaml)")
    p.add_argument("--frames", type=int, help="frames in the scan (default: the source's scan, else 300)")
    p.add_argument("--meta", help="extra scan metadata, JSON (wins over the source's scan_shape and snake)")
    p.add_argument("--summary", help="write the summary JSON to this file")
    p.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for every device (default 90)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("check", help="validate a pipeline definition and list its devices")
    p.add_argument("config")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("config-help", help="the pipeline definition reference")
    p.set_defaults(func=cmd_config_help)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DefinitionError as exc:
        print(f"tangopipe: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except DeploymentError as exc:
        print(f"tangopipe: {exc}", file=sys.stderr)
        return 1
    except tango.DevFailed as exc:
        print(f"tangopipe: Tango error: {exc.args[0].desc.strip() if exc.args else exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tangopipe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
