"""Pipeline definitions: the YAML files in config/, loaded and validated.

A definition names the pipeline (the Tango domain of its devices), its master
and source, its worker groups (each with its steps and its sorter), the sink and
the writers. Loading checks every key and type and every step's parameters, so
a typo stops with one line naming the file, the key and what was expected.
:meth:`PipelineDefinition.devices` turns it into the Tango devices, servers and
properties that the command-line tool registers in the database.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .security import SecurityError, check_key_folder, read_token_file
from .sources import SOURCES
from .steps import StepChain, StepConfigError, check_parameters


class DefinitionError(ValueError):
    """A pipeline file that cannot be used; the message names file, key and expectation."""


# -- a small schema language: key -> (type, default, description) ------------------------
REQUIRED = object()
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,30}$")


class Name(str):
    """Marker type: an identifier usable in a Tango device name."""


class PortNumber(int):
    """Marker type: a TCP port, 0 meaning any free port."""


class Positive(int):
    """Marker type: an integer > 0."""


class Probability(float):
    """Marker type: a number in [0, 1]."""


SOURCE = {"kind": (str, "simulator", "source kind: " + ", ".join(sorted(SOURCES)))}  # plus the source's own

MASTER = {
    "source": (dict, {"kind": "simulator"}, "where frames come from: {kind: simulator|eiger|..., parameters}"),
    "queue_capacity": (Positive, 64, "frames the master holds at most (queued + in flight)"),
    "queue_mb": (Positive, 2048, "bytes the master holds at most, in MiB"),
    "overflow_policy": (str, "block", "when the queue is full: block, drop_newest or drop_oldest"),
    "heartbeat_timeout_s": (float, 3.0, "a worker silent this long is lost; its frames go elsewhere"),
    "port": (PortNumber, 0, "data port of the master (0: any free port)"),
    "shared_memory": (bool, True, "frames to workers on the master's host through a shared-memory ring"),
    "shm_slots": (int, 0, "frames in the shared-memory ring (0: automatic)"),
}
SORTER = {
    "window": (Positive, 256, "reorder window: results buffered at most while waiting for a missing index"),
    "gap_timeout_s": (float, 10.0, "a missing index becomes a gap record after this long"),
    "outbox_capacity": (Positive, 64, "ordered messages held per consumer before backpressure"),
    "batch_size": (Positive, 1, "results per downstream message at most (fewer messages at high rates)"),
    "batch_latency_ms": (float, 20.0, "a partial batch leaves once its oldest result waited this long"),
}
GROUP = {
    "workers": (Positive, 1, "number of workers"),
    "credit": (Positive, 2, "frames each worker holds at most"),
    "numba_threads": (int, 0, "threads of each worker's numba kernels (0: all cores; workers x threads <= cores is best)"),
    "steps": (list, [], "the processing steps, in order: [name, {name: {parameters}}, ...]"),
    "sorter": (dict, {}, "sorter settings: " + ", ".join(SORTER)),
}
LAVUE = {
    "port": (PortNumber, 5555, "TCP port Lavue connects to (lavue -s zmq -c HOST:PORT/TOPIC)"),
    "max_rate_hz": (float, 10.0, "live images published per second and topic at most"),
}
SINK = {
    "group": (Name, REQUIRED, "the worker group whose sorter feeds the sink"),
    "memory_limit_mb": (Positive, 1024, "memory for stored results, in MiB; least recently used evicted"),
    "lavue": (dict, {}, "Lavue stream: port, max_rate_hz"),
    "query_port": (PortNumber, 0, "port of the sink's query port (0: any free port)"),
    "spectrum_result": (str, "", "1D result shown as LatestSpectrum (empty: the first 1D array result)"),
    "image_event_rate_hz": (float, 2.0, "LatestImage/LatestSpectrum change events per second at most"),
    "scalar_attributes": (list, [], "scalar results published as Tango attributes of their own (scan columns)"),
}
LAVUE_BRIDGE = {
    "group": (Name, REQUIRED, "the worker group whose sorter feeds the bridge (raw frames: a passthrough group)"),
    "port": (PortNumber, 0, "TCP port Lavue connects to (0: any free port; the bridge's Address tells)"),
    "max_rate_hz": (float, 10.0, "images published per second and topic at most"),
    "topics": (list, [], "results to publish: RESULT, GROUP.RESULT or map.NAME; empty: every image-like result"),
}
WRITER = {
    "group": (Name, REQUIRED, "the worker group whose sorter feeds the writer"),
    "kind": (str, "nexus", "nexus (HDF5, every result), tiff (images), graphs (PNG plots) or cube (binned)"),
    "directory": (str, "data", "folder of the scan files (relative to the working directory)"),
    "pattern": (str, "", "file name; fields {pipeline}, {scan}, {stream} (tiff: {name}, {index}; graphs: {name}); "
                "empty: nexus {pipeline}_scan{scan:05}.h5, tiff {pipeline}_scan{scan:05}/{stream}_{name}_{index:05}.tif, "
                "graphs {pipeline}_scan{scan:05}_{stream}_{name}.png, cube {pipeline}_scan{scan:05}_{stream}_cube.h5"),
    "flush_s": (float, 1.0, "flush the file at least this often, in seconds"),
    "compression": (str, "none", "nexus: none, gzip or bslz4 (bitshuffle-LZ4; readers need hdf5plugin)"),
    "save_raw": (bool, True, "nexus: write raw frames (a passthrough step's result 'image') as the detector's data"),
    "swmr": (bool, True, "nexus: readers may open the file while it is written (HDF5 SWMR)"),
    "results": (list, [], "tiff, graphs, cube: the results to write (empty: every image / profile / number)"),
    "maps": (list, [], "graphs: scalar results plotted as maps over the scan grid (StartScan scan_shape)"),
    "every": (int, 0, "graphs: also plot the profiles of every N-th frame (0: only the scan's mean and last)"),
    "by": (str, "", "cube: the scan variable to bin by (a scalar result, a motor of positions, a metadata key)"),
    "bins": (object, None, "cube: bin edges [e0, e1, ...] or {start, stop, count}"),
}
SECURITY = {
    "query_token_file": (str, "", "file holding the token every query to the sink's query port must carry "
                         "(mode 600; relative to this file's folder; tangopipe up makes it if missing); "
                         "empty: no token"),
    "curve_keys": (str, "", "folder of the pipeline's CURVE keys (tangopipe keys FOLDER; relative to this file's "
                   "folder): data plane encrypted, only authorised keys connect; empty: plain ZeroMQ"),
}
TOP = {
    "name": (Name, REQUIRED, "pipeline name: the Tango domain of its devices (NAME/master/1, ...)"),
    "description": (str, "", "free text"),
    "host": (str, "", "host whose Starter runs the servers (empty: this host; tangopipe up always runs them here)"),
    "bind": (str, "127.0.0.1", "address data sockets bind to; '*' for all interfaces"),
    "master": (dict, {}, "the master: " + ", ".join(MASTER)),
    "groups": (dict, REQUIRED, "worker groups by name: " + ", ".join(GROUP)),
    "sink": (dict, None, "the sink: " + ", ".join(SINK)),
    "writers": (dict, {}, "writers by name: " + ", ".join(WRITER)),
    "lavue_bridges": (dict, {}, "Lavue bridges by name (devices NAME/lavue/BRIDGE): " + ", ".join(LAVUE_BRIDGE)),
    "security": (dict, {}, "who may connect: " + ", ".join(SECURITY)),
}


def _type_name(kind: type) -> str:
    return {
        Name: "a name (letters, digits, _ or -; starting with a letter)",
        PortNumber: "a port number 0..65535",
        Positive: "a positive integer",
        Probability: "a number between 0 and 1",
        float: "a number",
        int: "an integer",
        str: "a string",
        dict: "a mapping",
        list: "a list",
        bool: "true or false",
    }.get(kind, kind.__name__)


def _check_value(kind: type, value: Any) -> bool:
    if isinstance(value, bool) and kind is not bool:
        return False
    if kind is Name:
        return isinstance(value, str) and bool(_NAME.match(value))
    if kind is PortNumber:
        return isinstance(value, int) and 0 <= value <= 65535
    if kind is Positive:
        return isinstance(value, int) and value > 0
    if kind is Probability:
        return isinstance(value, int | float) and 0 <= value <= 1
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


def _apply(schema: dict, data: Any, where: str, path: str) -> dict[str, Any]:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DefinitionError(f"{where}: {path or 'top level'}: expected a mapping, got {type(data).__name__}")
    out: dict[str, Any] = {}
    for key in data:
        if key not in schema:
            raise DefinitionError(
                f"{where}: {path}{key}: unknown key; expected one of {', '.join(schema)}"
            )
    for key, (kind, default, _) in schema.items():
        if key in data:
            value = data[key]
            if not _check_value(kind, value):
                raise DefinitionError(f"{where}: {path}{key}: expected {_type_name(kind)}, got {value!r}")
            out[key] = float(value) if kind is float else value
        elif default is REQUIRED:
            raise DefinitionError(f"{where}: {path}{key}: missing; expected {_type_name(kind)} ({schema[key][2]})")
        else:
            out[key] = default
    return out


_PATH_PARAMETERS = {"poni", "mask", "dark", "gain", "flat", "folder", "file", "path", "pedestal", "calibration"}


def _resolve_paths(spec: Any, folder: Path) -> Any:
    """Make relative file paths in a step's parameters absolute: a path is looked up
    next to the definition file first, then in the working directory, so a
    definition works from any folder and every server reads the same file."""
    if not isinstance(spec, dict) or len(spec) != 1:
        return spec
    name, params = next(iter(spec.items()))
    if not isinstance(params, dict):
        return spec
    resolved = dict(params)
    for key, value in params.items():
        if key in _PATH_PARAMETERS and isinstance(value, str) and value and not os.path.isabs(value):
            for base in (folder, folder.parent, Path.cwd()):
                if (base / value).exists():
                    resolved[key] = str((base / value).resolve())
                    break
    return {name: resolved}


@dataclass
class DeviceSpec:
    """One Tango device of a pipeline, as registered in the database."""

    name: str
    cls: str
    server: str  # "PipelineWorker/demo-main-1"
    properties: dict[str, Any]
    role: str

    def tango_properties(self) -> dict[str, list[str]]:
        """Properties as Tango stores them: lists of strings (JSON for structures)."""
        out = {}
        for key, value in self.properties.items():
            if isinstance(value, dict | list) and key not in ("Groups", "Topics", "ScalarAttributes"):
                out[key] = [json.dumps(value)]
            elif isinstance(value, list):
                out[key] = [str(v) for v in value]
            else:
                out[key] = [str(value)]
        return out


class PipelineDefinition:
    """A validated pipeline definition."""

    def __init__(self, data: dict[str, Any], path: str = "<definition>"):
        self.path = path
        top = _apply(TOP, data, path, "")
        self.name: str = top["name"]
        self.description: str = top["description"]
        self.host: str = top["host"]
        self.bind: str = top["bind"]
        self.master = _apply(MASTER, top["master"], path, "master.")
        self.source = self._check_source(self.master["source"])
        if self.master["overflow_policy"] not in ("block", "drop_newest", "drop_oldest"):
            raise DefinitionError(
                f"{path}: master.overflow_policy: expected block, drop_newest or drop_oldest, "
                f"got {self.master['overflow_policy']!r}"
            )
        if not top["groups"]:
            raise DefinitionError(f"{path}: groups: at least one worker group is needed")
        self.groups: dict[str, dict[str, Any]] = {}
        for gname, gdata in top["groups"].items():
            if not _check_value(Name, gname):
                raise DefinitionError(f"{path}: groups.{gname}: group names are {_type_name(Name)}")
            group = _apply(GROUP, gdata, path, f"groups.{gname}.")
            group["steps"] = [_resolve_paths(spec, Path(path).parent) for spec in group["steps"]]
            group["sorter"] = _apply(SORTER, group["sorter"], path, f"groups.{gname}.sorter.")
            try:
                StepChain(group["steps"])
            except StepConfigError as exc:
                raise DefinitionError(f"{path}: groups.{gname}.steps: {exc}") from None
            self.groups[gname] = group
        self.sink = None
        if top["sink"] is not None:
            self.sink = _apply(SINK, top["sink"], path, "sink.")
            self.sink["lavue"] = _apply(LAVUE, self.sink["lavue"], path, "sink.lavue.")
            self._check_group(self.sink["group"], "sink.group")
        self.writers: dict[str, dict[str, Any]] = {}
        for wname, wdata in top["writers"].items():
            if not _check_value(Name, wname):
                raise DefinitionError(f"{path}: writers.{wname}: writer names are {_type_name(Name)}")
            writer = _apply(WRITER, wdata, path, f"writers.{wname}.")
            self._check_group(writer["group"], f"writers.{wname}.group")
            from .writers import SettingError, WriterSettings

            try:
                settings = WriterSettings.from_mapping(writer, given=list(wdata or {}))
            except SettingError as exc:
                raise DefinitionError(f"{path}: writers.{wname}.{exc.key}: {exc.detail}") from None
            writer.update(pattern=settings.pattern, bins=settings.bins)
            self.writers[wname] = writer
        self.lavue_bridges: dict[str, dict[str, Any]] = {}
        for bname, bdata in top["lavue_bridges"].items():
            if not _check_value(Name, bname):
                raise DefinitionError(f"{path}: lavue_bridges.{bname}: bridge names are {_type_name(Name)}")
            bridge = _apply(LAVUE_BRIDGE, bdata, path, f"lavue_bridges.{bname}.")
            self._check_group(bridge["group"], f"lavue_bridges.{bname}.group")
            if not 0 < bridge["max_rate_hz"] <= 1000:
                raise DefinitionError(
                    f"{path}: lavue_bridges.{bname}.max_rate_hz: expected a number > 0 and <= 1000, "
                    f"got {bridge['max_rate_hz']!r}"
                )
            for topic in bridge["topics"]:
                if not isinstance(topic, str) or not topic or "/" in topic or ":" in topic:
                    raise DefinitionError(
                        f"{path}: lavue_bridges.{bname}.topics: expected result names (RESULT or GROUP.RESULT, "
                        f"no '/' or ':'), got {topic!r}"
                    )
            self.lavue_bridges[bname] = bridge
        if self.sink is not None and not self.sink["image_event_rate_hz"] > 0:
            raise DefinitionError(
                f"{path}: sink.image_event_rate_hz: expected a number > 0, got {self.sink['image_event_rate_hz']!r}"
            )
        self.security = self._check_security(_apply(SECURITY, top["security"], path, "security."))

    def _check_security(self, security: dict[str, Any]) -> dict[str, Any]:
        """Absolute paths; a token file that exists must be private and hold a long enough token
        (a missing one is made by ``tangopipe up``); the key folder must hold the pipeline's keys."""
        folder = Path(self.path).parent
        for key in SECURITY:
            if security[key]:
                security[key] = str((folder / os.path.expanduser(security[key])).resolve())
        token_file = security["query_token_file"]
        if token_file and self.sink is None:
            raise DefinitionError(f"{self.path}: security.query_token_file: the pipeline has no sink; remove the key")
        checks = [("query_token_file", read_token_file)] if token_file and os.path.exists(token_file) else []
        if security["curve_keys"]:
            checks.append(("curve_keys", check_key_folder))
        for key, check in checks:
            try:
                check(security[key])
            except SecurityError as exc:
                raise DefinitionError(f"{self.path}: security.{key}: {exc}") from None
        return security

    @property
    def loopback(self) -> bool:
        """True if the data sockets bind to this host's loopback only (no other host reaches them)."""
        return self.bind.startswith("127.") or self.bind in ("localhost", "::1")

    def security_warnings(self) -> list[str]:
        """What is open to other hosts (for ``tangopipe up`` and ``check`` to say)."""
        if self.loopback:
            return []
        warnings = []
        if self.sink is not None and not self.security["query_token_file"]:
            warnings.append(f"bind {self.bind!r}: the sink's query port answers anyone who reaches it; "
                            "set security.query_token_file")
        if not self.security["curve_keys"]:
            warnings.append(f"bind {self.bind!r}: the data plane is not encrypted between hosts; "
                            "set security.curve_keys (tangopipe keys FOLDER)")
        return warnings

    def security_properties(self) -> dict[str, Any]:
        """Properties every device gets: the CURVE key folder (a path; the keys stay in their files)."""
        return {"CurveKeys": self.security["curve_keys"]} if self.security["curve_keys"] else {}

    def _check_group(self, group: str, key: str) -> None:
        if group not in self.groups:
            raise DefinitionError(f"{self.path}: {key}: no worker group {group!r}; groups are {', '.join(self.groups)}")

    def _check_source(self, spec: dict[str, Any]) -> dict[str, Any]:
        kind = spec.get("kind", "simulator")
        target = SOURCES.get(kind)
        if target is None:
            raise DefinitionError(
                f"{self.path}: master.source.kind: unknown source {kind!r}; expected one of {', '.join(sorted(SOURCES))}"
            )
        module_name, _, cls_name = target.partition(":")
        factory = getattr(importlib.import_module(module_name), cls_name)
        params = {k: v for k, v in spec.items() if k != "kind"}
        params = _resolve_paths({kind: params}, Path(self.path).parent)[kind]
        try:
            check_parameters(kind, factory, params, what="source")
        except StepConfigError as exc:
            raise DefinitionError(f"{self.path}: master.source: {exc}") from None
        return {"kind": kind, **params}

    # -- Tango view ----------------------------------------------------------------------
    @property
    def master_name(self) -> str:
        return f"{self.name}/master/1"

    def sorter_name(self, group: str) -> str:
        return f"{self.name}/sorter/{group}"

    def worker_name(self, group: str, n: int) -> str:
        return f"{self.name}/worker/{group}-{n}"

    @property
    def sink_name(self) -> str:
        return f"{self.name}/sink/1"

    def writer_name(self, writer: str) -> str:
        return f"{self.name}/writer/{writer}"

    def scan_file_properties(self, group: str) -> dict[str, Any]:
        """Where the NeXus files of ``group`` are, for the sink to answer from them what it evicted."""
        for w in self.writers.values():
            if w["group"] == group and w["kind"] == "nexus":
                return {"ScanFileDirectory": os.path.abspath(w["directory"]), "ScanFilePattern": w["pattern"],
                        "Pipeline": self.name}
        return {}

    def lavue_bridge_name(self, bridge: str) -> str:
        return f"{self.name}/lavue/{bridge}"

    def worker_spec(self, group: str, n: int) -> DeviceSpec:
        g = self.groups[group]
        return DeviceSpec(
            self.worker_name(group, n),
            "PipelineWorker",
            f"PipelineWorker/{self.name}-{group}-{n}",
            {
                "Upstream": self.master_name,
                "Sorter": self.sorter_name(group),
                "Group": group,
                "Steps": g["steps"],
                "Credit": g["credit"],
                "NumbaThreads": g["numba_threads"],
                **self.security_properties(),
            },
            "worker",
        )

    def devices(self) -> list[DeviceSpec]:
        """Every device of the pipeline, upstream first."""
        m = self.master
        specs = [
            DeviceSpec(
                self.master_name,
                "PipelineMaster",
                f"PipelineMaster/{self.name}",
                {
                    "Source": self.source,
                    "Groups": list(self.groups),
                    "BindAddress": self.bind,
                    "DataPort": m["port"],
                    "MaxQueueFrames": m["queue_capacity"],
                    "MaxQueueBytes": m["queue_mb"] << 20,
                    "OverflowPolicy": m["overflow_policy"],
                    "HeartbeatTimeout": m["heartbeat_timeout_s"],
                    "UseSharedMemory": m["shared_memory"],
                    "ShmSlots": m["shm_slots"],
                    **self.security_properties(),
                },
                "master",
            )
        ]
        for gname, g in self.groups.items():
            s = g["sorter"]
            specs.append(
                DeviceSpec(
                    self.sorter_name(gname),
                    "PipelineSorter",
                    f"PipelineSorter/{self.name}-{gname}",
                    {
                        "Upstream": self.master_name,
                        "BindAddress": self.bind,
                        "ReorderWindow": s["window"],
                        "GapTimeout": s["gap_timeout_s"],
                        "OutboxCapacity": s["outbox_capacity"],
                        "BatchSize": s["batch_size"],
                        "BatchLatencyMs": s["batch_latency_ms"],
                        **self.security_properties(),
                    },
                    "sorter",
                )
            )
            specs.extend(self.worker_spec(gname, n) for n in range(1, g["workers"] + 1))
        if self.sink is not None:
            specs.append(
                DeviceSpec(
                    self.sink_name,
                    "PipelineSink",
                    f"PipelineSink/{self.name}",
                    {
                        "Upstream": self.sorter_name(self.sink["group"]),
                        "MemoryLimit": self.sink["memory_limit_mb"] << 20,
                        "BindAddress": self.bind,
                        "LavuePort": self.sink["lavue"]["port"],
                        "LavueMaxRateHz": self.sink["lavue"]["max_rate_hz"],
                        "QueryPort": self.sink["query_port"],
                        "ScalarAttributes": self.sink["scalar_attributes"],
                        "SpectrumResult": self.sink["spectrum_result"],
                        "ImageEventRateHz": self.sink["image_event_rate_hz"],
                        **self.scan_file_properties(self.sink["group"]),
                        **self.security_properties(),
                        # the path only: the token stays in its file (every Tango client reads properties)
                        **({"QueryTokenFile": self.security["query_token_file"]}
                           if self.security["query_token_file"] else {}),
                    },
                    "sink",
                )
            )
        for wname, w in self.writers.items():
            specs.append(
                DeviceSpec(
                    self.writer_name(wname),
                    "PipelineWriter",
                    f"PipelineWriter/{self.name}-{wname}",
                    {
                        "Upstream": self.sorter_name(w["group"]),
                        "Directory": os.path.abspath(w["directory"]),
                        "FilePattern": w["pattern"],
                        "Pipeline": self.name,
                        "FlushPeriod": w["flush_s"],
                        "Kind": w["kind"],
                        "Compression": w["compression"],
                        "SaveRaw": w["save_raw"],
                        "Swmr": w["swmr"],
                        "Results": ",".join(w["results"]),
                        "Maps": ",".join(w["maps"]),
                        "PlotEvery": w["every"],
                        "CubeBy": w["by"],
                        "CubeBins": w["bins"] or [],
                        **self.security_properties(),
                    },
                    "writer",
                )
            )
        for bname, b in self.lavue_bridges.items():
            specs.append(
                DeviceSpec(
                    self.lavue_bridge_name(bname),
                    "LavueBridge",
                    f"LavueBridge/{self.name}-{bname}",
                    {
                        "Upstream": self.sorter_name(b["group"]),
                        "BindAddress": self.bind,
                        "Port": b["port"],
                        "MaxRateHz": b["max_rate_hz"],
                        "Topics": b["topics"],
                        **self.security_properties(),
                    },
                    "lavue",
                )
            )
        return specs


def load_definition(path: str | os.PathLike) -> PipelineDefinition:
    """Read and validate a pipeline file; raise DefinitionError naming what is wrong."""
    path = str(path)
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise DefinitionError(f"{path}: no such file; pass a pipeline definition such as config/demo.yaml") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise DefinitionError(f"{path}:{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    return PipelineDefinition(data, path)


def schema_reference() -> str:
    """The configuration reference (for the README and ``tangopipe config-help``)."""
    lines = []
    for title, schema in (
        ("top level", TOP),
        ("master", MASTER),
        ("master.source", SOURCE),
        ("groups.NAME", GROUP),
        ("groups.NAME.sorter", SORTER),
        ("sink", SINK),
        ("sink.lavue", LAVUE),
        ("writers.NAME", WRITER),
        ("lavue_bridges.NAME", LAVUE_BRIDGE),
        ("security", SECURITY),
    ):
        lines.append(f"{title}:")
        for key, (kind, default, doc) in schema.items():
            shown = "required" if default is REQUIRED else f"default {default!r}"
            lines.append(f"  {key:<20} {_type_name(kind)}; {shown}. {doc}")
    return "\n".join(lines)
