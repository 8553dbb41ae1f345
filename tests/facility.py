"""The facility's kind of Tango database for tests: C++ DataBaseds on MariaDB, and Starter.

Beamlines run the Debian ``tango-db`` package (DataBaseds 9.3 on MariaDB), not
pytango-db; these helpers start a private one, so tests run against the real
thing without touching a system service: a MariaDB server on its own data folder,
socket and loopback port, the ``tango`` schema of the Debian package loaded into
it, and ``/usr/lib/tango/DataBaseds 2`` on a free loopback port; on request
Debian's Starter and TangoAccessControl servers. Everything is stopped by PID.
The packages come from ``.ci/system-packages.sh``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tango

from devices.database import pid_alive, stop_process

DATABASEDS = Path("/usr/lib/tango/DataBaseds")
STARTER = Path("/usr/lib/tango/Starter")
ACCESS_CONTROL = Path("/usr/lib/tango/TangoAccessControl")
TANGO_SCHEMA = Path("/usr/share/dbconfig-common/data/tango-db/install/mysql")
MYSQL_USER = "tango"
MYSQL_PASSWORD = "tango-test-password"
MYSQL_DATABASE = "tango"
INSTALL_HINT = "install the system packages: sudo .ci/system-packages.sh"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        raise RuntimeError(f"{name} not found: {INSTALL_HINT}")
    return path


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait(predicate, timeout: float, what: str, pid: int, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if not pid_alive(pid):
            raise RuntimeError(f"{what}: the process exited; {log}:\n{_log_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {timeout:.0f} s; {log}:\n{_log_tail(log)}")
        time.sleep(0.2)


@dataclass
class MariaDB:
    """A private MariaDB server: its own data folder, socket and loopback port."""

    folder: Path
    pid: int = 0
    port: int = 0

    @property
    def socket(self) -> Path:
        return self.folder / "mysqld.sock"

    @property
    def log(self) -> Path:
        return self.folder / "mysqld.log"

    def client(self, *args: str, stdin: str | None = None) -> str:
        """Run the mariadb client as the server's root user; return its output."""
        cmd = [_tool("mariadb"), "--no-defaults", f"--socket={self.socket}", "--user=root", *args]
        proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"mariadb {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def start(self, timeout: float = 60.0) -> None:
        data = self.folder / "data"
        self.folder.mkdir(parents=True, exist_ok=True)
        as_root = ["--user=root"] if os.geteuid() == 0 else []  # mariadbd refuses root unless told
        install = subprocess.run(
            [
                _tool("mariadb-install-db"),
                "--no-defaults",
                f"--datadir={data}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--innodb-log-file-size=16M",
                *as_root,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if install.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed: {install.stdout[-2000:]}{install.stderr[-2000:]}")
        self.port = free_port()
        with open(self.log, "w") as log:
            proc = subprocess.Popen(
                [
                    _tool("mariadbd"),
                    "--no-defaults",
                    f"--datadir={data}",
                    f"--socket={self.socket}",
                    f"--port={self.port}",
                    "--bind-address=127.0.0.1",
                    f"--pid-file={self.folder / 'mysqld.pid'}",
                    "--innodb-buffer-pool-size=32M",
                    "--innodb-log-file-size=16M",
                    "--skip-log-bin",
                    "--max-connections=200",
                    *as_root,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = proc.pid
        _wait(self._answers, timeout, "MariaDB", self.pid, self.log)

    def _answers(self) -> bool:
        proc = subprocess.run(
            [_tool("mariadb-admin"), "--no-defaults", f"--socket={self.socket}", "--user=root", "ping"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return proc.returncode == 0

    def create_tango_database(self) -> None:
        """The ``tango`` database, its user, and the schema of Debian's tango-db package."""
        if not TANGO_SCHEMA.exists():
            raise RuntimeError(f"{TANGO_SCHEMA} not found: {INSTALL_HINT}")
        grants = [f"CREATE DATABASE IF NOT EXISTS {MYSQL_DATABASE};"]
        for host in ("localhost", "127.0.0.1"):
            grants += [
                f"CREATE USER IF NOT EXISTS '{MYSQL_USER}'@'{host}' IDENTIFIED BY '{MYSQL_PASSWORD}';",
                f"GRANT ALL PRIVILEGES ON {MYSQL_DATABASE}.* TO '{MYSQL_USER}'@'{host}';",
            ]
        self.client(stdin="\n".join(grants))
        self.client(MYSQL_DATABASE, stdin=TANGO_SCHEMA.read_text())

    def stop(self) -> None:
        if self.pid:
            stop_process(self.pid, grace=30)  # SIGTERM: a clean shutdown
            self.pid = 0
        shutil.rmtree(self.folder / "data", ignore_errors=True)  # ~100 MB; the log stays


@dataclass
class FacilityDatabase:
    """MariaDB + the C++ DataBaseds, as a beamline runs them."""

    folder: Path
    mariadb: MariaDB = field(init=False)
    pid: int = 0
    tango_host: str = ""

    def __post_init__(self) -> None:
        self.mariadb = MariaDB(self.folder / "mariadb")

    @property
    def log(self) -> Path:
        return self.folder / "DataBaseds.log"

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "TANGO_HOST"}
        env.update(
            MYSQL_HOST=f"127.0.0.1:{self.mariadb.port}",
            MYSQL_USER=MYSQL_USER,
            MYSQL_PASSWORD=MYSQL_PASSWORD,
            MYSQL_DATABASE=MYSQL_DATABASE,
        )
        return env

    def start(self, timeout: float = 60.0) -> str:
        if not DATABASEDS.exists():
            raise RuntimeError(f"{DATABASEDS} not found: {INSTALL_HINT}")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.mariadb.start()
        self.mariadb.create_tango_database()
        port = free_port()
        with open(self.log, "w") as log:
            proc = subprocess.Popen(
                [str(DATABASEDS), "2", "-ORBendPoint", f"giop:tcp:127.0.0.1:{port}"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                start_new_session=True,
            )
        self.pid = proc.pid
        self.tango_host = f"127.0.0.1:{port}"
        _wait(self._answers, timeout, "DataBaseds", self.pid, self.log)
        return self.tango_host

    def _answers(self) -> bool:
        try:
            host, port = self.tango_host.split(":")
            tango.Database(host, int(port)).get_info()
            return True
        except tango.DevFailed:
            return False

    def database(self) -> tango.Database:
        host, port = self.tango_host.split(":")
        return tango.Database(host, int(port))

    def stop(self) -> None:
        if self.pid:
            stop_process(self.pid)
            self.pid = 0
        self.mariadb.stop()


@dataclass
class Starter:
    """Debian's Starter for this host, registered in and talking to ``tango_host``."""

    tango_host: str
    host: str
    folder: Path
    pid: int = 0

    @property
    def device(self) -> str:
        return f"tango/admin/{self.host}"

    @property
    def log(self) -> Path:
        return self.folder / "Starter.log"

    @property
    def log_home(self) -> Path:
        """LogFileHome: Starter's own log and its servers' output."""
        return self.folder / "logs"

    def register(self) -> None:
        """The Starter device of this host, with its log folder; servers only on request."""
        host, port = self.tango_host.split(":")
        db = tango.Database(host, int(port))
        info = tango.DbDevInfo()
        info.name, info._class, info.server = self.device, "Starter", f"Starter/{self.host}"
        db.add_device(info)
        self.log_home.mkdir(parents=True, exist_ok=True)
        db.put_device_property(
            self.device, {"LogFileHome": [str(self.log_home)], "StartServersAtStartup": ["false"]}
        )

    def start(self, env: dict[str, str], timeout: float = 60.0) -> None:
        if not STARTER.exists():
            raise RuntimeError(f"{STARTER} not found: {INSTALL_HINT}")
        try:
            socket.gethostbyname(self.host)
        except OSError:
            raise RuntimeError(
                f"host name {self.host!r} does not resolve; Starter needs it: add '127.0.1.1 {self.host}' to /etc/hosts"
            ) from None
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as log:
            proc = subprocess.Popen(
                [str(STARTER), self.host, "-ORBendPoint", "giop:tcp:127.0.0.1:0"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env, TANGO_HOST=self.tango_host),
                start_new_session=True,
                cwd=self.folder,
            )
        self.pid = proc.pid
        _wait(self._answers, timeout, "Starter", self.pid, self.log)

    def proxy(self) -> tango.DeviceProxy:
        dev = tango.DeviceProxy(f"tango://{self.tango_host}/{self.device}")
        dev.set_timeout_millis(10000)
        return dev

    def _answers(self) -> bool:
        try:
            return self.proxy().state() is not None
        except tango.DevFailed:
            return False

    def stop(self) -> None:
        if self.pid:
            stop_process(self.pid)
            self.pid = 0


@dataclass
class AccessControl:
    """Debian's TangoAccessControl on a facility database: Tango access control for its clients.

    The service is switched on by registering it in the database (free property
    ``CtrlSystem``/``Services``: ``AccessControl/tango:sys/access_control/1``); from
    then on every client library asks it, per device, whether its user (the
    process's effective OS user) may write, and refuses commands and attribute
    writes of read-only users itself (API_ReadOnlyMode). The rights live in the
    ``access_device`` and ``access_address`` tables of the tango schema.

    A client caches the service per database for its whole life, so switching it
    off again is not seen by a client process that ever saw it on: give a test
    that switches it on a database of its own.
    """

    facility: FacilityDatabase
    folder: Path
    pid: int = 0

    device = "sys/access_control/1"
    server = "TangoAccessControl/1"

    @property
    def log(self) -> Path:
        return self.folder / "TangoAccessControl.log"

    def prepare_tables(self) -> None:
        """Give the ``updated`` columns of the access tables a default.

        TangoAccessControl 9.3 inserts rows without them; MariaDB 10.10 and newer
        (Debian 12) no longer give the first TIMESTAMP column an implicit default
        (explicit_defaults_for_timestamp), so AddDeviceForUser would fail with
        "Field 'updated' doesn't have a default value".
        """
        self.facility.mariadb.client(
            MYSQL_DATABASE,
            stdin="\n".join(
                f"ALTER TABLE {table} MODIFY updated TIMESTAMP NOT NULL "
                "DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP;"
                for table in ("access_address", "access_device")
            ),
        )

    def register(self) -> None:
        """The device, as the tango schema registers it (again, should it be gone)."""
        info = tango.DbDevInfo()
        info.name, info._class, info.server = self.device, "TangoAccessControl", self.server
        self.facility.database().add_device(info)

    def start(self, timeout: float = 60.0) -> None:
        """Run the server (it reads the access tables through MYSQL_* like DataBaseds); not yet switched on."""
        if not ACCESS_CONTROL.exists():
            raise RuntimeError(f"{ACCESS_CONTROL} not found: {INSTALL_HINT}")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prepare_tables()
        self.register()
        env = dict(self.facility.environment(), TANGO_HOST=self.facility.tango_host)
        with open(self.log, "w") as log:
            proc = subprocess.Popen(
                [str(ACCESS_CONTROL), "1", "-ORBendPoint", "giop:tcp:127.0.0.1:0"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.pid = proc.pid
        _wait(self._answers, timeout, "TangoAccessControl", self.pid, self.log)

    def proxy(self) -> tango.DeviceProxy:
        dev = tango.DeviceProxy(f"tango://{self.facility.tango_host}/{self.device}")
        dev.set_timeout_millis(10000)
        return dev

    def _answers(self) -> bool:
        try:
            return self.proxy().state() == tango.DevState.ON
        except tango.DevFailed:
            return False

    def switch_on(self) -> None:
        """Register the service in the database (its RegisterService command): access control is on."""
        self.proxy().RegisterService()

    def set_rights(self, user: str, rights: str, devices: str = "*/*/*") -> None:
        """``user`` (``*``: anyone not named) gets ``rights`` (read or write) on ``devices`` (wildcards)."""
        dev = self.proxy()
        for old in ("read", "write"):
            if old != rights:
                dev.RemoveDeviceForUser([user, devices, old])
        try:
            dev.AddDeviceForUser([user, devices, rights])
        except tango.DevFailed as exc:
            if exc.args[0].reason != "AC_AlreadyExists":
                raise

    def rights(self, user: str, device: str, addresses: list[str]) -> str:
        """What the service answers a client of ``user`` on these IP addresses: read or write."""
        return self.proxy().GetAccessForMultiIP([user, device, *addresses])

    def stop(self) -> None:
        if self.pid:
            stop_process(self.pid)
            self.pid = 0


@pytest.fixture(scope="session")
def facility_db(tmp_path_factory):
    """TANGO_HOST of a C++ DataBaseds on MariaDB, for the whole session; stopped afterwards."""
    facility = FacilityDatabase(tmp_path_factory.mktemp("facility-db"))
    try:
        yield facility.start()
    finally:
        facility.stop()
