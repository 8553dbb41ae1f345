"""Pipeline definitions: the shipped ones load; every mistake names file, key and fix."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from devices.cli import main as cli_main
from pipelines.definition import DefinitionError, load_definition

CONFIG = Path(__file__).resolve().parent.parent / "config"
DEMO = yaml.safe_load((CONFIG / "demo.yaml").read_text())


def write(tmp_path, data, name="p.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def modified(change):
    data = yaml.safe_load(yaml.safe_dump(DEMO))
    change(data)
    return data


def test_demo_definition_gives_the_pipeline_devices():
    d = load_definition(CONFIG / "demo.yaml")
    names = [s.name for s in d.devices()]
    assert names == ["demo/master/1", "demo/sorter/main", "demo/worker/main-1", "demo/worker/main-2",
                     "demo/sink/1", "demo/writer/hdf5"]
    worker = d.devices()[2]
    assert worker.properties["Upstream"] == "demo/master/1" and worker.properties["Sorter"] == "demo/sorter/main"
    assert all(len(v) == 1 for v in worker.tango_properties().values())


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda d: d["master"].update(queue_capcity=3), "master.queue_capcity: unknown key; expected one of source, queue_capacity"),
        (lambda d: d["groups"]["main"].update(workers="two"), "groups.main.workers: expected a positive integer, got 'two'"),
        (lambda d: d["groups"]["main"].update(workers=0), "groups.main.workers: expected a positive integer, got 0"),
        (lambda d: d.update(name="bad name!"), "name: expected a name"),
        (lambda d: d.pop("name"), "name: missing"),
        (lambda d: d["master"].update(overflow_policy="sometimes"), "master.overflow_policy: expected block"),
        (lambda d: d["sink"].update(group="nope"), "sink.group: no worker group 'nope'"),
        (lambda d: d["sink"]["lavue"].update(port=70000), "sink.lavue.port: expected a port number"),
        (lambda d: d["groups"]["main"]["steps"].append({"no_such_step": {}}), "unknown step 'no_such_step'"),
        (lambda d: d["groups"]["main"]["steps"][0]["roi_stats"].update(bins=3), "unknown parameter 'bins'"),
        (lambda d: d["master"]["source"].update(kind="camera"), "master.source.kind: unknown source 'camera'"),
        (lambda d: d["master"]["source"].update(speed=3), "source 'simulator': unknown parameter 'speed'"),
        (lambda d: d["writers"]["hdf5"].update(pattern="fixed.h5"), "must contain {scan}"),
        (lambda d: d["writers"]["hdf5"].update(pattern="{scan}{user}.h5"), "uses ['user']"),
    ],
)
def test_mistakes_name_file_key_and_expectation(tmp_path, change, expected):
    path = write(tmp_path, modified(change))
    with pytest.raises(DefinitionError) as info:
        load_definition(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_broken_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "name: demo\ngroups:\n  main: [unclosed\n")
    with pytest.raises(DefinitionError, match=r"line \d+: not valid YAML"):
        load_definition(path)


def test_missing_file_says_what_to_pass(tmp_path):
    with pytest.raises(DefinitionError, match="no such file"):
        load_definition(tmp_path / "nothing.yaml")


def test_cli_exits_2_with_one_line_naming_the_key(tmp_path, capsys):
    path = write(tmp_path, modified(lambda d: d["groups"]["main"].update(credit=-1)))
    assert cli_main(["check", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "groups.main.credit" in err[0] and str(path) in err[0]


def test_installed_command_exits_2_on_a_bad_file(tmp_path):
    path = write(tmp_path, modified(lambda d: d.update(colour="blue")))
    exe = Path(sys.executable).parent / "tangopipe"
    proc = subprocess.run([str(exe), "up", str(path)], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "TANGOPIPE_STATE": str(tmp_path / "state")})
    assert proc.returncode == 2
    assert "colour: unknown key" in proc.stderr
