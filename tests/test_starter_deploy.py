"""``tangopipe deploy``: server wrappers for Starter, and Starter's view of the pipeline in
the embedded database (the C++ database and a real Starter: test_facility_db.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tango
import yaml

from devices.database import DeploymentError, start_embedded_database, stop_process
from devices.starter import SERVER_CLASSES, STARTUP_LEVELS, pipeline_servers, wrapper_script, write_wrappers
from pipelines.definition import load_definition
from pipelines.security import read_token_file

from .conftest import BIN, demo_config, tangopipe, user_env

CLEAN_ENV = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}


def test_a_wrapper_per_server_class_that_runs_this_installations_server(tmp_path):
    written = write_wrappers(tmp_path / "bin")
    names = {p.name for p in written}
    assert set(SERVER_CLASSES) <= names
    for path in written:
        assert os.access(path, os.X_OK) and f'exec {BIN / path.name} "$@"' in path.read_text()
    # as Starter runs it: by path, no virtual environment active, arguments passed on
    proc = subprocess.run(
        [str(tmp_path / "bin" / "PipelineMaster"), "-?"],
        env=CLEAN_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: {BIN / 'PipelineMaster'} instance_name")


def test_a_class_without_console_script_runs_from_its_module_under_its_server_name(tmp_path):
    path = tmp_path / "StandInMaster"
    path.write_text(wrapper_script("StandInMaster", "devices.master"))
    path.chmod(0o755)
    assert sys.executable in path.read_text()
    proc = subprocess.run([str(path), "-?"], env=CLEAN_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: StandInMaster instance_name")


def test_deploy_without_tango_host_says_what_to_set(tmp_path):
    proc = tangopipe(
        "deploy", str(demo_config(tmp_path)), env=user_env(tmp_path / "state"), cwd=tmp_path, check=False
    )
    assert proc.returncode == 1 and "set TANGO_HOST" in proc.stderr


@pytest.fixture
def embedded_db(tmp_path):
    pid, tango_host = start_embedded_database(tmp_path / "db")
    try:
        yield tango_host
    finally:
        stop_process(pid)


@pytest.mark.slow
def test_deploy_registers_host_levels_and_the_starter_path_in_the_embedded_database(tmp_path, embedded_db):
    env = dict(user_env(tmp_path / "state"), TANGO_HOST=embedded_db)
    host, port = embedded_db.split(":")
    db = tango.Database(host, int(port))
    starter = tango.DbDevInfo()
    starter.name, starter._class, starter.server = "tango/admin/bl01", "Starter", "Starter/bl01"
    db.add_device(starter)
    db.put_device_property(starter.name, {"StartDsPath": ["/opt/other"]})
    config = demo_config(tmp_path, security={"query_token_file": "secrets/sink.token"})
    wrappers = tmp_path / "bin"
    out = tangopipe(
        "deploy",
        str(config),
        "--starter",
        str(wrappers),
        "--host",
        "bl01",
        "--set-starter-path",
        env=env,
        cwd=tmp_path,
    ).stdout
    assert "Starter tango/admin/bl01 is not running" in out
    token = tmp_path / "secrets" / "sink.token"  # made, private, as tangopipe up does
    assert token.stat().st_mode & 0o777 == 0o600 and read_token_file(token)
    assert db.get_device_property("demo/sink/1", "QueryTokenFile")["QueryTokenFile"][0] == str(token)

    definition = load_definition(config)
    servers = pipeline_servers(definition)
    for server, role in servers.items():
        info = db.get_server_info(server)
        assert (info.host, info.mode, info.level) == ("bl01", 1, STARTUP_LEVELS[role])
        assert (wrappers / server.split("/")[0]).exists()
    for spec in definition.devices():
        info = db.get_device_info(spec.name)
        assert (info.class_name, info.ds_full_name, info.exported) == (spec.cls, spec.server, 0)
    listed = set(db.get_host_server_list("bl01").value_string)
    assert set(servers) <= listed  # what the Starter of bl01 asks for
    assert list(db.get_device_property(starter.name, "StartDsPath")["StartDsPath"]) == [
        "/opt/other",
        str(wrappers),
    ]

    # fewer workers: the surplus one is no longer registered
    data = yaml.safe_load(config.read_text())
    data["groups"]["main"]["workers"] = 1
    config.write_text(yaml.safe_dump(data))
    tangopipe("deploy", str(config), "--host", "bl01", env=env, cwd=tmp_path)
    assert "PipelineWorker/demo-main-2" not in set(db.get_server_list("PipelineWorker/*").value_string)
    assert "PipelineWorker/demo-main-1" in set(db.get_server_list("PipelineWorker/*").value_string)


@pytest.mark.slow
def test_set_starter_path_needs_the_starter_device(tmp_path, embedded_db):
    env = dict(user_env(tmp_path / "state"), TANGO_HOST=embedded_db)
    proc = tangopipe(
        "deploy",
        str(demo_config(tmp_path)),
        "--starter",
        str(tmp_path / "bin"),
        "--host",
        "bl02",
        "--set-starter-path",
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 1
    assert "tango/admin/bl02 is not registered" in proc.stderr and "tango_admin --add-server" in proc.stderr
    host, port = embedded_db.split(":")
    assert (
        not tango.Database(host, int(port)).get_server_list("PipelineMaster/*").value_string
    )  # nothing done


def test_wrapper_folder_that_cannot_be_created_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DeploymentError, match=f"--starter {blocker / 'bin'}: cannot create the folder"):
        write_wrappers(Path(blocker / "bin"))
