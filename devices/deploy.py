"""Running a pipeline: the session (what was started), servers, readiness, status.

The session file in the state folder records the Tango host, the embedded
database's PID and every server process started, so that ``status``, ``scan``
and ``down`` find them, and ``down`` stops exactly those processes (by PID).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tango

from pipelines.definition import DeviceSpec, PipelineDefinition, load_definition
from pipelines.security import write_token_file

from .database import (
    DeploymentError,
    database,
    executable,
    pid_alive,
    register,
    start_embedded_database,
    stop_process,
)

READY_STATES = (tango.DevState.ON, tango.DevState.RUNNING)


def state_folder() -> Path:
    return Path(os.environ.get("TANGOPIPE_STATE") or Path.home() / ".local/state/tangopipe").expanduser()


@dataclass
class Session:
    """What ``tangopipe up`` started (saved as state/session.json)."""

    tango_host: str
    config: str
    db_pid: int = 0
    servers: dict[str, int] = field(default_factory=dict)  # "PipelineMaster/demo" -> pid
    started: float = field(default_factory=time.time)
    workers: dict[str, int] = field(default_factory=dict)  # group -> workers after `tangopipe scale`

    def definition(self) -> PipelineDefinition:
        """The pipeline as it runs now: its file, with the worker counts set by scale."""
        definition = load_definition(self.config)
        for group, count in self.workers.items():
            if group in definition.groups:
                definition.groups[group]["workers"] = count
        return definition

    @staticmethod
    def path() -> Path:
        return state_folder() / "session.json"

    def save(self) -> None:
        self.path().parent.mkdir(parents=True, exist_ok=True)
        self.path().write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls) -> Session | None:
        try:
            return cls(**json.loads(cls.path().read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def alive(self) -> bool:
        return (self.db_pid and pid_alive(self.db_pid)) or any(pid_alive(p) for p in self.servers.values())

    @staticmethod
    def clear() -> None:
        Session.path().unlink(missing_ok=True)


def server_command(spec_server: str, loopback: bool) -> list[str]:
    server, instance = spec_server.split("/", 1)
    cmd = [executable(server), instance]
    if loopback:
        cmd += ["-ORBendPoint", "giop:tcp:127.0.0.1:0"]
    return cmd


def start_server(server: str, tango_host: str, loopback: bool) -> int:
    logs = state_folder() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / (server.replace("/", "_") + ".log")
    env = dict(os.environ, TANGO_HOST=tango_host)
    with open(log_path, "a") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {server}\n")
        log.flush()
        proc = subprocess.Popen(
            server_command(server, loopback), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    return proc.pid


def log_file(server: str) -> Path:
    return state_folder() / "logs" / (server.replace("/", "_") + ".log")


def proxy(name: str, tango_host: str, timeout_ms: int = 3000) -> tango.DeviceProxy:
    dev = tango.DeviceProxy(f"tango://{tango_host}/{name}")
    dev.set_timeout_millis(timeout_ms)
    return dev


def device_report(spec: DeviceSpec, tango_host: str) -> dict[str, Any]:
    """Name, class, state, status, endpoint and counters of one device (never raises)."""
    report: dict[str, Any] = {
        "name": spec.name,
        "class": spec.cls,
        "server": spec.server,
        "state": "DOWN",
        "status": f"not running (server {spec.server}; log {log_file(spec.server)})",
        "endpoint": "",
        "counters": {},
    }
    try:
        dev = proxy(spec.name, tango_host, 1500)
        values = dev.read_attributes(["State", "Status", "DataEndpoint", "Counters"])
        report["state"] = str(values[0].value)
        report["status"] = values[1].value
        report["endpoint"] = values[2].value
        report["counters"] = json.loads(values[3].value or "{}")
    except (tango.DevFailed, ValueError):
        pass
    return report


def lavue_report(definition: PipelineDefinition, tango_host: str) -> dict[str, Any]:
    if definition.sink is None:
        return {"address": "", "topics": []}
    try:
        dev = proxy(definition.sink_name, tango_host, 1500)
        return {"address": dev.LavueAddress, "topics": list(dev.LavueTopics or [])}
    except tango.DevFailed:
        return {"address": "", "topics": []}


def expected_links(definition: PipelineDefinition) -> dict[str, tuple[str, int]]:
    """device -> (counter, value) that shows the pipeline is wired: workers at the
    master, consumers at each sorter."""
    links = {definition.master_name: ("Workers", sum(g["workers"] for g in definition.groups.values()))}
    consumers: dict[str, int] = {}
    if definition.sink is not None:
        consumers[definition.sink["group"]] = 1
    for w in [*definition.writers.values(), *definition.lavue_bridges.values()]:
        consumers[w["group"]] = consumers.get(w["group"], 0) + 1
    for group, count in consumers.items():
        links[definition.sorter_name(group)] = ("Consumers", count)
    return links


def wait_ready(
    definition: PipelineDefinition,
    tango_host: str,
    timeout: float = 60.0,
    session: Session | None = None,
    servers: list[str] | None = None,
) -> None:
    """Wait until every device (of ``servers``, default all) is ON and the pipeline is
    wired; raise naming what is not. With ``servers``, ALARM counts as ready too (a
    server restarted into a pipeline that is still recovering from its absence)."""
    deadline = time.monotonic() + timeout
    links = expected_links(definition)
    ready = ("ON", "RUNNING", "ALARM") if servers else ("ON", "RUNNING")
    while True:
        problems = []
        for spec in definition.devices():
            if servers and spec.server not in servers:
                continue
            report = device_report(spec, tango_host)
            if report["state"] == "FAULT":
                raise DeploymentError(f"{spec.name} is in FAULT: {report['status']}")
            if report["state"] not in ready:
                problems.append(f"{spec.name}: {report['state']} ({report['status']})")
                if session is not None and spec.server in session.servers and not pid_alive(session.servers[spec.server]):
                    raise DeploymentError(f"server {spec.server} exited; see {log_file(spec.server)}")
                continue
            if spec.name in links:
                key, want = links[spec.name]
                if report["counters"].get(key, 0) < want:
                    problems.append(f"{spec.name}: {key} {report['counters'].get(key, 0)} of {want}")
        if not problems:
            return
        if time.monotonic() > deadline:
            raise DeploymentError(f"pipeline not ready after {timeout:.0f} s:\n  " + "\n  ".join(problems))
        time.sleep(0.3)


def prepare_secrets(definition: PipelineDefinition) -> None:
    """Say what the pipeline leaves open to other hosts; make the query token file if the
    definition names one that does not exist yet (mode 600)."""
    for warning in definition.security_warnings():
        print(f"tangopipe: warning: {warning}", file=sys.stderr)
    token_file = definition.security["query_token_file"]
    if token_file and write_token_file(token_file):
        print(f"tangopipe: made the query token file {token_file} (mode 600); clients read it: "
              f"SinkClient(endpoint, token_file=...) or TANGOPIPE_QUERY_TOKEN_FILE", file=sys.stderr)


def up(config: str, tango_host: str | None = None, timeout: float = 90.0) -> Session:
    """Register the pipeline, start a database if needed, start servers, wait until ready."""
    definition = load_definition(config)
    prepare_secrets(definition)
    old = Session.load()
    if old is not None and old.alive():
        raise DeploymentError(
            f"a pipeline is already up ({old.config}, TANGO_HOST={old.tango_host}); run 'tangopipe down' first"
        )
    db_pid = 0
    if not tango_host:
        db_pid, tango_host = start_embedded_database(state_folder())
    session = Session(tango_host=tango_host, config=str(Path(config).resolve()), db_pid=db_pid)
    session.save()
    try:
        register(database(tango_host), definition)
        loopback = definition.loopback
        for server in dict.fromkeys(s.server for s in definition.devices()):
            session.servers[server] = start_server(server, tango_host, loopback)
            session.save()
        wait_ready(definition, tango_host, timeout, session)
    except BaseException:
        down(session)
        raise
    return session


def scale(session: Session, group: str, count: int, timeout: float = 60.0) -> dict[str, list[str]]:
    """Start or stop workers of ``group`` until it has ``count``; works while a scan runs.

    New workers are registered with the group's properties (so they find the master
    and the sorter) and started; surplus workers (highest numbers first) are stopped
    cleanly, their frames going to the others, and removed from the database.
    """
    definition = session.definition()
    if group not in definition.groups:
        raise DeploymentError(f"no worker group {group!r}; groups are {', '.join(definition.groups)}")
    if count < 0:
        raise DeploymentError(f"worker count must be >= 0, got {count}")
    current = definition.groups[group]["workers"]
    db = database(session.tango_host)
    loopback = definition.loopback
    added, removed = [], []
    for n in range(current + 1, count + 1):
        spec = definition.worker_spec(group, n)
        register(db, definition, [spec])
        session.servers[spec.server] = start_server(spec.server, session.tango_host, loopback)
        added.append(spec.name)
    for n in range(current, count, -1):
        spec = definition.worker_spec(group, n)
        pid = session.servers.pop(spec.server, 0)
        try:
            proxy(f"dserver/{spec.server}", session.tango_host, 2000).command_inout("Kill")
        except tango.DevFailed:
            pass
        if pid:
            deadline = time.monotonic() + 5
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            stop_process(pid)
        db.delete_server(spec.server)
        removed.append(spec.name)
    session.workers[group] = count
    session.save()
    definition.groups[group]["workers"] = count
    if added:
        wait_ready(definition, session.tango_host, timeout, session)
    return {"added": added, "removed": removed}


def restart(session: Session, servers: list[str] | None = None, timeout: float = 60.0) -> list[str]:
    """Start again the servers of the pipeline that are not running (all, or those named:
    ``PipelineSorter/demo`` or just ``demo`` when that is unambiguous); wait until ready.

    The restarted devices find their peers again through the database, and their
    peers find them: a killed server is back in the pipeline without touching the rest.
    """
    definition = session.definition()
    wanted = list(session.servers) if not servers else [_server_named(session, name) for name in servers]
    loopback = definition.loopback
    started = []
    for server in wanted:
        if pid_alive(session.servers[server]):
            if servers:
                raise DeploymentError(f"server {server} is running (PID {session.servers[server]}); nothing to restart")
            continue
        session.servers[server] = start_server(server, session.tango_host, loopback)
        started.append(server)
    session.save()
    if started:
        wait_ready(definition, session.tango_host, timeout, session, servers=started)
    return started


def _server_named(session: Session, name: str) -> str:
    matches = [s for s in session.servers if s == name or s.split("/", 1)[1] == name or s.split("/", 1)[0] == name]
    if len(matches) != 1:
        known = ", ".join(session.servers)
        raise DeploymentError(f"{'no' if not matches else 'more than one'} server matches {name!r}; servers: {known}")
    return matches[0]


def down(session: Session | None = None, grace: float = 5.0) -> list[str]:
    """Stop the servers (cleanly through Tango, then by PID), then the embedded database."""
    session = session or Session.load()
    if session is None:
        return []
    stopped = []
    for server, pid in session.servers.items():
        if pid_alive(pid):
            try:
                proxy(f"dserver/{server}", session.tango_host, 2000).command_inout("Kill")
            except tango.DevFailed:
                pass
    for server, pid in session.servers.items():
        deadline = time.monotonic() + grace
        while pid_alive(pid) and time.monotonic() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.05)
        stop_process(pid)
        stopped.append(server)
    if session.db_pid:
        stop_process(session.db_pid)
        stopped.append("PyDatabaseds")
    Session.clear()
    return stopped
