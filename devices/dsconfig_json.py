"""Pipeline definitions as dsconfig JSON (MAX IV's format for Tango database contents).

Facilities keep their Tango configuration as dsconfig files and load them with
``json2tango``; ``tangopipe export`` writes a pipeline in that form
(servers -> instance -> class -> device -> properties, every value a list of
strings), and ``tangopipe import-dsconfig`` turns such a file (also one dumped
from a live database by ``tango2json``) back into a pipeline definition.

Devices and their properties travel, and each class's ``AllowedAccessCmd`` (the
commands read-only users may run under Tango access control). The definition's
``description`` and ``host`` are not database contents and are not in the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from devices.database import READ_ONLY_COMMANDS
from pipelines import definition as schema
from pipelines.definition import DefinitionError, PipelineDefinition, load_definition

MIB = 1 << 20
DSCONFIG_VERSION = 2


# -- definition -> JSON --------------------------------------------------------------------
def to_dsconfig(definition: PipelineDefinition) -> dict[str, Any]:
    """The pipeline's servers, devices and properties in dsconfig's format."""
    servers: dict[str, Any] = {}
    for spec in definition.devices():
        server, instance = spec.server.split("/", 1)
        devices = servers.setdefault(server, {}).setdefault(instance, {}).setdefault(spec.cls, {})
        # an empty list is no value at all in Tango (and dsconfig wants one item at least)
        devices[spec.name] = {"properties": {k: v for k, v in spec.tango_properties().items() if v}}
    # the read-only commands Tango access control lets read-only users run (tangopipe up
    # and deploy add them to what the facility has; json2tango replaces the class's list)
    classes = {
        cls: {"properties": {"AllowedAccessCmd": list(READ_ONLY_COMMANDS[cls])}}
        for cls in sorted({spec.cls for spec in definition.devices()})
        if READ_ONLY_COMMANDS.get(cls)
    }
    return {
        "_title": f"tangopipe pipeline {definition.name}",
        "_source": str(definition.path),
        "_version": DSCONFIG_VERSION,
        "servers": servers,
        "classes": classes,
    }


# -- JSON -> definition --------------------------------------------------------------------
def _int(text: str) -> int:
    return int(text)


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered not in ("true", "false", "1", "0"):
        raise ValueError("not true or false")
    return lowered in ("true", "1")


def _names(text: str) -> list[str]:
    """A comma-separated list of names ("" for none)."""
    return [name.strip() for name in text.split(",") if name.strip()]


def _mib(text: str) -> int:
    value = int(text)
    if value % MIB:
        raise ValueError("not a whole number of MiB")
    return value // MIB


#: property -> (definition key, conversion) of each device class, beside the links
#: (Upstream, Sorter, Group, Groups, Pipeline) and structured values handled in the code.
#: The inverse of PipelineDefinition.devices(): a property added there goes here too
#: (tests/test_dsconfig_json.py's round trip names any that is missing).
MASTER_KEYS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "DataPort": ("port", _int),
    "MaxQueueFrames": ("queue_capacity", _int),
    "MaxQueueBytes": ("queue_mb", _mib),
    "OverflowPolicy": ("overflow_policy", str),
    "HeartbeatTimeout": ("heartbeat_timeout_s", float),
    "UseSharedMemory": ("shared_memory", _bool),
    "ShmSlots": ("shm_slots", _int),
}
SORTER_KEYS = {
    "ReorderWindow": ("window", _int),
    "GapTimeout": ("gap_timeout_s", float),
    "OutboxCapacity": ("outbox_capacity", _int),
    "BatchSize": ("batch_size", _int),
    "BatchLatencyMs": ("batch_latency_ms", float),
}
WORKER_KEYS = {"Credit": ("credit", _int), "NumbaThreads": ("numba_threads", _int)}
SINK_KEYS = {
    "MemoryLimit": ("memory_limit_mb", _mib),
    "QueryPort": ("query_port", _int),
    "SpectrumResult": ("spectrum_result", str),
    "ImageEventRateHz": ("image_event_rate_hz", float),
    "ScalarAttributes": ("scalar_attributes", _names),
}
LAVUE_KEYS = {"LavuePort": ("port", _int), "LavueMaxRateHz": ("max_rate_hz", float)}
WRITER_KEYS = {
    "Kind": ("kind", str),
    "Directory": ("directory", str),
    "FilePattern": ("pattern", str),
    "FlushPeriod": ("flush_s", float),
    "Compression": ("compression", str),
    "SaveRaw": ("save_raw", _bool),
    "Swmr": ("swmr", _bool),
    "Results": ("results", _names),
    "Maps": ("maps", _names),
    "PlotEvery": ("every", _int),
    "CubeBy": ("by", str),
}
#: sink properties derived from the writers of its group (where its evicted results are on disk)
SINK_DERIVED = ("ScanFileDirectory", "ScanFilePattern", "Pipeline")
BRIDGE_KEYS = {"Port": ("port", _int), "MaxRateHz": ("max_rate_hz", float)}
PIPELINE_CLASSES = (
    "PipelineMaster",
    "PipelineSorter",
    "PipelineWorker",
    "PipelineSink",
    "PipelineWriter",
    "LavueBridge",
)


class _Device:
    """One device of the JSON, with errors that name it."""

    def __init__(self, where: str, server: str, cls: str, name: str, props: dict[str, list[str]]):
        self.where = f"{where}: servers.{server}.{cls}.{name}"
        self.name = name
        self.props = props
        self.used: set[str] = set()

    def error(self, message: str) -> DefinitionError:
        return DefinitionError(f"{self.where}: {message}")

    def text(self, prop: str, default: str | None = None) -> str:
        if prop not in self.props:
            if default is None:
                raise self.error(f"property {prop} is missing")
            return default
        self.used.add(prop)
        value = self.props[prop]
        if not isinstance(value, list) or len(value) != 1 or not isinstance(value[0], str):
            raise self.error(f"property {prop}: expected one string, got {value!r}")
        return value[0]

    def strings(self, prop: str) -> list[str]:
        self.used.add(prop)
        value = self.props.get(prop)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(f"property {prop}: expected a list of strings, got {value!r}")
        return value

    def json(self, prop: str) -> Any:
        text = self.text(prop)
        try:
            return json.loads(text)
        except ValueError as exc:
            raise self.error(f"property {prop}: expected JSON, got {text!r} ({exc.msg})") from None

    def convert(self, table: dict[str, tuple[str, Callable[[str], Any]]], out: dict[str, Any]) -> None:
        for prop, (key, conversion) in table.items():
            if prop not in self.props:
                continue
            text = self.text(prop)
            try:
                out[key] = conversion(text)
            except ValueError as exc:
                kind = {
                    _int: "an integer",
                    _mib: "bytes, a whole number of MiB",
                    float: "a number",
                    _bool: "true or false",
                }.get(conversion, "a string")
                raise self.error(f"property {prop}: expected {kind}, got {text!r} ({exc})") from None

    def unused(self) -> list[str]:
        return [
            f"{self.name}: property {p} has no place in a pipeline definition; ignored"
            for p in self.props
            if p not in self.used
        ]


def _expand_servers(servers: Any, where: str) -> dict[str, dict[str, Any]]:
    """dsconfig v2 (server -> instance) from v1 too ("Server/instance" keys)."""
    if not isinstance(servers, dict):
        raise DefinitionError(
            f"{where}: servers: expected a mapping of server names, got {type(servers).__name__}"
        )
    out: dict[str, dict[str, Any]] = {}
    for key, value in servers.items():
        if not isinstance(value, dict):
            raise DefinitionError(f"{where}: servers.{key}: expected a mapping, got {type(value).__name__}")
        if "/" in key:
            server, instance = key.split("/", 1)
            out.setdefault(server, {})[instance] = value
        else:
            out.setdefault(key, {}).update(value)
    return out


def _devices(config: dict[str, Any], where: str) -> tuple[dict[str, list[_Device]], list[str]]:
    by_class: dict[str, list[_Device]] = {cls: [] for cls in PIPELINE_CLASSES}
    warnings = []
    for server, instances in _expand_servers(config.get("servers", {}), where).items():
        for instance, classes in instances.items():
            for cls, devices in classes.items():
                for name, device in (devices or {}).items():
                    if cls not in by_class:
                        warnings.append(f"{name}: class {cls} is not part of a tangopipe pipeline; ignored")
                        continue
                    props = (device or {}).get("properties", {})
                    by_class[cls].append(_Device(where, f"{server}/{instance}", cls, name, props))
    return by_class, warnings


def _split(device: _Device, expected: str, kind: str) -> tuple[str, str]:
    """(pipeline, member) of NAME/kind/member; an error naming the device otherwise."""
    parts = device.name.split("/")
    if len(parts) != 3 or parts[1].lower() != kind:
        raise device.error(f"device name: expected {expected}, got {device.name!r}")
    return parts[0], parts[2]


def from_dsconfig(config: dict[str, Any], where: str = "<dsconfig>") -> tuple[dict[str, Any], list[str]]:
    """A pipeline definition (as for YAML) from dsconfig JSON, and warnings about what was left out.

    Raises DefinitionError naming the device and property that cannot be expressed.
    """
    if not isinstance(config, dict) or "servers" not in config:
        raise DefinitionError(f"{where}: expected dsconfig JSON with a 'servers' mapping")
    by_class, warnings = _devices(config, where)
    masters = by_class["PipelineMaster"]
    if len(masters) != 1:
        raise DefinitionError(
            f"{where}: expected exactly one PipelineMaster device, found {len(masters)}"
            + (f" ({', '.join(d.name for d in masters)})" if masters else "")
        )
    master = masters[0]
    name, member = _split(master, "NAME/master/1", "master")
    if member != "1":
        raise master.error(f"device name: expected {name}/master/1, got {master.name!r}")

    def owned(device: _Device, kind: str, pattern: str) -> str:
        pipeline, part = _split(device, pattern, kind)
        if pipeline.lower() != name.lower():
            raise device.error(f"belongs to pipeline {pipeline!r}, the master to {name!r}")
        return part

    def upstream_group(device: _Device, sorters: dict[str, str]) -> str:
        upstream = device.text("Upstream")
        group = sorters.get(upstream.lower())
        if group is None:
            raise device.error(
                f"property Upstream: expected one of the sorters ({', '.join(sorters.values())}), "
                f"got {upstream!r}"
            )
        return group

    bind = master.text("BindAddress", "127.0.0.1")
    master_out: dict[str, Any] = {"source": master.json("Source")}
    if not isinstance(master_out["source"], dict):
        raise master.error(f"property Source: expected a JSON object, got {master.text('Source')!r}")
    master.convert(MASTER_KEYS, master_out)
    group_order = master.strings("Groups") if "Groups" in master.props else []

    groups: dict[str, dict[str, Any]] = {g: {} for g in group_order}
    sorters: dict[str, str] = {}
    for sorter in by_class["PipelineSorter"]:
        group = owned(sorter, "sorter", "NAME/sorter/GROUP")
        if sorter.text("Upstream", master.name).lower() != master.name.lower():
            raise sorter.error(f"property Upstream: expected {master.name}, got {sorter.text('Upstream')!r}")
        if sorter.text("BindAddress", bind) != bind:
            warnings.append(
                f"{sorter.name}: BindAddress {sorter.text('BindAddress')!r} differs from the "
                f"master's {bind!r}; the definition has one address for all"
            )
        settings: dict[str, Any] = {}
        sorter.convert(SORTER_KEYS, settings)
        if group not in groups:
            raise sorter.error(f"group {group!r} is not in the master's Groups {group_order}")
        groups[group]["sorter"] = settings
        sorters[sorter.name.lower()] = group

    workers: dict[str, dict[int, _Device]] = {}
    for worker in by_class["PipelineWorker"]:
        label = owned(worker, "worker", "NAME/worker/GROUP-N")
        group, _, number = label.rpartition("-")
        if not group or not number.isdigit():
            raise worker.error(f"device name: expected {name}/worker/GROUP-N, got {worker.name!r}")
        if worker.text("Group", group) != group:
            raise worker.error(
                f"property Group: expected {group!r} (from the device name), got {worker.text('Group')!r}"
            )
        if worker.text("Upstream", master.name).lower() != master.name.lower():
            raise worker.error(f"property Upstream: expected {master.name}, got {worker.text('Upstream')!r}")
        if worker.text("Sorter", f"{name}/sorter/{group}").lower() != f"{name}/sorter/{group}".lower():
            raise worker.error(
                f"property Sorter: expected {name}/sorter/{group}, got {worker.text('Sorter')!r}"
            )
        workers.setdefault(group, {})[int(number)] = worker

    for group, members in workers.items():
        if group not in groups:
            raise members[min(members)].error(
                f"worker group {group!r} is not in the master's Groups {group_order}"
            )
        numbers = sorted(members)
        if numbers != list(range(1, len(numbers) + 1)):
            raise DefinitionError(
                f"{where}: workers of group {group!r} are numbered {numbers}; a definition numbers them 1..N"
            )
        first = members[1]
        settings = {"workers": len(numbers), "steps": first.json("Steps") if "Steps" in first.props else []}
        first.convert(WORKER_KEYS, settings)
        for n in numbers[1:]:
            other = members[n]
            other_settings = {"steps": other.json("Steps") if "Steps" in other.props else []}
            other.convert(WORKER_KEYS, other_settings)
            if any(other_settings[k] != settings.get(k, other_settings[k]) for k in other_settings):
                raise other.error(
                    f"properties Steps/Credit differ from {first.name}'s; "
                    "a group's workers share one configuration"
                )
        groups[group] = {**settings, **groups[group]}

    for group, settings in groups.items():
        if group not in workers:
            raise DefinitionError(
                f"{where}: group {group!r} (master's Groups) has no PipelineWorker devices "
                f"({name}/worker/{group}-1, ...); a definition's group has at least one"
            )
        if "sorter" not in settings:
            warnings.append(
                f"group {group!r} has no sorter device in the file; the definition adds "
                f"{name}/sorter/{group} with default settings"
            )
    data: dict[str, Any] = {"name": name, "bind": bind, "master": master_out, "groups": groups}

    sinks = by_class["PipelineSink"]
    if len(sinks) > 1:
        raise DefinitionError(f"{where}: a pipeline has one sink, found {', '.join(d.name for d in sinks)}")
    for sink in sinks:
        if owned(sink, "sink", "NAME/sink/1") != "1":
            raise sink.error(f"device name: expected {name}/sink/1, got {sink.name!r}")
        sink_out: dict[str, Any] = {"group": upstream_group(sink, sorters)}
        sink.convert(SINK_KEYS, sink_out)
        lavue: dict[str, Any] = {}
        sink.convert(LAVUE_KEYS, lavue)
        sink_out["lavue"] = lavue
        sink.text("BindAddress", bind)
        sink.used.update(SINK_DERIVED)
        data["sink"] = sink_out
        if "QueryTokenFile" in sink.props:
            data.setdefault("security", {})["query_token_file"] = sink.text("QueryTokenFile")

    writers: dict[str, Any] = {}
    for writer in by_class["PipelineWriter"]:
        wname = owned(writer, "writer", "NAME/writer/WRITER")
        writer_out: dict[str, Any] = {"group": upstream_group(writer, sorters)}
        writer.convert(WRITER_KEYS, writer_out)
        if "CubeBins" in writer.props:
            bins = writer.json("CubeBins")
            if bins not in ([], None):
                writer_out["bins"] = bins
        if writer.text("Pipeline", name) != name:
            warnings.append(
                f"{writer.name}: property Pipeline {writer.text('Pipeline')!r} differs from the "
                f"pipeline name {name!r}; file names will use {name!r}"
            )
        writers[wname] = writer_out
    if writers:
        data["writers"] = writers

    bridges: dict[str, Any] = {}
    for bridge in by_class["LavueBridge"]:
        bname = owned(bridge, "lavue", "NAME/lavue/BRIDGE")
        bridge_out: dict[str, Any] = {"group": upstream_group(bridge, sorters)}
        bridge.convert(BRIDGE_KEYS, bridge_out)
        if "Topics" in bridge.props:
            bridge_out["topics"] = [t for t in bridge.strings("Topics") if t]
        bridge.text("BindAddress", bind)
        bridges[bname] = bridge_out
    if bridges:
        data["lavue_bridges"] = bridges

    curve_keys = master.text("CurveKeys", "")  # one key folder for the whole pipeline
    if curve_keys:
        data.setdefault("security", {})["curve_keys"] = curve_keys
    for devices in by_class.values():
        for device in devices:
            if device.text("CurveKeys", curve_keys) != curve_keys:
                warnings.append(f"{device.name}: CurveKeys differs from the master's {curve_keys!r}; "
                                "the definition has one key folder for all")
            warnings.extend(device.unused())
    data = _without_defaults(data)
    PipelineDefinition(data, where)  # everything a definition checks (steps, sources, groups)
    return data, warnings


def _drop_defaults(values: dict[str, Any], keys: dict[str, tuple]) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        default = keys[key][1] if key in keys else schema.REQUIRED
        if default is schema.REQUIRED or value != default or type(value) is not type(default):
            out[key] = value
    return out


def _without_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """Only what differs from the definition's defaults (some keys are refused where they do
    not apply, e.g. a NeXus writer's ``results``), so the file reads like a hand-written one."""
    out = _drop_defaults(data, schema.TOP)
    out["master"] = _drop_defaults(data["master"], schema.MASTER)
    out["groups"] = {}
    for group, settings in data["groups"].items():
        settings = _drop_defaults(settings, schema.GROUP)
        sorter = _drop_defaults(settings.pop("sorter", {}), schema.SORTER)
        if sorter:
            settings["sorter"] = sorter
        out["groups"][group] = settings
    if "sink" in data:
        out["sink"] = _drop_defaults(data["sink"], schema.SINK)
        lavue = _drop_defaults(out["sink"].pop("lavue", {}), schema.LAVUE)
        if lavue:
            out["sink"]["lavue"] = lavue
    for key, keys in (("writers", schema.WRITER), ("lavue_bridges", schema.LAVUE_BRIDGE)):
        if key in data:
            out[key] = {name: _drop_defaults(values, keys) for name, values in data[key].items()}
    return {k: v for k, v in out.items() if v != {} or k in ("master", "groups")}


