"""Deploying a pipeline for Starter (Astor): server info and executables.

Beamline staff start and stop Tango servers with Astor, which asks the Starter
device of each host (``tango/admin/<host>``) to run ``<StartDsPath>/<Server>
<instance>``. ``tangopipe deploy`` registers the pipeline in the facility's
database with that information (host, startup level, controlled) and writes one
small wrapper per server class into a folder for ``StartDsPath``: Starter runs
executables by class name and knows nothing of Python environments, so the
wrapper execs this installation's console script.

    tangopipe deploy config/demo.yaml --starter /opt/tangopipe/bin [--set-starter-path]
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import socket
import sys
from pathlib import Path

import tango

from pipelines.definition import PipelineDefinition, load_definition

from .database import DeploymentError, database, executable, register
from .deploy import prepare_secrets

#: Starter's startup level per role: upstream first, so each device finds what it reads.
STARTUP_LEVELS = {"master": 1, "sorter": 2, "worker": 3, "sink": 4, "writer": 4, "lavue": 4}
#: the server classes every pipeline has (more are found in devices/, e.g. LavueBridge)
SERVER_CLASSES = ("PipelineMaster", "PipelineWorker", "PipelineSorter", "PipelineSink", "PipelineWriter")
LAST_LEVEL = 4
CONTROLLED = 1


def short_hostname() -> str:
    """This machine's name as Starter uses it for its device (tango/admin/<host>)."""
    return socket.gethostname().split(".")[0]


def starter_device(host: str) -> str:
    return f"tango/admin/{host}"


_SERVER_CLASS = re.compile(r"^class (\w+)\((?:PipelineDevice|Device)\):", re.M)


