"""The facility's Tango database: Debian's C++ DataBaseds on MariaDB, as beamlines run it.

The end-to-end flow of test_e2e.py (``tangopipe up`` with TANGO_HOST set, a 200-frame
scan), a dsconfig file loaded by dsconfig's own json2tango and read back, and Astor's
way of running servers: ``tangopipe deploy`` and Debian's Starter starting and
stopping every server.
"""

import json
import subprocess
import time

import pytest
import tango
import yaml

from devices.database import READ_ONLY_COMMANDS, pid_alive, stop_process
from devices.deploy import device_report, wait_ready
from devices.starter import STARTUP_LEVELS, pipeline_servers, short_hostname, starter_device
from pipelines.definition import load_definition
from tests.waiting import wait_for

from . import test_e2e
from .conftest import BIN, Deployed, demo_config, pids_alive, tangopipe, user_env
from .facility import Starter

pytestmark = pytest.mark.slow


def facility_env(folder, tango_host: str) -> dict:
    return dict(user_env(folder / "state"), TANGO_HOST=tango_host)


def database_of(tango_host: str) -> tango.Database:
    host, port = tango_host.split(":")
    return tango.Database(host, int(port))



# -- the end-to-end flow, with TANGO_HOST pointing at the C++ DataBaseds -----------------------
@pytest.fixture(scope="module")
def deployed(facility_db, tmp_path_factory):
    """The demo pipeline, registered in the facility database by ``tangopipe up``."""
    folder = tmp_path_factory.mktemp("facility-deployed")
    pipeline = Deployed(folder, env=facility_env(folder, facility_db))
    try:
        yield pipeline
    finally:
        pipeline.down()
        pids = list(pipeline.session["servers"].values())
        deadline = time.monotonic() + 15
        while pids_alive(pids) and time.monotonic() < deadline:
            time.sleep(0.1)


def test_up_registers_in_the_facility_database_and_starts_no_database_of_its_own(deployed, facility_db):
    assert deployed.tango_host == facility_db and deployed.session["db_pid"] == 0
    db = database_of(facility_db)
    assert "DataBase" in db.get_device_info("sys/database/2").class_name  # the C++ server answers
    for spec in load_definition(deployed.config).devices():
        info = db.get_device_info(spec.name)
        assert (info.class_name, info.ds_full_name, info.exported) == (spec.cls, spec.server, 1)
        assert info.pid == deployed.session["servers"][spec.server]
        stored = db.get_device_property(spec.name, list(spec.tango_properties()))
        assert {k: list(v) for k, v in stored.items()} == spec.tango_properties()


# the same checks as against the embedded database: every frame processed once, in order,
# the file complete, counters agreeing along the pipeline (with this module's `deployed`)
test_status_json_has_stable_keys_and_every_device_is_on = (
    test_e2e.test_status_json_has_stable_keys_and_every_device_is_on
)
test_scan_of_200_frames_processed_once_in_order_written_shown_in_lavue = (
    test_e2e.test_scan_of_200_frames_processed_once_in_order_written_shown_in_lavue
)


