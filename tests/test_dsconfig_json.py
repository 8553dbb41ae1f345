"""Pipeline definitions as dsconfig JSON and back (loading into a real database is in
test_facility_db.py)."""

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from dsconfig.formatting import SCHEMA_FILENAME, normalize_config
from dsconfig.tangodb import get_devices_from_dict

from devices.cli import main
from devices.dsconfig_json import from_dsconfig, to_dsconfig
from pipelines.definition import DefinitionError, PipelineDefinition, load_definition

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted(p.name for p in (ROOT / "config").glob("*.yaml"))


def devices_of(definition: PipelineDefinition) -> list[tuple]:
    return [(s.name, s.cls, s.server, s.tango_properties()) for s in definition.devices()]


def several_groups() -> PipelineDefinition:
    """Three workers in one group, two groups, odd sizes and settings everywhere."""
    data = yaml.safe_load((ROOT / "config" / "branch.yaml").read_text())
    data["master"].update(
        queue_mb=96, overflow_policy="drop_oldest", heartbeat_timeout_s=1.5, shared_memory=False
    )
    data["groups"]["rings"].update(workers=3, credit=5, sorter={"window": 17, "batch_size": 4})
    data["sink"].update(memory_limit_mb=33, lavue={"port": 0, "max_rate_hz": 2.5}, spectrum_result="profile")
    data["lavue_bridges"] = {"raw": {"group": "raw", "port": 0, "max_rate_hz": 3.0, "topics": ["raw.frame"]}}
    data["writers"]["raw"]["flush_s"] = 0.25
    return PipelineDefinition(data, "several-groups")


@pytest.mark.parametrize("config", CONFIGS)
def test_definition_to_json_and_back_gives_the_same_devices_and_properties(config):
    definition = load_definition(ROOT / "config" / config)
    text = json.dumps(to_dsconfig(definition))
    data, warnings = from_dsconfig(json.loads(text), "exported.json")
    assert warnings == [], "a property import-dsconfig does not know: add it to devices/dsconfig_json.py"
    assert devices_of(PipelineDefinition(data, "imported")) == devices_of(definition)


def test_round_trip_keeps_every_setting_of_a_larger_pipeline():
    definition = several_groups()
    data, warnings = from_dsconfig(to_dsconfig(definition))
    assert warnings == []
    back = PipelineDefinition(data, "imported")
    assert devices_of(back) == devices_of(definition)
    assert list(back.groups) == ["rings", "raw"] and back.groups["rings"]["workers"] == 3
    assert back.master["queue_mb"] == 96 and back.sink["lavue"]["max_rate_hz"] == 2.5
    assert back.master["shared_memory"] is False and back.lavue_bridges["raw"]["topics"] == ["raw.frame"]


@pytest.mark.parametrize("config", CONFIGS)
def test_exported_json_matches_the_dsconfig_schema_and_its_loader(config):
    definition = load_definition(ROOT / "config" / config)
    exported = to_dsconfig(definition)
    jsonschema.validate(exported, json.loads(Path(SCHEMA_FILENAME).read_text()))
    listed = get_devices_from_dict(normalize_config(exported)["servers"])
    assert sorted((f"{srv}/{inst}", cls, dev) for srv, inst, cls, dev, _ in listed) == sorted(
        (s.server, s.cls, s.name) for s in definition.devices()
    )


def test_the_older_server_slash_instance_layout_is_read_too():
    definition = several_groups()
    nested = to_dsconfig(definition)["servers"]
    flat = {f"{srv}/{inst}": classes for srv, insts in nested.items() for inst, classes in insts.items()}
    data, _ = from_dsconfig({"servers": flat})
    assert devices_of(PipelineDefinition(data, "v1")) == devices_of(definition)


def test_properties_a_definition_cannot_hold_are_named_in_warnings():
    exported = to_dsconfig(load_definition(ROOT / "config" / "demo.yaml"))
    sorter = exported["servers"]["PipelineSorter"]["demo-main"]["PipelineSorter"]["demo/sorter/main"]
    sorter["properties"]["CollectPort"] = ["5000"]
    exported["servers"]["TangoTest"] = {"test": {"TangoTest": {"sys/tg_test/1": {"properties": {}}}}}
    _, warnings = from_dsconfig(exported)
    assert any("demo/sorter/main" in w and "CollectPort" in w for w in warnings)
    assert any("sys/tg_test/1" in w and "TangoTest" in w for w in warnings)


def _master_properties(exported: dict) -> dict:
    return exported["servers"]["PipelineMaster"]["demo"]["PipelineMaster"]["demo/master/1"]["properties"]


@pytest.mark.parametrize(
    "prop, value, expected",
    [
        ("MaxQueueFrames", ["many"], "MaxQueueFrames: expected an integer, got 'many'"),
        ("MaxQueueBytes", ["1000"], "MaxQueueBytes: expected bytes, a whole number of MiB, got '1000'"),
        ("Source", ["{not json"], "Source: expected JSON, got '{not json'"),
        ("HeartbeatTimeout", ["3", "4"], "HeartbeatTimeout: expected one string, got ['3', '4']"),
    ],
)
def test_a_bad_property_value_names_device_property_and_value(prop, value, expected):
    exported = to_dsconfig(load_definition(ROOT / "config" / "demo.yaml"))
    _master_properties(exported)[prop] = value
    with pytest.raises(DefinitionError) as err:
        from_dsconfig(exported, "bad.json")
    assert "bad.json" in str(err.value) and "demo/master/1" in str(err.value) and expected in str(err.value)


def test_workers_of_one_group_with_different_steps_are_refused():
    exported = to_dsconfig(load_definition(ROOT / "config" / "demo.yaml"))
    worker = exported["servers"]["PipelineWorker"]["demo-main-2"]["PipelineWorker"]["demo/worker/main-2"]
    worker["properties"]["Steps"] = ['["passthrough"]']
    with pytest.raises(DefinitionError, match="demo/worker/main-2.*differ from demo/worker/main-1"):
        from_dsconfig(exported)


def test_a_gap_in_worker_numbers_is_refused():
    exported = copy.deepcopy(to_dsconfig(load_definition(ROOT / "config" / "demo.yaml")))
    del exported["servers"]["PipelineWorker"]["demo-main-1"]
    with pytest.raises(DefinitionError, match=r"numbered \[2\]"):
        from_dsconfig(exported)


def test_commands_export_and_import_dsconfig(tmp_path, capsys):
    config = ROOT / "config" / "branch.yaml"
    exported, imported = tmp_path / "branch.json", tmp_path / "branch.yaml"
    assert main(["export", str(config), "-o", str(exported)]) == 0
    assert main(["import-dsconfig", str(exported), "-o", str(imported)]) == 0
    assert devices_of(load_definition(imported)) == devices_of(load_definition(config))
    assert main(["export", str(config)]) == 0  # to standard output
    assert json.loads(capsys.readouterr().out) == json.loads(exported.read_text())
    assert main(["import-dsconfig", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: no such file" in capsys.readouterr().err
