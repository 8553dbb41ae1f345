"""Shared fixtures: a deployed pipeline (real database, real server processes)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .facility import facility_db  # noqa: F401  (session fixture: C++ DataBaseds on MariaDB)

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def tangopipe(*args, env, cwd, timeout=180, check=True):
    """Run the installed ``tangopipe`` command as a user would."""
    proc = subprocess.run([str(BIN / "tangopipe"), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"tangopipe {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def user_env(state: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TANGO_HOST"}
    env["TANGOPIPE_STATE"] = str(state)
    env["PATH"] = f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    return env


def demo_config(folder: Path, **changes) -> Path:
    """config/demo.yaml with a free Lavue port and the files in ``folder``."""
    data = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    data["sink"]["lavue"]["port"] = 0
    data["writers"]["hdf5"]["directory"] = str(folder / "data")
    for key, value in changes.items():
        data[key] = value
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class Deployed:
    def __init__(self, folder: Path, config: Path | None = None, env: dict | None = None):
        self.folder = folder
        self.state = folder / "state"
        self.env = env if env is not None else user_env(self.state)  # with TANGO_HOST: that database
        self.config = config or demo_config(folder)
        tangopipe("up", str(self.config), env=self.env, cwd=folder)
        self.session = json.loads((self.state / "session.json").read_text())
        self.tango_host = self.session["tango_host"]

    def status(self) -> dict:
        return json.loads(tangopipe("status", "--json", env=self.env, cwd=self.folder).stdout)

    def proxy(self, name: str):
        import tango

        dev = tango.DeviceProxy(f"tango://{self.tango_host}/{name}")
        dev.set_timeout_millis(3000)
        return dev

    def down(self):
        return tangopipe("down", env=self.env, cwd=self.folder)


def pids_alive(pids) -> list[int]:
    from devices.database import pid_alive

    return [p for p in pids if pid_alive(p)]


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deployed")
    pipeline = Deployed(folder)
    try:
        yield pipeline
    finally:
        pipeline.down()
        pids = [pipeline.session["db_pid"], *pipeline.session["servers"].values()]
        deadline = time.monotonic() + 10
        while pids_alive(pids) and time.monotonic() < deadline:
            time.sleep(0.1)
