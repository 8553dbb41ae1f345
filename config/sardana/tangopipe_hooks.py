"""Sardana hook macros that tell a tangopipe pipeline about step scans.

Add this folder to the MacroServer's ``MacroPath`` (``tangopipe sardana-path``
prints it), then in spock::

    senv TangopipeMaster demo/master/1
    defgh tangopipe_scan_start pre-scan
    defgh tangopipe_point post-acq
    defgh tangopipe_scan_end post-scan

- ``tangopipe_scan_start`` (pre-scan) sends the master's ``StartScan`` with the
  scan id, ScanDir, ScanFile, the macro and its parameters, the motors, the
  number of points (``frames``: one detector frame per point) and the grid
  (``scan_shape`` [slow, fast], ``snake`` for a bidirectional mesh).
- ``tangopipe_point`` (post-acq, or pre-acq) sends ``AddPointMetadata`` with the
  point's index and motor positions, so frame ``i`` is matched to point ``i``.
- ``tangopipe_scan_end`` (post-scan, also after a stopped or failed scan) sends
  ``EndScan``.

Environment variables (``senv``):

- ``TangopipeMaster``: the master device, e.g. ``demo/master/1`` or
  ``tango://host:10000/demo/master/1``; unset: the hooks only warn.
- ``TangopipeAbortOnError`` (default False): when the master cannot be reached
  or refuses a command, abort the scan instead of warning and going on.
- ``TangopipePointTrigger`` (default False): ask the master to release frame
  ``i`` only when point ``i`` is reported, for a source that would otherwise run
  free (the simulator); leave it False for a detector triggered by the scan.

Hooks also run for other hookable macros (``ct`` has pre-acq and post-acq);
they do nothing there, as they do for a scan whose StartScan failed. This module
needs only Sardana and PyTango, not tangopipe itself, so the MacroServer can run
in its own environment.
"""

import json
import math

import tango
from sardana.macroserver.macro import Macro
from sardana.macroserver.msexception import UnknownEnv

MASTER_ENV = "TangopipeMaster"
ABORT_ENV = "TangopipeAbortOnError"
TRIGGER_ENV = "TangopipePointTrigger"
TIMEOUT_MS = 3000

#: attribute of the scan object holding this module's state for the scan:
#: {"proxy": the master or None (tangopipe off), "points": points sent, "send_points": bool}
_STATE = "_tangopipe"


def _env(macro, key, default=None):
    try:
        return macro.getEnv(key)
    except UnknownEnv:
        return default


def _flag(value):
    """An environment flag set as a boolean or as text (senv X True / yes / 1)."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "on", "1")
    return bool(value)


def _scan_of(macro):
    """(scan macro, its GScan) of the macro this hook runs in; (parent, None) outside a scan."""
    parent = macro.getParentMacro()
    if parent is None:
        return None, None
    gscan = getattr(parent, "_gScan", None)
    return parent, gscan if gscan is not None else getattr(parent, "gscan", None)


def _state(gscan):
    return getattr(gscan, _STATE, None) if gscan is not None else None


def _plain(value):
    """A macro parameter as JSON: motors by name, numbers as numbers."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "getName"):
        return value.getName()
    return str(value)


def _scan_meta(macro, parent, gscan):
    """StartScan's metadata for the scan ``parent``."""
    meta = {
        "scan_id": int(gscan.scan_id),
        "title": parent.getMacroCommand(),
        "macro": parent.getName(),
        "parameters": _plain(list(parent.getParameters())),
        "motors": [desc.moveable.getName() for desc in gscan.moveables],
        "door": macro.getDoorName(),
    }
    if gscan.scan_dir:
        meta["scan_dir"] = gscan.scan_dir
    if gscan.scan_file:
        meta["scan_file"] = list(gscan.scan_file)
    points = getattr(parent, "nb_points", None)
    if isinstance(points, int) and points > 0:
        meta["frames"] = points
        meta["scan_shape"] = [1, points]
    intervals = getattr(parent, "nr_intervs", None)
    if intervals is not None and len(intervals) == 2:  # mesh: motor1 is the fast axis
        meta["scan_shape"] = [int(intervals[1]) + 1, int(intervals[0]) + 1]
        meta["snake"] = bool(getattr(parent, "bidirectional_mode", False))
    integ_time = getattr(parent, "integ_time", None)
    if isinstance(integ_time, (int, float)):
        meta["integration_time"] = float(integ_time)
    if _flag(_env(macro, TRIGGER_ENV, False)):
        meta["point_trigger"] = True
    return meta


