"""Tango access control on the facility's database: read-only users look, they do not drive.

Debian's TangoAccessControl runs on a C++ DataBaseds of its own (a client caches
the access service per database for its whole life, so the other tests' database
stays without it). Anyone not named is read-only, the deploying account may write,
and a small pipeline is deployed by ``tangopipe up``. A client process running as a
read-only OS account then reads attributes, receives events and runs the commands
tangopipe declares read-only, and its client library refuses it StartScan,
Reconfigure, attribute writes, Init and property changes (API_ReadOnlyMode); the
deploying account scans.

Needs root: the client library takes the user name from the effective UID of the
client process, so the test creates the OS account ``tangopipe-ro`` when it is
missing (or uses the existing account named by TANGOPIPE_READONLY_USER) and runs
the client as that account.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import pytest
import tango
import yaml

from devices.database import READ_ONLY_COMMANDS, allow_read_only_commands
from pipelines.definition import PipelineDefinition, load_definition
from tests.waiting import wait_for

from .conftest import ROOT, Deployed, pids_alive, tangopipe, user_env
from .facility import AccessControl, FacilityDatabase

pytestmark = pytest.mark.slow

READ_ONLY_USER = os.environ.get("TANGOPIPE_READONLY_USER", "tangopipe-ro")
DENIED = "API_ReadOnlyMode"

PIPELINE = {
    "name": "acl",
    "bind": "127.0.0.1",
    "master": {"source": {"kind": "simulator", "shape": [32, 32], "dtype": "uint16", "rate_hz": 20, "frames": 10}},
    "groups": {"main": {"workers": 1, "steps": ["passthrough"]}},
    "sink": {"group": "main", "lavue": {"port": 0}},
    "lavue_bridges": {"view": {"group": "main", "port": 0}},
}


def read_only_account() -> str:
    """The OS account of the read-only client, created when missing; fails (never skips) without root."""
    if os.geteuid() != 0:
        pytest.fail(
            "test_access_control needs root: the Tango client library takes the user from the client "
            f"process's effective UID, so the test runs its read-only client as the OS account {READ_ONLY_USER!r} "
            "(created with useradd when missing; TANGOPIPE_READONLY_USER names an existing one instead) "
            "and only root can start a process as another account. Run the tests as root."
        )
    try:
        pwd.getpwnam(READ_ONLY_USER)
    except KeyError:
        useradd = shutil.which("useradd", path="/usr/sbin:/sbin:/usr/bin:/bin")
        if useradd is None:
            pytest.fail(f"useradd not found: create the OS account {READ_ONLY_USER!r} or set TANGOPIPE_READONLY_USER")
        subprocess.run(
            [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
             "--comment", "tangopipe read-only Tango client (tests)", READ_ONLY_USER],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
    if READ_ONLY_USER.lower() == deploying_user():
        pytest.fail(f"the read-only account {READ_ONLY_USER!r} must not be the deploying account")
    return READ_ONLY_USER.lower()  # the client library compares user names in lower case


def deploying_user() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name.lower()


# -- the client: a process of its own, running as the read-only account ---------------------------
def client_main() -> None:
    """Child process: become ``user``, make the calls, print their outcomes as JSON.

    Started as root so that the interpreter can load (it may live where the account
    cannot read, e.g. under /root); it switches its real and effective IDs to the
    account before it talks to Tango, as ``su`` would, so from the first call on it
    is a client of that account.
    """
    import asyncio  # noqa: F401  (loaded now: pytango imports it lazily, e.g. for events)

    import tango.server  # noqa: F401

    request = json.load(sys.stdin)
    account = pwd.getpwnam(request["user"])
    os.setgroups([])
    os.setgid(account.pw_gid)
    os.setuid(account.pw_uid)
    outcomes: dict[str, Any] = {"euid": os.geteuid()}
    for label, kind, device, *args in request["calls"]:
        try:
            outcomes[label] = {"ok": True, "value": _call(request["tango_host"], kind, device, args)}
        except tango.DevFailed as exc:
            outcomes[label] = {"ok": False, "reason": exc.args[0].reason, "desc": exc.args[0].desc.strip()}
    print(json.dumps(outcomes, default=str))


def _call(tango_host: str, kind: str, device: str, args: list) -> Any:
    if kind == "put_property":
        host, port = tango_host.split(":")
        tango.Database(host, int(port)).put_device_property(device, args[0])
        return None
    dev = tango.DeviceProxy(f"tango://{tango_host}/{device}")
    dev.set_timeout_millis(5000)
    if kind == "read":
        return {a.name: _plain(a.value) for a in dev.read_attributes(args[0])}
    if kind == "command":
        return _plain(dev.command_inout(*args))
    if kind == "write":
        dev.write_attribute(*args)
        return None
    if kind == "event":
        events: list[tango.EventData] = []
        sub = dev.subscribe_event(args[0], tango.EventType.CHANGE_EVENT, events.append)
        try:
            deadline = time.monotonic() + 10
            while not any(not e.err for e in events) and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            dev.unsubscribe_event(sub)
        good = [e for e in events if not e.err]
        if not good:
            errors = [e.errors[0].desc for e in events if e.err]
            tango.Except.throw_exception("NoEvent", f"no event within 10 s: {errors}", "client_main")
        return _plain(good[0].attr_value.value)
    raise ValueError(f"unknown call {kind!r}")


def _plain(value: Any) -> Any:
    if isinstance(value, tango.DevState):
        return str(value)
    return value.tolist() if hasattr(value, "tolist") else value


def run_client(tango_host: str, user: str, calls: list[list], extra_env: dict[str, str] | None = None) -> dict:
    """Make ``calls`` ([label, kind, device, *args]) from a client process of ``user``; their outcomes by label."""
    account = pwd.getpwnam(user)
    env = {  # the account's own environment: nothing of this process's (no SUPER_TANGO, no ACCESS_DEVNAME)
        "PATH": "/usr/bin:/bin",
        "HOME": account.pw_dir,
        "USER": user,
        "LOGNAME": user,
        "LANG": "C.UTF-8",
        "TANGO_HOST": tango_host,
        **(extra_env or {}),
    }
    request = {"tango_host": tango_host, "user": user, "calls": calls}
    proc = subprocess.run(
        [sys.executable, "-c", "from tests.test_access_control import client_main; client_main()"],
        input=json.dumps(request), capture_output=True, text=True, timeout=180, cwd=ROOT, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, f"client of {user} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    outcomes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outcomes.pop("euid") == account.pw_uid
    return outcomes


# -- the controlled facility ----------------------------------------------------------------------
@dataclass
class Controlled:
    """The database with access control on, its pipeline, and the two accounts."""

    tango_host: str
    access: AccessControl
    pipeline: Deployed
    definition: PipelineDefinition
    reader: str
    writer: str

    def proxy(self, name: str) -> tango.DeviceProxy:
        return self.pipeline.proxy(name)

    def database(self) -> tango.Database:
        host, port = self.tango_host.split(":")
        return tango.Database(host, int(port))

    def client(self, calls: list[list], **kwargs: Any) -> dict:
        return run_client(self.tango_host, self.reader, calls, **kwargs)

    @property
    def master(self) -> str:
        return self.definition.master_name

    @property
    def worker(self) -> str:
        return self.definition.worker_name("main", 1)

    @property
    def sink(self) -> str:
        return self.definition.sink_name

    @property
    def bridge(self) -> str:
        return self.definition.lavue_bridge_name("view")


@pytest.fixture(scope="module")
def controlled(tmp_path_factory):
    """A facility database with access control on (``*`` read, the deploying account write) and a pipeline."""
    reader = read_only_account()
    writer = deploying_user()
    folder = tmp_path_factory.mktemp("access-control")
    facility = FacilityDatabase(folder / "facility-db")
    access = AccessControl(facility, folder)
    pipeline = None
    try:
        tango_host = facility.start()
        access.start()
        access.set_rights("*", "read")  # anyone not named: read-only
        access.set_rights(writer, "write")  # the deploying account, whose servers are clients too
        access.set_rights(reader, "read")
        access.switch_on()
        config = folder / "pipeline.yaml"
        config.write_text(yaml.safe_dump(PIPELINE))
        pipeline = Deployed(folder, config, env=dict(user_env(folder / "state"), TANGO_HOST=tango_host))
        yield Controlled(tango_host, access, pipeline, load_definition(config), reader, writer)
    finally:
        if pipeline is not None:
            pipeline.down()
            wait_for(lambda: not pids_alive(pipeline.session["servers"].values()), 30, "the servers to exit")
        access.stop()
        facility.stop()


def test_access_control_is_on_for_the_database(controlled):
    services = list(controlled.database().get_property("CtrlSystem", "Services")["Services"])
    assert f"AccessControl/tango:{AccessControl.device}" in services, services
    addresses = ["192.0.2.10"]  # the client library sends its host's addresses; '*.*.*.*' admits any
    assert controlled.access.rights(controlled.reader, controlled.master, addresses) == "read"
    assert controlled.access.rights("someone-else", controlled.master, addresses) == "read"
    assert controlled.access.rights(controlled.writer, controlled.master, addresses) == "write"


def test_read_only_user_reads_attributes_and_receives_events(controlled):
    attrs = ["State", "Status", "Counters", "FramesIn", "DataEndpoint"]
    out = controlled.client([
        ["master", "read", controlled.master, attrs],
        ["worker", "read", controlled.worker, [*attrs, "StepChain", "ConfigVersion"]],
        ["sink", "read", controlled.sink, [*attrs, "LatestIndex", "QueryEndpoint"]],
        ["bridge", "read", controlled.bridge, [*attrs, "PublishRateHz"]],
        ["status", "command", controlled.master, "Status"],  # State and Status are always allowed
        ["event", "event", controlled.master, "FramesIn"],
    ])  # fmt: skip
    for label in ("master", "worker", "sink", "bridge"):
        assert out[label]["ok"], out[label]
        values = out[label]["value"]
        assert values["State"] in ("ON", "RUNNING"), values
        assert "DataEndpoint" in values, values
        assert json.loads(values["Counters"])["FramesIn"] == values["FramesIn"], values
    for label in ("master", "sink"):  # the stages peers connect to
        assert out[label]["value"]["DataEndpoint"].startswith("tcp://"), out[label]
    assert out["status"]["ok"] and out["status"]["value"], out["status"]
    assert out["event"]["ok"] and isinstance(out["event"]["value"], int), out["event"]


def test_read_only_user_cannot_start_scans_reconfigure_write_or_init(controlled):
    worker_server = controlled.definition.worker_spec("main", 1).server
    before = {
        "scan": controlled.proxy(controlled.master).ScanId,
        "version": controlled.proxy(controlled.worker).ConfigVersion,
        "chain": controlled.proxy(controlled.worker).StepChain,
        "rate": controlled.proxy(controlled.bridge).PublishRateHz,
    }
    out = controlled.client([
        ["StartScan", "command", controlled.master, "StartScan", json.dumps({"frames": 3})],
        ["EndScan", "command", controlled.master, "EndScan"],
        ["Stop", "command", controlled.master, "Stop"],
        ["Reconfigure", "command", controlled.worker, "Reconfigure", json.dumps(["passthrough"])],
        ["Init", "command", controlled.worker, "Init"],
        ["InitMaster", "command", controlled.master, "Init"],
        ["Kill", "command", f"dserver/{worker_server}", "Kill"],
        ["write", "write", controlled.bridge, "PublishRateHz", 3.0],
        ["property", "put_property", controlled.worker, {"Steps": ["[]"]}],
    ])  # fmt: skip
    refused = {
        "StartScan": f"Command StartScan on device {controlled.master} is not authorized",
        "EndScan": f"Command EndScan on device {controlled.master} is not authorized",
        "Stop": f"Command Stop on device {controlled.master} is not authorized",
        "Reconfigure": f"Command Reconfigure on device {controlled.worker} is not authorized",
        "Init": f"Command Init on device {controlled.worker} is not authorized",
        "InitMaster": f"Command Init on device {controlled.master} is not authorized",
        "Kill": f"Command Kill on device dserver/{worker_server.lower()} is not authorized",
        "write": f"Writing attribute(s) on device {controlled.bridge} is not authorized",
        "property": "Command DbPutDeviceProperty on device sys/database/2 is not authorized",
    }
    for label, desc in refused.items():
        assert (out[label]["ok"], out[label].get("reason")) == (False, DENIED), (label, out[label])
        assert out[label]["desc"].lower() == desc.lower(), (label, out[label])

    # refused by the client library: nothing reached the pipeline
    assert controlled.proxy(controlled.master).ScanId == before["scan"]
    assert not controlled.proxy(controlled.master).ScanOpen
    assert controlled.proxy(controlled.worker).ConfigVersion == before["version"]
    assert controlled.proxy(controlled.worker).StepChain == before["chain"]
    assert controlled.proxy(controlled.bridge).PublishRateHz == before["rate"]
    steps = controlled.database().get_device_property(controlled.worker, "Steps")["Steps"]
    assert json.loads(steps[0]) == ["passthrough"], list(steps)
    servers = list(controlled.pipeline.session["servers"].values())
    assert pids_alive(servers) == servers  # none was killed


def test_deploying_user_scans_and_read_only_user_queries_the_results(controlled):
    pipeline = controlled.pipeline
    result = json.loads(tangopipe("scan", "--frames", "5", env=pipeline.env, cwd=pipeline.folder).stdout)
    assert result["acquired"] == 5, result
    scan = int(controlled.proxy(controlled.master).ScanId)
    sink = controlled.proxy(controlled.sink)
    wait_for(lambda: sink.LatestIndex == 4, 60, "the sink to hold the scan's 5 results")

    db = controlled.database()
    for cls in dict.fromkeys(spec.cls for spec in controlled.definition.devices()):
        allowed = list(db.get_class_property(cls, "AllowedAccessCmd")["AllowedAccessCmd"])
        assert set(READ_ONLY_COMMANDS[cls]) <= set(allowed), (cls, allowed)  # set by `tangopipe up`

    query = {"scan": scan, "stream": "main", "index": 4}
    out = controlled.client([
        ["ListDatasets", "command", controlled.sink, "ListDatasets"],
        ["GetResult", "command", controlled.sink, "GetResult", json.dumps(query)],
        *[[f"BadMessageReasons {name}", "command", name, "BadMessageReasons"]
          for name in (spec.name for spec in controlled.definition.devices())],
        ["StartScan", "command", controlled.master, "StartScan", "{}"],
    ])  # fmt: skip
    assert out.pop("StartScan")["reason"] == DENIED
    assert all(o["ok"] for o in out.values()), out
    datasets = json.loads(out["ListDatasets"]["value"])
    assert any(str(d["scan"]) == str(scan) and d["frames"] == 5 for d in datasets), datasets
    got = json.loads(out["GetResult"]["value"])
    assert (str(got["scan"]), got["index"]) == (str(scan), 4), got


def test_allow_read_only_commands_keeps_what_the_facility_allowed(controlled):
    db = controlled.database()
    db.put_class_property("PipelineWriter", {"AllowedAccessCmd": ["FacilityReadCommand"]})
    changed = allow_read_only_commands(db)
    assert changed["PipelineWriter"] == ["FacilityReadCommand", "BadMessageReasons"]
    assert "PipelineSink" not in changed  # already there since the pipeline was deployed
    assert allow_read_only_commands(db) == {}


def test_super_tango_in_the_client_lifts_the_check(controlled):
    """The check is made by the client's own library: SUPER_TANGO=true (or a patched
    library) skips it, so access control guards against mistakes, not a hostile client."""
    version = controlled.proxy(controlled.worker).ConfigVersion
    call = ["Reconfigure", "command", controlled.worker, "Reconfigure", "not json"]
    checked = controlled.client([call])["Reconfigure"]
    assert checked["reason"] == DENIED, checked
    unchecked = controlled.client([call], extra_env={"SUPER_TANGO": "true"})["Reconfigure"]
    assert not unchecked["ok"] and unchecked["reason"] != DENIED, unchecked
    assert "not valid JSON" in unchecked["desc"], unchecked  # the worker itself refused the argument
    assert controlled.proxy(controlled.worker).ConfigVersion == version
