"""What every tangopipe device has: counters as attributes, events, upstream lookup.

A device is a thin face on an engine from ``pipelines/``. It reads its
properties, builds the engine (``init_device`` never raises: a bad property
gives FAULT and a Status saying which and how to fix it), finds its upstream
devices by name in the Tango database and hands their data endpoints to the
engine, and publishes the engine's counters as attributes with change and
archive events pushed at a bounded rate.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import numpy as np
import tango
from tango import AttrWriteType, DevState
from tango.server import Device, attribute, command, device_property

from pipelines.engine import Engine, Health
from pipelines.security import curve_counters, use_curve

HEALTH_TO_STATE = {
    Health.INIT: DevState.INIT,
    Health.ON: DevState.ON,
    Health.RUNNING: DevState.RUNNING,
    Health.ALARM: DevState.ALARM,
    Health.FAULT: DevState.FAULT,
    Health.UNKNOWN: DevState.UNKNOWN,
}

EVENT_PERIOD_S = 0.5  # counters are pushed at most twice a second


class UpstreamError(Exception):
    """An upstream device cannot be used; ``state`` says how bad (FAULT or UNKNOWN)."""

    def __init__(self, state: DevState, status: str):
        super().__init__(status)
        self.state = state


def counter(key: str, unit: str = "", doc: str = "", dtype: Any = int, fmt: str = "%d") -> attribute:
    """A read-only attribute showing the engine counter ``key``."""

    def fget(self: PipelineDevice) -> Any:
        return self.counter_values().get(key, 0)

    return attribute(name=key, dtype=dtype, unit=unit, doc=doc, format=fmt, fget=fget)


def rate(key: str, unit: str, doc: str) -> attribute:
    return counter(key, unit, doc, dtype=float, fmt="%.2f")


#: counters every device class publishes (name -> is it pushed as an event)
COMMON_COUNTERS = (
    "FramesIn",
    "FramesOut",
    "BadMessages",
    "DroppedFrames",
    "Errors",
    "QueueDepth",
    "QueueCapacity",
    "InFlight",
    "InputRateHz",
    "OutputRateHz",
    "BytesPerSecond",
    "LatencyP50Ms",
    "LatencyP99Ms",
)


def same_value(a: Any, b: Any) -> bool:
    """Equal for pushing purposes: NaN equals NaN, arrays compare element by element."""
    if a is None or b is None:
        return a is b
    try:
        return bool(np.array_equal(a, b, equal_nan=True))
    except TypeError:  # strings and other non-numeric values
        return bool(np.array_equal(a, b))


def parse_json_property(name: str, text: str, default: Any) -> Any:
    """A JSON-valued property; the error names the property and the bad text."""
    if not text.strip():
        return default
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ValueError(f"property {name} is not valid JSON ({exc.msg} at {exc.pos}): {text[:80]!r}") from None


class PipelineDevice(Device):
    """Base class of the tangopipe devices (not a server of its own)."""

    BindAddress = device_property(
        dtype=str, default_value="127.0.0.1", doc="address the data sockets bind to; '*' for all interfaces"
    )
    CurveKeys = device_property(
        dtype=str, default_value="", doc="folder of the pipeline's CURVE keys (tangopipe keys FOLDER): data sockets "
        "encrypted, only authorised keys connect (counter CurveRefused); empty: plain ZeroMQ; keys reread at Init"
    )

    # -- counters every stage has --------------------------------------------------------
    FramesIn = counter("FramesIn", "frames", "frames (or results) received")
    FramesOut = counter("FramesOut", "frames", "frames (or results) passed on")
    BadMessages = counter("BadMessages", "messages", "malformed messages received and discarded")
    DroppedFrames = counter("DroppedFrames", "frames", "frames dropped by policy (never silently)")
    Errors = counter("Errors", "", "processing or I/O errors")
    QueueDepth = counter("QueueDepth", "items", "items waiting in this stage")
    QueueCapacity = counter("QueueCapacity", "items", "bound of the queue")
    InFlight = counter("InFlight", "items", "items handed on and not yet acknowledged")
    InputRateHz = rate("InputRateHz", "Hz", "input rate over the last 2 s")
    OutputRateHz = rate("OutputRateHz", "Hz", "output rate over the last 2 s")
    BytesPerSecond = rate("BytesPerSecond", "B/s", "input bytes per second")
    LatencyP50Ms = rate("LatencyP50Ms", "ms", "median latency since acquisition, this scan")
    LatencyP99Ms = rate("LatencyP99Ms", "ms", "99th percentile latency since acquisition, this scan")

    engine: Engine | None

    # -- life cycle ----------------------------------------------------------------------
    def init_device(self) -> None:
        super().init_device()
        self.log = logging.getLogger(f"tangopipe.device.{self.get_name()}")
        self.engine = None
        self._config_error = ""
        self._upstream_problem: UpstreamError | None = None
        self._counters: dict[str, Any] = {}
        self._counters_time = 0.0
        self._pushed: dict[str, Any] = {}
        self._stop_monitor = threading.Event()
        self.set_state(DevState.INIT)
        self.set_status("Initialising")
        try:
            use_curve(self.CurveKeys)  # before any socket: transport makes them CURVE servers/clients
            self.engine = self.create_engine()
            self.engine.add_listener(self._on_engine_event)
            self.engine.start()
        except Exception as exc:  # init_device never raises: FAULT and say why
            self._config_error = f"{exc}. Fix the device properties (Jive) and run Init."
            self.error_stream(self._config_error)
            self.log.error("%s: %s", self.get_name(), self._config_error)
        # after create_engine: it may add attributes (the sink's scalar results)
        self._event_names = self.event_attributes()
        for name in ("State", "Status", *self._event_names):
            self.set_change_event(name, True, False)
            self.set_archive_event(name, True, False)
        self._monitor = threading.Thread(target=self._monitor_loop, name="monitor", daemon=True)
        self._monitor.start()

    def delete_device(self) -> None:
        self._stop_monitor.set()
        if getattr(self, "_monitor", None) is not None:
            self._monitor.join(3)
        if self.engine is not None:
            self.engine.stop()
            self.engine = None
        super().delete_device()

    def create_engine(self) -> Engine:
        raise NotImplementedError

    #: attributes the device pushes itself (the sink's images, at their own rate)
    PUSHED_BY_DEVICE: tuple[str, ...] = ()

    def event_attributes(self) -> list[str]:
        """Every attribute but State, Status and PUSHED_BY_DEVICE: the monitor thread
        pushes each as a change and archive event when its value changes.

        So Taurus and Sardana subscribe instead of polling, and no client keeps a failing
        subscription that its keep-alive thread retries every 10 s (a retry calling back
        into Python while another thread destroys a proxy can deadlock a pytango client).
        """
        skip = {"State", "Status", *self.PUSHED_BY_DEVICE}
        return [name for name in self.attribute_names() if name not in skip]

    def attribute_names(self) -> list[str]:
        """Names of the device's attributes, dynamic ones included."""
        attrs = self.get_device_attr()
        return [attrs.get_attr_by_ind(i).get_name() for i in range(attrs.get_attr_nb())]

    # -- state ---------------------------------------------------------------------------
    def dev_state(self) -> DevState:
        if self._config_error:
            return DevState.FAULT
        if self.engine is None:
            return DevState.INIT
        if self.engine.health is Health.FAULT:
            return DevState.FAULT
        if self._upstream_problem is not None:
            return self._upstream_problem.state
        return HEALTH_TO_STATE[self.engine.health]

    def dev_status(self) -> str:
        if self._config_error:
            return self._config_error
        if self.engine is None:
            return "Initialising"
        if self.engine.health is not Health.FAULT and self._upstream_problem is not None:
            return str(self._upstream_problem)
        return self.engine.status

    def _on_engine_event(self, event: str, payload: Any) -> None:
        """Engine events arrive on engine threads; subclasses may react."""

    # -- upstream ------------------------------------------------------------------------
    def upstreams(self) -> list[tuple[str, str, str]]:
        """(property name, device name, endpoint attribute) this device reads."""
        return []

    def connect_upstream(self, endpoints: list[str]) -> None:
        """Hand resolved endpoints (in the order of :meth:`upstreams`) to the engine."""

    @staticmethod
    def resolve_endpoint(prop: str, device: str, attr: str) -> str:
        if not device:
            raise UpstreamError(DevState.FAULT, f"Property {prop} is empty: set it to the upstream device name in Jive")
        try:
            tango.Database().get_device_info(device)
        except tango.DevFailed as exc:
            reason = exc.args[0].reason if exc.args else ""
            if "DeviceNotDefined" in reason or "not defined" in str(exc):
                raise UpstreamError(
                    DevState.FAULT,
                    f"Upstream device '{device}' (property {prop}) is not defined in the Tango database: "
                    "fix the property in Jive or register the device (tangopipe up)",
                ) from None
            raise UpstreamError(DevState.UNKNOWN, f"Tango database not reachable to look up '{device}': {reason}") from None
        try:
            proxy = tango.DeviceProxy(device)
            proxy.set_timeout_millis(1500)
            endpoint = proxy.read_attribute(attr).value
        except tango.DevFailed as exc:
            desc = exc.args[0].desc.strip().splitlines()[0] if exc.args else str(exc)
            raise UpstreamError(
                DevState.UNKNOWN,
                f"Upstream device '{device}' (property {prop}) is not reachable ({desc[:120]}): "
                "start its server (Astor or tangopipe up)",
            ) from None
        if not endpoint:
            raise UpstreamError(DevState.UNKNOWN, f"Upstream device '{device}' has no {attr} yet (not started)")
        return endpoint

    def _check_upstreams(self) -> None:
        wanted = self.upstreams()
        if not wanted:
            return
        try:
            endpoints = [self.resolve_endpoint(*w) for w in wanted]
        except UpstreamError as exc:
            if self._upstream_problem is None or str(self._upstream_problem) != str(exc):
                self.log.warning("%s", exc)
            self._upstream_problem = exc
            return
        self._upstream_problem = None
        self.connect_upstream(endpoints)

    # -- monitor thread: upstream lookups and events -------------------------------------
    def _monitor_loop(self) -> None:
        with tango.EnsureOmniThread():
            last_upstream = 0.0
            while not self._stop_monitor.wait(EVENT_PERIOD_S):
                if self.engine is None:
                    continue
                now = time.monotonic()
                if now - last_upstream >= 2.0 or self._upstream_problem is not None and now - last_upstream >= 1.0:
                    last_upstream = now
                    try:
                        self._check_upstreams()
                    except Exception:
                        self.log.exception("upstream check failed")
                self._push_events()

    def counter_values(self) -> dict[str, Any]:
        if self.engine is None:
            return {}
        now = time.monotonic()
        if now - self._counters_time > 0.1:
            self._counters = {**self.engine.counters(), **curve_counters()}
            self._counters_time = now
        return self._counters

    def _push_events(self) -> None:
        self._push_state()
        values = self.counter_values()
        for name in self._event_names:
            value = values.get(name, None)
            if value is None:
                value = self.extra_event_value(name)
            if value is None:
                value = self._attribute_value(name)
            if value is None or same_value(self._pushed.get(name), value):
                continue
            self._pushed[name] = value
            try:
                self.push_change_event(name, value)
                self.push_archive_event(name, value)
            except tango.DevFailed:
                pass  # a device being deleted

    def _push_state(self) -> None:
        """State and Status as change events, so GUIs need not poll them."""
        state, status = self.dev_state(), self.dev_status()
        if (state, status) == self._pushed.get("State"):
            return
        self._pushed["State"] = (state, status)
        try:
            self.set_state(state)  # a pushed State/Status is the stored one
            self.set_status(status)
            for name in ("State", "Status"):
                self.push_change_event(name)
                self.push_archive_event(name)
        except tango.DevFailed:
            pass

    def extra_event_value(self, name: str) -> Any:
        """Value of a pushed attribute that is neither an engine counter nor a class attribute."""
        return None

    def _attribute_value(self, name: str) -> Any:
        """What the read method of class attribute ``name`` returns (None if it fails)."""
        declared = getattr(type(self), name, None)
        if not isinstance(declared, attribute) or declared.fget is None:
            return None
        try:
            return declared.fget(self)
        except Exception:  # a read failing now fails for the client too; nothing to push
            return None

    # -- attributes every device has -----------------------------------------------------
    @attribute(dtype=str, doc="where peers connect to take this device's data (ZeroMQ endpoint)")
    def DataEndpoint(self) -> str:
        return getattr(self.engine, "endpoint", "") if self.engine is not None else ""

    @attribute(dtype=(float,), max_dim_x=2, unit="ms", doc="latency since acquisition this scan: [p50, p99]")
    def LatencyMs(self) -> list[float]:
        c = self.counter_values()
        return [c.get("LatencyP50Ms", 0.0), c.get("LatencyP99Ms", 0.0)]

    @attribute(dtype=str, doc="all counters as JSON (for scripts and the tangopipe status command)")
    def Counters(self) -> str:
        return json.dumps(self.counter_values())

    @attribute(dtype=str, access=AttrWriteType.READ, doc="last malformed input seen, with its reason")
    def LastBadMessage(self) -> str:
        return self.engine.stats.bad.last_error if self.engine is not None else ""

    @command(doc_in="", doc_out="bad-message counts per reason, JSON", dtype_out=str)
    def BadMessageReasons(self) -> str:
        return json.dumps(self.engine.stats.bad.by_reason if self.engine is not None else {})
