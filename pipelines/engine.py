"""What every pipeline stage has in common: a loop thread, health, listeners.

An engine owns its ZeroMQ sockets inside its own thread (sockets are not
thread-safe); other threads (a Tango device's, a test's) talk to it through
thread-safe calls that queue requests. Engines report their health with the
same names as Tango states, so a device maps them one to one, and emit events
to listeners (the Sardana pool pattern: the core object knows nothing of Tango).
"""

from __future__ import annotations

import enum
import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

import zmq

from .stats import FlowStats

Listener = Callable[[str, Any], None]


class Health(enum.Enum):
    INIT = "INIT"
    ON = "ON"
    RUNNING = "RUNNING"
    ALARM = "ALARM"
    FAULT = "FAULT"
    UNKNOWN = "UNKNOWN"


class Engine:
    """Base of the master, worker, sorter, sink and writer engines."""

    #: longest wait of the loop for sockets; other threads cut it short with :meth:`wake`
    POLL_MS = 50

    def __init__(self, name: str, context: zmq.Context | None = None):
        self.name = name
        self.log = logging.getLogger(f"tangopipe.{name}")
        self.context = context or zmq.Context.instance()
        self.stats = FlowStats(self.log, name)
        self.health = Health.INIT
        self.status = "Starting"
        self._listeners: list[Listener] = []
        self._requests: queue.Queue[tuple[Callable[[], Any], queue.Queue]] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # a pipe other threads write to so the loop stops waiting at once (thread-safe, unlike sockets)
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)

    # -- listeners -----------------------------------------------------------------------
    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def emit(self, event: str, payload: Any = None) -> None:
        for listener in list(self._listeners):
            try:
                listener(event, payload)
            except Exception:  # a broken listener must not stop the data flow
                self.log.exception("listener failed on %s", event)

    def set_health(self, health: Health, status: str) -> None:
        changed = (health, status) != (self.health, self.status)
        self.health, self.status = health, status
        if changed:
            if health is Health.FAULT:
                self.log.error("%s: %s", self.name, status)
            self.emit("health", (health, status))

    # -- thread --------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-loop", daemon=True)
        self._thread.start()

    def __del__(self) -> None:
        for fd in (getattr(self, "_wake_read", -1), getattr(self, "_wake_write", -1)):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def wake(self) -> None:
        """Make the loop thread look at its queues now (call from any thread)."""
        try:
            os.write(self._wake_write, b"!")
        except BlockingIOError:  # the pipe is full: the loop is already due to wake
            pass

    def poll(self, poller: zmq.Poller, timeout_ms: int | None = None) -> dict:
        """Wait for the poller's sockets, a :meth:`wake` or the timeout; return socket events."""
        poller.register(self._wake_read, zmq.POLLIN)
        events = dict(poller.poll(self.POLL_MS if timeout_ms is None else timeout_ms))
        if events.pop(self._wake_read, None):
            try:
                while os.read(self._wake_read, 4096):
                    pass
            except BlockingIOError:
                pass
        return events

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        try:
            self.setup()
            while not self._stop.is_set():
                self._serve_requests()
                self.step()
        except Exception as exc:  # the loop must report, not vanish
            self.log.exception("engine loop failed")
            self.set_health(Health.FAULT, f"internal error in {self.name}: {exc!r}; restart the server")
        finally:
            self.teardown()

    def call(self, fn: Callable[[], Any], timeout: float = 2.5) -> Any:
        """Run ``fn`` inside the loop thread and return its result (or raise its error)."""
        if not self.running:
            return fn()
        answer: queue.Queue = queue.Queue(1)
        self._requests.put((fn, answer))
        self.wake()
        try:
            ok, value = answer.get(timeout=timeout)
        except queue.Empty as exc:
            raise TimeoutError(f"{self.name} did not answer within {timeout} s") from exc
        if not ok:
            raise value
        return value

    def _serve_requests(self) -> None:
        while True:
            try:
                fn, answer = self._requests.get_nowait()
            except queue.Empty:
                return
            try:
                answer.put((True, fn()))
            except Exception as exc:
                answer.put((False, exc))

    # -- to override ---------------------------------------------------------------------
    def setup(self) -> None:
        """Create sockets (runs in the loop thread)."""

    def step(self) -> None:
        """One turn of the loop: poll sockets (:meth:`poll`) and handle what came."""
        self.poll(zmq.Poller())

    def teardown(self) -> None:
        """Close sockets (runs in the loop thread)."""

    def counters(self) -> dict[str, Any]:
        return self.stats.snapshot()