def server_classes() -> dict[str, str]:
    """Every tangopipe server class -> its module: the device classes of devices/*.py that
    have a server entry point (``main``), e.g. PipelineMaster, ..., LavueBridge."""
    found: dict[str, str] = {}
    for path in sorted(Path(__file__).parent.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        if "\ndef main(" not in text:
            continue
        for cls in _SERVER_CLASS.findall(text):
            found[cls] = f"devices.{path.stem}"
    return found


def _console_script(server_class: str) -> str | None:
    try:
        return executable(server_class)
    except DeploymentError:
        return None


def wrapper_script(server_class: str, module: str) -> str:
    """Shell script Starter runs as ``<server_class> INSTANCE [ARGS]``: this installation's server.

    It execs the console script of that name; a class whose console script is not
    installed (yet) is run from its module, with the server name Tango expects.
    """
    lines = [
        "#!/bin/sh",
        f"# Starter (Astor) runs this as '{server_class} INSTANCE [options]': it starts the tangopipe",
        f"# server {server_class} of the Python environment {sys.prefix}.",
        "# Written by 'tangopipe deploy --starter'; run that again after moving the installation.",
    ]
    if sys.prefix != sys.base_prefix:  # a virtual environment: make it the active one
        lines += [
            f"VIRTUAL_ENV={shlex.quote(sys.prefix)}",
            'PATH="$VIRTUAL_ENV/bin:$PATH"',
            "export VIRTUAL_ENV PATH",
        ]
    script = _console_script(server_class)
    if script is not None:
        lines.append(f'exec {shlex.quote(script)} "$@"')
    else:
        code = f"import sys; sys.argv[0] = {server_class!r}; from {module} import main; main()"
        lines.append(f'exec {shlex.quote(sys.executable)} -c {shlex.quote(code)} "$@"')
    return "\n".join(lines) + "\n"


def write_wrappers(folder: Path, classes: dict[str, str] | None = None) -> list[Path]:
    """Write one executable wrapper per server class (class -> module) into ``folder``."""
    folder = Path(folder).expanduser().resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DeploymentError(f"--starter {folder}: cannot create the folder ({exc.strerror})") from None
    written = []
    for cls, module in (classes or server_classes()).items():
        path = folder / cls
        text = wrapper_script(cls, module)
        try:
            tmp = path.with_name(f".{cls}.tmp")
            tmp.write_text(text)
            tmp.chmod(0o755)
            tmp.replace(path)  # atomic: a Starter starting a server never sees half a script
        except OSError as exc:
            raise DeploymentError(f"--starter {folder}: cannot write {path.name} ({exc.strerror})") from None
        written.append(path)
    return written


def pipeline_servers(definition: PipelineDefinition) -> dict[str, str]:
    """server ("PipelineMaster/demo") -> role, upstream first."""
    return {spec.server: spec.role for spec in definition.devices()}


def stale_servers(db: tango.Database, definition: PipelineDefinition) -> list[str]:
    """Servers registered for this pipeline's devices that the definition no longer has
    (e.g. workers after the group shrank)."""
    wanted = set(pipeline_servers(definition))
    prefix = f"{definition.name}/".lower()
    stale = []
    for cls in dict.fromkeys(spec.cls for spec in definition.devices()):
        for instance in db.get_instance_name_list(cls).value_string:
            server = f"{cls}/{instance}"
            if server in wanted:
                continue
            names = db.get_device_class_list(server).value_string[::2]
            if any(n.lower().startswith(prefix) for n in names if not n.lower().startswith("dserver/")):
                stale.append(server)
    return stale


def running_servers(db: tango.Database, servers: list[str]) -> list[str]:
    """Those of ``servers`` that are exported and answer."""
    running = []
    for server in servers:
        admin = f"dserver/{server}"
        try:
            if not db.get_device_info(admin).exported:
                continue
            proxy = tango.DeviceProxy(f"tango://{db.get_db_host()}:{db.get_db_port()}/{admin}")
            proxy.set_timeout_millis(1500)
            proxy.ping()
        except tango.DevFailed:
            continue
        running.append(server)
    return running


def record_host(db: tango.Database, server: str, host: str) -> None:
    """Make ``host``'s Starter list ``server`` before its first start.

    A Starter asks the database for its host's servers (DbGetHostServersInfo), which
    answers from the host where each server's devices last ran; a server that never
    ran has none. Exporting and at once unexporting the server's admin device records
    the host and leaves it as any stopped server (not exported), as Astor shows it.
    """
    admin = f"dserver/{server}"
    info = tango.DbDevExportInfo()
    info.name, info.ior, info.host, info.version, info.pid = admin, "nada", host, "0", 0
    db.export_device(info)
    db.unexport_device(admin)


def deploy(
    definition: PipelineDefinition, db: tango.Database, host: str | None = None
) -> list[tuple[str, str, int]]:
    """Register the pipeline and its Starter information; return (server, host, level) rows.

    Refuses while a server of the pipeline runs: registering again would pull its
    devices from under it.
    """
    host = host or definition.host or short_hostname()
    servers = pipeline_servers(definition)
    stale = stale_servers(db, definition)
    running = running_servers(db, [*servers, *stale])
    if running:
        raise DeploymentError(
            f"{', '.join(running)} running: stop the pipeline's servers (Astor, or 'tangopipe down') and deploy again"
        )
    for server in stale:
        db.delete_server(server)
    register(db, definition)
    rows = []
    for server, role in servers.items():
        info = tango.DbServerInfo()
        info.name = server
        info.host = host
        info.mode = CONTROLLED
        info.level = STARTUP_LEVELS.get(role, LAST_LEVEL)
        db.put_server_info(info)
        record_host(db, server, host)
        rows.append((server, host, info.level))
    return rows


def check_starter_registered(db: tango.Database, host: str) -> None:
    device = starter_device(host)
    try:
        db.get_device_info(device)
    except tango.DevFailed:
        raise DeploymentError(
            f"--set-starter-path: the Starter device {device} is not registered in the Tango database; "
            f"register it with 'tango_admin --add-server Starter/{host} Starter {device}' (or Astor) first"
        ) from None


def set_starter_path(db: tango.Database, host: str, folder: Path) -> list[str]:
    """Add ``folder`` to the StartDsPath property of the Starter of ``host``; return the new path list."""
    check_starter_registered(db, host)
    device = starter_device(host)
    current = list(db.get_device_property(device, ["StartDsPath"])["StartDsPath"])
    folder_text = str(Path(folder).expanduser().resolve())
    if folder_text not in current:
        current.append(folder_text)
        db.put_device_property(device, {"StartDsPath": current})
    return current


def tell_starter(tango_host: str, host: str, path_changed: bool) -> str:
    """Ask a running Starter to read the new server list (and path); say what happened."""
    device = starter_device(host)
    try:
        starter = tango.DeviceProxy(f"tango://{tango_host}/{device}")
        starter.set_timeout_millis(10000)
        if path_changed:
            starter.command_inout("Init")  # StartDsPath is read at init
        starter.command_inout("UpdateServersInfo")
    except tango.DevFailed:
        return f"Starter {device} is not running: it sees the servers when it starts"
    return f"Starter {device} updated"


# -- the command ---------------------------------------------------------------------------
def cmd_deploy(args: argparse.Namespace) -> int:
    tango_host = os.environ.get("TANGO_HOST")
    if not tango_host:
        raise DeploymentError(
            "deploy registers the pipeline in the facility's Tango database: set TANGO_HOST=host:port"
        )
    definition = load_definition(args.config)
    prepare_secrets(definition)
    host = args.host or definition.host or short_hostname()
    if args.set_starter_path and not args.starter:
        raise DeploymentError("--set-starter-path needs --starter DIR (the folder to add to StartDsPath)")
    db = database(tango_host)
    if args.set_starter_path:
        check_starter_registered(db, host)
    wrappers = write_wrappers(Path(args.starter)) if args.starter else []
    rows = deploy(definition, db, host)
    for server, server_host, level in rows:
        print(f"{server:<36} host {server_host}  level {level}  controlled")
    for path in wrappers:
        print(f"wrapper: {path}")
    changed = False
    if args.set_starter_path:
        before = list(db.get_device_property(starter_device(host), ["StartDsPath"])["StartDsPath"])
        paths = set_starter_path(db, host, Path(args.starter))
        changed = paths != before
        print(f"{starter_device(host)} StartDsPath: {', '.join(paths)}")
    elif wrappers:
        print(
            f"add {wrappers[0].parent} to StartDsPath of {starter_device(host)} (or pass --set-starter-path)"
        )
    print(tell_starter(tango_host, host, changed))
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "deploy",
        help="register a pipeline for Starter/Astor (host, startup levels) and write its server wrappers",
        description="Register the pipeline in the database of TANGO_HOST with Starter information "
        "(host, startup level: master, sorters, workers, sink/writers; controlled) and write one "
        "executable per server class into DIR for the Starter's StartDsPath.",
    )
    p.add_argument("config", help="pipeline definition (YAML)")
    p.add_argument("--starter", metavar="DIR", help="folder for the server wrappers (Starter's StartDsPath)")
    p.add_argument(
        "--host", help="host whose Starter runs the servers (default: the definition's host, or this one)"
    )
    p.add_argument(
        "--set-starter-path", action="store_true", help="add DIR to StartDsPath of tango/admin/<host>"
    )
    p.set_defaults(func=cmd_deploy)
