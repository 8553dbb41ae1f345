"""The Tango database side of deployment: the embedded database and registration.

When no ``TANGO_HOST`` is given, tangopipe runs its own database: pytango-db's
``PyDatabaseds`` on a sqlite file in the state folder, reused next time. A
pipeline definition is registered as servers, devices and properties, so Jive
shows the pipeline and Starter can start its servers, together with the commands
that users who are read-only under Tango access control may still run.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import tango

from pipelines.definition import DeviceSpec, PipelineDefinition

_PORT_LINE = re.compile(r"Database DS listening on:.*, port=(\d+)")


class DeploymentError(RuntimeError):
    """Something the user must fix to deploy (message says what and how)."""


def executable(name: str) -> str:
    """Path of a console script installed beside this Python (or on PATH)."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise DeploymentError(f"{name} is not installed: run 'pip install -e .' in the tangopipe folder")
    return found


def start_embedded_database(state: Path, timeout: float = 30.0) -> tuple[int, str]:
    """Start PyDatabaseds on ``state/tango.sqlite``; return (pid, "127.0.0.1:port")."""
    state.mkdir(parents=True, exist_ok=True)
    log_path = state / "logs" / "PyDatabaseds.log"
    log_path.parent.mkdir(exist_ok=True)
    env = dict(os.environ, PYTANGO_DATABASE_NAME=str(state / "tango.sqlite"))
    env.pop("TANGO_HOST", None)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [executable("PyDatabaseds"), "--port", "0", "--host", "127.0.0.1", "--print-host-port", "2"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    port = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeploymentError(f"the embedded Tango database exited ({proc.returncode}); see {log_path}")
        match = _PORT_LINE.search(log_path.read_text(errors="replace"))
        if match:
            port = int(match.group(1))
            break
        time.sleep(0.1)
    if port is None:
        stop_process(proc.pid)
        raise DeploymentError(f"the embedded Tango database did not start within {timeout:.0f} s; see {log_path}")
    host = f"127.0.0.1:{port}"
    while time.monotonic() < deadline:
        try:
            tango.Database("127.0.0.1", port).get_info()
            return proc.pid, host
        except tango.DevFailed:
            time.sleep(0.2)
    stop_process(proc.pid)
    raise DeploymentError(f"the embedded Tango database at {host} does not answer; see {log_path}")


def database(tango_host: str) -> tango.Database:
    host, _, port = tango_host.rpartition(":")
    try:
        return tango.Database(host, int(port))
    except (tango.DevFailed, ValueError) as exc:
        raise DeploymentError(f"no Tango database answers at TANGO_HOST={tango_host}: start it or fix TANGO_HOST") from exc


def register(db: tango.Database, definition: PipelineDefinition, specs: list[DeviceSpec] | None = None) -> None:
    """Register (or re-register) the pipeline's servers, devices and properties."""
    specs = definition.devices() if specs is None else specs
    for server in dict.fromkeys(s.server for s in specs):
        try:
            if server in db.get_server_list(server).value_string:
                db.delete_server(server)
        except tango.DevFailed:
            pass
    for spec in specs:
        info = tango.DbDevInfo()
        info.name = spec.name
        info._class = spec.cls
        info.server = spec.server
        db.add_device(info)
        db.put_device_property(spec.name, spec.tango_properties())
    allow_read_only_commands(db, {s.cls for s in specs})


#: Commands that only read, per device class: Tango access control lets read-only
#: users run them (class property ``AllowedAccessCmd``). State and Status are
#: always allowed by the access-control service itself.
READ_ONLY_COMMANDS: dict[str, tuple[str, ...]] = {
    "PipelineMaster": ("BadMessageReasons",),
    "PipelineWorker": ("BadMessageReasons",),
    "PipelineSorter": ("BadMessageReasons",),
    "PipelineSink": ("BadMessageReasons", "ListDatasets", "GetResult", "GetSlice", "GetMap"),
    "PipelineWriter": ("BadMessageReasons",),
    "LavueBridge": ("BadMessageReasons",),
}


def allow_read_only_commands(db: tango.Database, classes: Iterable[str] | None = None) -> dict[str, list[str]]:
    """Let read-only users of a database with Tango access control run the commands that only read.

    Adds them to each class's ``AllowedAccessCmd`` property, keeping what the
    facility put there; without an access-control service the property is unused.
    Returns the property of every class that was changed.
    """
    changed: dict[str, list[str]] = {}
    for cls in READ_ONLY_COMMANDS if classes is None else classes:
        wanted = READ_ONLY_COMMANDS.get(cls, ())
        if not wanted:
            continue
        current = list(db.get_class_property(cls, ["AllowedAccessCmd"])["AllowedAccessCmd"])
        missing = [c for c in wanted if c.lower() not in {have.lower() for have in current}]
        if missing:
            changed[cls] = current + missing
            db.put_class_property(cls, {"AllowedAccessCmd": changed[cls]})
    return changed


def unregister(db: tango.Database, servers: list[str]) -> None:
    for server in servers:
        try:
            db.delete_server(server)
        except tango.DevFailed:
            pass


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def stop_process(pid: int, grace: float = 5.0) -> bool:
    """SIGTERM, then SIGKILL after ``grace`` seconds; True if it is gone."""
    if not pid_alive(pid):
        return True
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap(pid)
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    for _ in range(100):
        _reap(pid)
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