def _problem(macro, what):
    """Warn and go on, or abort the scan when TangopipeAbortOnError is true."""
    if _flag(_env(macro, ABORT_ENV, False)):
        raise RuntimeError(f"tangopipe: {what} (scan aborted: {ABORT_ENV} is True)")
    macro.warning("tangopipe: %s; the scan goes on without tangopipe", what)


def _command(proxy, name, argument=None):
    """Run a master command; a failure is a RuntimeError naming the master and the reason."""
    try:
        if argument is None:
            return proxy.command_inout(name)
        return proxy.command_inout(name, argument)
    except tango.DevFailed as exc:
        reason = exc.args[0].desc.strip().splitlines()[0] if exc.args else str(exc)
        raise RuntimeError(f"{name} on {proxy.dev_name()} failed: {reason}") from None
    except AttributeError as exc:  # a device proxy to a server that is down
        raise RuntimeError(f"{name} on {proxy.dev_name()} failed: device not running ({exc})") from None


class tangopipe_scan_start(Macro):
    """Pre-scan hook: StartScan on the tangopipe master (TangopipeMaster) with the scan's id,
    files, motors, number of points and grid."""

    def run(self):
        parent, gscan = _scan_of(self)
        if gscan is None:
            return
        state = {"proxy": None, "points": 0, "send_points": True}
        setattr(gscan, _STATE, state)
        name = _env(self, MASTER_ENV)
        if not name:
            _problem(self, f"{MASTER_ENV} is not set (senv {MASTER_ENV} <pipeline>/master/1)")
            return
        meta = _scan_meta(self, parent, gscan)
        try:
            proxy = tango.DeviceProxy(str(name))
            proxy.set_timeout_millis(TIMEOUT_MS)
        except tango.DevFailed as exc:  # unknown device, no database
            reason = exc.args[0].desc.strip().splitlines()[0] if exc.args else str(exc)
            _problem(self, f"master {name} cannot be reached: {reason}")
            return
        try:
            scan_id = _command(proxy, "StartScan", json.dumps(meta))
        except RuntimeError as exc:
            _problem(self, str(exc))
            return
        state["proxy"] = proxy
        self.output("tangopipe: scan %s started on %s (%s points)", scan_id, name, meta.get("frames", "?"))


class tangopipe_point(Macro):
    """Post-acq (or pre-acq) hook: AddPointMetadata on the tangopipe master with the index of
    this point and the positions of the scan's motors."""

    def run(self):
        parent, gscan = _scan_of(self)
        state = _state(gscan)
        if state is None or state["proxy"] is None or not state["send_points"]:
            return
        index = state["points"]
        state["points"] = index + 1
        positions = {}
        for desc in gscan.moveables:
            value = desc.moveable.getPosition(force=True)
            positions[desc.moveable.getName()] = None if value is None else _plain(float(value))
        point = {"index": index, "positions": positions, "scan": int(gscan.scan_id)}
        try:
            _command(state["proxy"], "AddPointMetadata", json.dumps(point))
        except RuntimeError as exc:
            state["send_points"] = False  # one warning per scan; EndScan is still sent
            _problem(self, f"point {index}: {exc}")


class tangopipe_scan_end(Macro):
    """Post-scan hook: EndScan on the tangopipe master (also after a stopped or failed scan)."""

    def run(self):
        parent, gscan = _scan_of(self)
        state = _state(gscan)
        if state is None or state["proxy"] is None:
            return
        proxy, state["proxy"] = state["proxy"], None
        try:
            frames = _command(proxy, "EndScan")
        except RuntimeError as exc:
            _problem(self, str(exc))
            return
        self.output("tangopipe: scan %s ended after %s frames", gscan.scan_id, frames)
