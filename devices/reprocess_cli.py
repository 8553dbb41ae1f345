"""``tangopipe reprocess``: run a pipeline definition on files, with the online code.

    tangopipe reprocess config/demo.yaml data/demo_raw_scan00012.h5 ... [--output DIR] [--groups main,xrf]

The definition is deployed as it is (same steps, same devices), except that its
master plays the files (source ``files``: HDF5/NeXus with Eiger master files,
TIFF series), its writers write into ``--output`` and its ports are free ones; it
runs one scan per input file, then stops. Each scan keeps the input's scan id and
metadata (sample, motors, grid...) when the input is a tangopipe file, and its
results get a new processing version: the input's highest version plus the
worker's (``processing_version_base`` in StartScan's metadata; the NeXus writer
records it, and the input it came from, in ``/entry/process``). Inputs are only
read; writers never overwrite a file.

The reprocessing pipeline is named ``<name>-re`` and has its own state folder
(``$TANGOPIPE_STATE/reprocess``), so it runs beside the online pipeline, in the
embedded database or in the facility's (TANGO_HOST).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from pipelines.definition import DefinitionError, PipelineDefinition, load_definition

from . import deploy
from .database import DeploymentError

#: metadata of an input scan that must not follow it: where its files went, what the
#: pipeline adds itself, how its frames were paced (the file source carries the positions)
DROPPED_META = (
    "scan_dir",
    "scan_file",
    "processing",
    "source",
    "frames",
    "file",
    "processing_version_base",
    "point_trigger",
    "rate_hz",
    "reprocessed_from",
    "original_processing_json",
)


def reprocess_definition(
    data: dict[str, Any],
    inputs: list[str],
    output: str,
    *,
    groups: list[str] | None = None,
    rate_hz: float = 0.0,
    dataset: str = "",
    name: str = "",
) -> dict[str, Any]:
    """The definition ``data`` turned into its reprocessing twin (see the module docstring)."""
    out = json.loads(json.dumps(data))  # a deep copy of plain YAML data
    known = list((out.get("groups") or {}).keys())
    keep = groups or known
    unknown = [g for g in keep if g not in known]
    if unknown:
        raise DefinitionError(
            f"--groups: no worker group {', '.join(unknown)}; groups are {', '.join(known)}"
        )
    out["name"] = name or f"{out.get('name', 'pipeline')}-re"[:31]
    master = out.setdefault("master", {}) or {}
    out["master"] = master
    source: dict[str, Any] = {
        "kind": "files",
        "files": [str(Path(p).resolve()) for p in inputs],
        "rate_hz": rate_hz,
    }
    if dataset:
        source["dataset"] = dataset
    master["source"] = source
    master.pop("port", None)
    out["groups"] = {g: v for g, v in out["groups"].items() if g in keep}
    sink = out.get("sink")
    if sink is not None:
        if sink.get("group") not in keep:
            out.pop("sink")
        else:
            sink.setdefault("lavue", {})
            sink["lavue"] = dict(sink["lavue"] or {}, port=0)
            sink["query_port"] = 0
    bridges = out.get("lavue_bridges") or {}
    out["lavue_bridges"] = {n: dict(b, port=0) for n, b in bridges.items() if b.get("group") in keep}
    if not out["lavue_bridges"]:
        out.pop("lavue_bridges")
    writers = out.get("writers") or {}
    out["writers"] = {
        n: dict(w, directory=str(Path(output).resolve()))
        for n, w in writers.items()
        if w.get("group") in keep
    }
    return out


def input_scan(path: str, dataset: str = "") -> dict[str, Any]:
    """What StartScan gets for one input: its scan id and metadata, frames, version base."""
    from pipelines.files import open_h5
    from pipelines.sources.files import count_frames

    meta: dict[str, Any] = {
        "file": str(Path(path).resolve()),
        "frames": count_frames(path, dataset),
        "reprocessed_from": str(Path(path).resolve()),
    }
    if Path(path).suffix.lower() not in (".h5", ".hdf5", ".nxs", ".hdf", ".nx5"):
        return meta
    with open_h5(path) as f:
        entry = f.get("entry")
        if entry is None or "scan/metadata_json" not in entry:
            return meta  # not a tangopipe file (an Eiger master file...)
        original = json.loads(entry["scan/metadata_json"][()])
        meta.update({k: v for k, v in original.items() if k not in DROPPED_META})
        scan_id = entry["scan_id"][()]
        scan_id = scan_id.decode() if isinstance(scan_id, bytes) else str(scan_id)
        meta["scan_id"] = int(scan_id) if scan_id.lstrip("-").isdigit() else scan_id
        versions = entry["process/processing_version"][()] if "process/processing_version" in entry else []
        meta["processing_version_base"] = int(max(versions, default=0))
        if "process/configuration_json" in entry:
            meta["original_processing_json"] = entry["process/configuration_json"][()].decode()
    return meta


def cmd_reprocess(args: argparse.Namespace) -> int:
    from .cli import run_scan

    missing = [p for p in args.files if not Path(p).exists() and not any(c in p for c in "*?[")]
    if missing:
        raise DeploymentError(f"no such input: {', '.join(missing)}")
    definition = load_definition(args.config)  # checked as it is first
    with open(args.config, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    groups = [g.strip() for g in args.groups.split(",") if g.strip()] if args.groups else None
    twin = reprocess_definition(
        data,
        args.files,
        args.output,
        groups=groups,
        rate_hz=args.rate,
        dataset=args.dataset or "",
        name=args.name or "",
    )
    state = deploy.state_folder() / "reprocess"
    state.mkdir(parents=True, exist_ok=True)
    config = state / f"{twin['name']}.yaml"
    config.write_text(yaml.safe_dump(twin, sort_keys=False))
    definition = PipelineDefinition(twin, str(config))
    scans = [input_scan(p, args.dataset or "") for p in args.files]
    seen: set[Any] = set()
    for n, meta in enumerate(scans, start=1):
        scan_id = meta.get("scan_id", n)
        while scan_id in seen:  # the sorter takes each scan id once per run
            scan_id = f"{scan_id}_{n}"
        seen.add(scan_id)
        meta["scan_id"] = scan_id
    previous = os.environ.get("TANGOPIPE_STATE")
    os.environ["TANGOPIPE_STATE"] = str(state)
    results = []
    try:
        print(
            f"tangopipe reprocess: {len(scans)} input(s) through {definition.name}, files in {args.output}",
            file=sys.stderr,
        )
        session = deploy.up(str(config), os.environ.get("TANGO_HOST"), timeout=args.timeout)
        try:
            for path, meta in zip(args.files, scans, strict=True):
                frames = meta.pop("frames")
                result = run_scan(session, definition, frames, meta, timeout=args.timeout * 10)
                results.append({"input": path, "frames": frames, **result})
        finally:
            deploy.down(session)
    finally:
        if previous is None:
            os.environ.pop("TANGOPIPE_STATE", None)
        else:
            os.environ["TANGOPIPE_STATE"] = previous
    print(json.dumps(results, indent=1))
    complete = all(all(w == r["frames"] for w in r["written"].values()) for r in results)
    return 0 if complete else 1


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "reprocess",
        help="run a pipeline definition on files (one scan per file), new results beside the old",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="pipeline definition (YAML) whose steps to run")
    p.add_argument(
        "files", nargs="+", help="inputs: HDF5/NeXus files, Eiger master files, TIFF files or folders"
    )
    p.add_argument("--output", default="reprocessed", help="folder of the new files (default: ./reprocessed)")
    p.add_argument(
        "--groups", help="worker groups to run, comma-separated (default: all; e.g. not the raw-frame one)"
    )
    p.add_argument(
        "--rate", type=float, default=0.0, help="frames per second (default 0: as fast as possible)"
    )
    p.add_argument("--dataset", help="HDF5 dataset of the frames (default: found in each file)")
    p.add_argument("--name", help="name of the reprocessing pipeline (default: <name>-re)")
    p.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for the devices (default 90)")
    p.set_defaults(func=cmd_reprocess)