# -- dsconfig ----------------------------------------------------------------------------------
def test_exported_json_loads_with_json2tango_and_reads_back_the_same(facility_db, tmp_path):
    env = facility_env(tmp_path, facility_db)
    config = demo_config(tmp_path, name="dsx")
    definition = load_definition(config)
    exported = tmp_path / "dsx.json"
    tangopipe("export", str(config), "-o", str(exported), env=env, cwd=tmp_path)

    def json2tango():
        return subprocess.run(
            [str(BIN / "json2tango"), "--write", "--no-colors", str(exported)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )

    first = json2tango()
    assert first.returncode == 2, first.stderr  # dsconfig: configuration applied
    db = database_of(facility_db)
    for spec in definition.devices():
        info = db.get_device_info(spec.name)
        assert (info.class_name, info.ds_full_name) == (spec.cls, spec.server)
        expected = {k: v for k, v in spec.tango_properties().items() if v}
        stored = db.get_device_property(spec.name, list(expected))
        assert {k: list(v) for k, v in stored.items()} == expected
    for cls in {spec.cls for spec in definition.devices()}:  # what read-only users may run
        allowed = db.get_class_property(cls, ["AllowedAccessCmd"])["AllowedAccessCmd"]
        assert list(allowed) == list(READ_ONLY_COMMANDS[cls]) and "BadMessageReasons" in allowed
    again = json2tango()
    assert again.returncode == 0, again.stderr  # dsconfig: no changes needed

    dumped = subprocess.run(
        [str(BIN / "tango2json"), "device:dsx/*"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dumped.returncode == 0, dumped.stderr
    (tmp_path / "dump.json").write_text(dumped.stdout)
    imported = tmp_path / "imported.yaml"
    tangopipe("import-dsconfig", str(tmp_path / "dump.json"), "-o", str(imported), env=env, cwd=tmp_path)
    back = load_definition(imported)
    assert [(s.name, s.cls, s.server, s.tango_properties()) for s in back.devices()] == [
        (s.name, s.cls, s.server, s.tango_properties()) for s in definition.devices()
    ]


# -- Starter (Astor) ---------------------------------------------------------------------------
def _starter_config(folder):
    config = demo_config(folder, name="astor")
    data = yaml.safe_load(config.read_text())
    data["master"]["source"].update(shape=[256, 256], rate_hz=20)
    data["groups"]["main"]["workers"] = 1
    config.write_text(yaml.safe_dump(data))
    return config


def _gone(name: str, tango_host: str) -> bool:
    try:
        dev = tango.DeviceProxy(f"tango://{tango_host}/{name}")
        dev.set_timeout_millis(1000)
        dev.ping()
        return False
    except tango.DevFailed:
        return True


def test_starter_starts_and_stops_every_server_deployed_for_it(facility_db, tmp_path):
    host = short_hostname()
    env = facility_env(tmp_path, facility_db)
    db = database_of(facility_db)
    starter = Starter(facility_db, host, tmp_path / "starter")
    starter.register()
    starter.start(env)
    pids: dict[str, int] = {}
    try:
        config = _starter_config(tmp_path)
        definition = load_definition(config)
        servers = pipeline_servers(definition)
        wrappers = tmp_path / "bin"
        out = tangopipe(
            "deploy", str(config), "--starter", str(wrappers), "--set-starter-path", env=env, cwd=tmp_path
        ).stdout
        assert f"Starter {starter_device(host)} updated" in out
        for server, role in servers.items():
            info = db.get_server_info(server)
            assert (info.host, info.mode, info.level) == (host, 1, STARTUP_LEVELS[role])
            assert (wrappers / server.split("/")[0]).stat().st_mode & 0o111
        assert str(wrappers) in list(db.get_device_property(starter.device, "StartDsPath")["StartDsPath"])

        admin = starter.proxy()  # lists them (stopped) before their first start, as Astor shows them
        wait_for(lambda: set(servers) <= set(admin.StoppedServers or []), 30, "Starter listing them stopped")
        for server in servers:  # upstream first, as the startup levels say
            admin.DevStart(server)
        wait_ready(definition, facility_db, timeout=240)  # every device ON, the pipeline wired
        for spec in definition.devices():
            pids[spec.server] = db.get_device_info(spec.name).pid
            assert device_report(spec, facility_db)["state"] == "ON"
        wait_for(lambda: set(servers) <= set(admin.RunningServers or []), 30, "Starter listing them running")
        again = tangopipe("deploy", str(config), env=env, cwd=tmp_path, check=False)
        assert again.returncode == 1 and "PipelineMaster/astor" in again.stderr and "running" in again.stderr

        # what Jive shows for each property of a running server: a description
        for cls in dict.fromkeys(s.cls for s in definition.devices()):
            server = next(s.server for s in definition.devices() if s.cls == cls)
            wizard = tango.DeviceProxy(f"tango://{facility_db}/dserver/{server}").QueryWizardDevProperty(cls)
            described = dict(zip(wizard[::3], wizard[1::3], strict=True))
            assert described and all(d.strip() for d in described.values()), (cls, described)

        for server in reversed(servers):
            admin.DevStop(server)
        for spec in definition.devices():
            wait_for(lambda spec=spec: _gone(spec.name, facility_db), 60, f"{spec.name} to go away")
        wait_for(lambda: not pids_alive(pids.values()), 30, "the server processes to exit")
        wait_for(
            lambda: set(servers) <= set(admin.StoppedServers or []), 30, "Starter listing them stopped again"
        )
    finally:
        for pid in pids.values():
            if pid and pid_alive(pid):
                stop_process(pid)
        starter.stop()
        log_home = starter.log_home
        logs = {p.name: p.read_text(errors="replace")[-400:] for p in log_home.rglob("*") if p.is_file()}
        print(json.dumps(logs, indent=1))  # shown by pytest when the test fails