def load_dsconfig(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise DefinitionError(
            f"{path}: no such file; pass a dsconfig JSON file (from tangopipe export or tango2json)"
        ) from None
    except ValueError as exc:
        raise DefinitionError(f"{path}: not valid JSON: {exc}") from None


def definition_yaml(data: dict[str, Any], source: str) -> str:
    header = f"# tangopipe pipeline {data['name']}, imported from the dsconfig file {source}\n"
    return header + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)


# -- commands ------------------------------------------------------------------------------
def _write(text: str, output: str | None) -> None:
    if output:
        Path(output).write_text(text)
        print(f"wrote {output}", file=sys.stderr)
    else:
        sys.stdout.write(text)


def cmd_export(args: argparse.Namespace) -> int:
    definition = load_definition(args.config)
    _write(json.dumps(to_dsconfig(definition), indent=2) + "\n", args.output)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    data, warnings = from_dsconfig(load_dsconfig(args.file), args.file)
    for warning in warnings:
        print(f"tangopipe: warning: {warning}", file=sys.stderr)
    _write(definition_yaml(data, args.file), args.output)
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a pipeline definition as dsconfig JSON (json2tango loads it)",
        description="Write the pipeline's servers, devices and properties as dsconfig JSON "
        "(servers -> instance -> class -> device -> properties), e.g. for 'json2tango -w FILE'.",
    )
    p.add_argument("config", help="pipeline definition (YAML)")
    p.add_argument("-o", "--output", help="JSON file to write (default: standard output)")
    p.set_defaults(func=cmd_export)
    p = subparsers.add_parser(
        "import-dsconfig",
        help="turn dsconfig JSON (tangopipe export, tango2json) into a pipeline definition",
    )
    p.add_argument("file", help="dsconfig JSON file")
    p.add_argument("-o", "--output", help="pipeline definition to write (default: standard output)")
    p.set_defaults(func=cmd_import)
