"""Device servers for the device tests: without database, each in a fresh interpreter.

Like ``tango.test_context`` (a Tango file database holds the devices and their
properties; clients use ``tango://127.0.0.1:PORT/NAME#dbase=no``), but the server
is started with ``subprocess``, never forked from the test process: a fork
inherits the test's Tango client and ZeroMQ state without the threads behind it,
and such a server may fail to push events or to exit on Kill, depending on what
ran before it in the same pytest process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import tango
from tango.test_context import get_server_port_via_pid

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"

#: runs ``run(classes, args)`` for "module:Class,module:Class" in argv[1]
RUNNER = (
    "import importlib, sys\n"
    "from tango.server import run\n"
    "classes = [getattr(importlib.import_module(m), c) for m, c in (s.split(':') for s in sys.argv[1].split(','))]\n"
    "run(classes, args=sys.argv[2:])\n"
)


def _file_property(value: Any) -> Any:
    """Tango's file database cannot hold an empty string: one space reads back the same to our devices."""
    if isinstance(value, list | tuple):
        return [" " if v == "" else v for v in value]
    return " " if value == "" else value


class ServerContext:
    """A device server of ``devices_info`` (as for ``MultiDeviceTestContext``:
    ``[{"class": Cls, "devices": [{"name": ..., "properties": {...}}]}]``).

    A context manager: entering starts it and returns itself; leaving sends the
    admin device Kill and fails if the server is still running after ``timeout``.
    """

    def __init__(self, devices_info: list[dict], timeout: float = 60.0, server: str | None = None):
        self.devices_info = devices_info
        self.timeout = timeout
        first = devices_info[0]["class"]
        self.server = server or first.__name__
        self.instance = self.server.lower()
        self.port = 0
        self.process: subprocess.Popen | None = None
        self._proxies: dict[str, tango.DeviceProxy] = {}
        handle, self.db_file = tempfile.mkstemp(prefix="tangopipe-db-", suffix=".txt")
        os.close(handle)
        self.log_file = Path(self.db_file).with_suffix(".log")
        self._write_database()

    def _write_database(self) -> None:
        with open(self.db_file, "w") as f:
            for info in self.devices_info:
                names = ", ".join(d["name"] for d in info["devices"])
                f.write(f"{self.server}/{self.instance}/DEVICE/{info['class'].__name__}: {names}\n")
        db = tango.Database(self.db_file)
        for info in self.devices_info:
            for device in info["devices"]:
                props = {k: _file_property(v) for k, v in device.get("properties", {}).items()}
                if props:
                    db.put_device_property(device["name"], props)

    # -- life cycle ----------------------------------------------------------------------
    def start(self) -> ServerContext:
        classes = ",".join(f"{i['class'].__module__}:{i['class'].__name__}" for i in self.devices_info)
        args = [self.server, self.instance, "-ORBendPoint", f"giop:tcp:{HOST}:0", f"-file={self.db_file}"]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
        with open(self.log_file, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", RUNNER, classes, *args], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env
            )
        deadline = time.monotonic() + self.timeout
        try:
            self.port = get_server_port_via_pid(self.process.pid, HOST, retries=int(self.timeout / 0.2), delay=0.2)
            while True:  # the ORB listens before the devices are exported
                try:
                    tango.DeviceProxy(self.access(f"dserver/{self.server}/{self.instance}")).ping()
                    break
                except tango.DevFailed:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        except Exception as exc:
            self._kill()
            raise RuntimeError(f"server {self.server} did not start ({exc}); its output:\n{self.output()}") from None
        return self

    def stop(self) -> None:
        """Kill through the admin device, as Astor does; the server must then exit by itself."""
        if self.process is None:
            return
        try:
            if self.process.poll() is None:
                try:
                    tango.DeviceProxy(self.access(f"dserver/{self.server}/{self.instance}")).command_inout("Kill")
                except tango.DevFailed:
                    pass  # exiting already
                try:
                    self.process.wait(self.timeout)
                except subprocess.TimeoutExpired:
                    self._kill()
                    raise RuntimeError(
                        f"server {self.server} still running {self.timeout:.0f} s after Kill; its output:\n"
                        f"{self.output()}"
                    ) from None
        finally:
            self._proxies.clear()
            for path in (self.db_file, self.log_file):
                Path(path).unlink(missing_ok=True)

    def _kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def output(self) -> str:
        try:
            return "\n".join(Path(self.log_file).read_text(errors="replace").splitlines()[-40:])
        except OSError:
            return ""

    def __enter__(self) -> ServerContext:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- clients -------------------------------------------------------------------------
    def access(self, name: str) -> str:
        """The full name a client uses for device ``name`` of this server."""
        return f"tango://{HOST}:{self.port}/{name}#dbase=no"

    def get_device(self, name: str) -> tango.DeviceProxy:
        if name not in self._proxies:
            self._proxies[name] = tango.DeviceProxy(self.access(name))
        return self._proxies[name]


class DeviceServerContext(ServerContext):
    """One device of class ``cls`` (named ``test/nodb/<class>``); entering returns its proxy."""

    def __init__(self, cls: type, properties: dict | None = None, timeout: float = 60.0):
        self.device_name = f"test/nodb/{cls.__name__.lower()}"
        super().__init__([{"class": cls, "devices": [{"name": self.device_name, "properties": properties or {}}]}],
                         timeout=timeout)

    @property
    def device(self) -> tango.DeviceProxy:
        return self.get_device(self.device_name)

    def get_device_access(self, name: str | None = None) -> str:
        return self.access(name or self.device_name)

    def __enter__(self) -> tango.DeviceProxy:  # type: ignore[override]
        self.start()
        return self.device
