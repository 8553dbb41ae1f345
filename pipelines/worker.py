"""The worker: take frames from the master by credit, run the step chain, push results.

Two threads: the loop thread owns the sockets (credit link to the master, DEALER to
the sorter) and keeps heartbeats flowing even while a long computation runs in
the compute thread. A result is acknowledged to the master only once the sorter
has confirmed receiving it (not merely once it was handed to a socket), so a
worker killed with results still in its socket loses nothing: the master sends
its frames again. A step that fails on a frame yields a gap record naming the error, so the
sorter does not wait for a result that will never come.

On the master's host, frames come through the master's shared-memory ring
(pipelines/shm.py): the FRAME message carries a handle, the steps run on a
read-only view of the slot, and the slot belongs to the master again as soon as
the frame is acknowledged. So results that are views of the input are copied
before they are queued for sending (:func:`own_arrays`), and results made from a
slot the master took back meanwhile (this worker was declared lost) are thrown
away and the frame refused, never sent.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from typing import Any

import numpy as np
import zmq

from . import message as m
from . import shm
from .engine import Engine, Health
from .steps import StepChain
from .transport import UpstreamLink, connect_socket, drain, key_of, new_identity, send


def split_results(results: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Separate a step chain's results into arrays and scalars for the wire."""
    arrays: dict[str, np.ndarray] = {}
    scalars: dict[str, Any] = {}
    for name, value in results.items():
        if isinstance(value, np.ndarray) and value.ndim > 0:
            arrays[name] = value
        elif isinstance(value, np.ndarray | np.generic):
            scalars[name] = value.item()
        elif isinstance(value, bool | int | float | str) or value is None:
            scalars[name] = value
        elif isinstance(value, list | tuple):
            arrays[name] = np.asarray(value)
        else:
            raise TypeError(f"result {name!r} is a {type(value).__name__}; return arrays or numbers")
    return arrays, scalars


def own_arrays(arrays: dict[str, np.ndarray], source: np.ndarray) -> dict[str, np.ndarray]:
    """``arrays`` with every array that may share memory with ``source`` replaced by a copy.

    Needed before a result made from a shared-memory slot leaves the compute
    thread: the slot is the master's again once the frame is acknowledged,
    while ZeroMQ may still be sending the result's buffers.
    """
    return {name: a.copy() if np.may_share_memory(a, source) else a for name, a in arrays.items()}


class MasterLink(UpstreamLink):
    """The credit link to the master: HELLO also says where this worker runs, so
    the master can send frames through shared memory; frames whose handle cannot
    be read are refused (handed back to be sent again)."""

    def __init__(self, context: zmq.Context, name: str, group: str, credit: int, hello_extra: dict[str, Any]):
        super().__init__(context, name, group, credit)
        self.hello_extra = dict(hello_extra)

    def hello(self, outstanding: int = 0, extra: dict[str, Any] | None = None) -> None:
        super().hello(outstanding, self.hello_extra if extra is None else extra)

    def refuse(self, keys: list, reason: str) -> None:
        """Give back the credit of frames not processed; the master dispatches them again."""
        self._send(m.Message(m.CREDIT, body={"n": len(keys), "refused": keys, "reason": reason[:200]}))


#: a result the sorter has not confirmed after this long is sent again
CONFIRM_TIMEOUT_S = 5.0


class WorkerEngine(Engine):
    """One worker of a group; see the module docstring."""

    def __init__(
        self,
        steps: list[Any] | None,
        *,
        name: str = "worker",
        group: str = "main",
        credit: int = 2,
        heartbeat_s: float = 0.5,
        use_shm: bool = True,
        context: zmq.Context | None = None,
    ):
        super().__init__(name, context)
        self.chain = StepChain(steps)
        self.version = 1
        self.group = group
        self.heartbeat_s = heartbeat_s
        #: ask for frames through the master's shared memory (used only if it runs on this host)
        self.use_shm = bool(use_shm) and shm.shm_supported()
        self.link = MasterLink(self.context, name, group, credit, shm.hello_fields() if self.use_shm else {})
        self.rings = shm.RingReader()
        self.shm_frames = 0
        self.shm_refused = 0
        self.shm_stale = 0
        self._inbox: queue.Queue[m.Message | None] = queue.Queue()
        self._outbox: deque[m.Message] = deque()
        self._outbox_lock = threading.Lock()
        self._busy = 0  # items received and not yet acknowledged
        self._wanted: tuple[str, str] | None = None
        self._connected: tuple[str, str] | None = None
        self._push: zmq.Socket | None = None
        # results sent to the sorter and not yet confirmed by it: key -> (message, master key, sent at)
        self._unconfirmed: dict[tuple, tuple[m.Message, list, float]] = {}
        self.resent = 0
        self._compute: threading.Thread | None = None
        self.processing_errors = 0
        self.last_error = ""
        self._last_result = 0.0
        self._status_scan: int | None = None  # the scan the RUNNING status names

    # -- control -------------------------------------------------------------------------
    def connect(self, master_endpoint: str, sorter_endpoint: str) -> None:
        """Use these upstream/downstream endpoints (reconnects when they change)."""
        self._wanted = (master_endpoint, sorter_endpoint)

    def reconfigure(self, steps: list[Any]) -> int:
        """Load a new step chain (validated now); it applies from the next frame on."""
        chain = StepChain(steps)
        self.chain = chain
        self.version += 1
        self.emit("reconfigured", self.version)
        return self.version

    # -- loop ----------------------------------------------------------------------------
    def setup(self) -> None:
        self._compute = threading.Thread(target=self._compute_loop, name=f"{self.name}-compute", daemon=True)
        self._compute.start()
        self.set_health(Health.UNKNOWN, "Waiting for the master and sorter endpoints")

    def _reconnect(self) -> None:
        assert self._wanted is not None
        master_ep, sorter_ep = self._wanted
        if self._push is not None:
            self._push.close(0)
        self._push = self.context.socket(zmq.DEALER)
        self._push.linger = 0
        self._push.sndhwm = 8
        self._push.routing_id = new_identity(self.name)
        connect_socket(self._push, sorter_ep)  # CURVE client when the pipeline has keys
        for key, (msg, done_key, _) in list(self._unconfirmed.items()):  # a new sorter: send again
            self._unconfirmed[key] = (msg, done_key, 0.0)
        self.link.connect(master_ep, outstanding=self._busy)
        self._connected = self._wanted
        self.set_health(Health.ON, f"Connected: frames from {master_ep}, results to {sorter_ep}")

    def step(self) -> None:
        if self._wanted != self._connected and self._wanted is not None:
            self._reconnect()
        if self._connected is None:
            self._stop.wait(self.POLL_MS / 1000)
            return
        assert self.link.sock is not None and self._push is not None
        poller = zmq.Poller()
        poller.register(self.link.sock, zmq.POLLIN)
        poller.register(self._push, zmq.POLLIN | (zmq.POLLOUT if self._outbox else 0))
        events = self.poll(poller)
        if self.link.sock in events:
            self._receive()
        if events.get(self._push, 0) & zmq.POLLIN:
            self._confirmed()
        if self._outbox:
            self._flush()
        if self._unconfirmed:
            self._resend_unconfirmed()
        if self.link.heartbeat_due(self.heartbeat_s):
            self.link.heartbeat()
        if self.health is Health.RUNNING and time.monotonic() - self._last_result > 2.0:
            self.set_health(Health.ON, f"Idle; connected to {self._connected[0]}")

    def _receive(self) -> None:
        assert self.link.sock is not None
        for _, msg in drain(self.link.sock, self.stats.bad, limit=100):
            if msg.kind == m.HELLO and "shm" in msg.body:  # where the master's frames will be
                self._attach(msg.body["shm"])
            elif msg.kind == m.HELLO:  # the master restarted and does not know us
                self.link.hello(outstanding=self._busy)
            elif msg.kind in m.DATA_KINDS:
                if msg.kind == m.FRAME and "shm" in msg.body and not self._map_frame(msg):
                    continue
                self._busy += 1
                if msg.kind == m.FRAME:
                    self.stats.count_in(msg.nbytes())
                self._inbox.put(msg)
            else:
                self.stats.bad.record("unexpected_kind", f"{msg.kind} from the master")

    def _attach(self, announcement: Any) -> None:
        if not self.use_shm:
            self.stats.bad.record("unexpected_shm", "the master announced shared memory not asked for")
            return
        try:
            name = self.rings.attach(announcement)
        except m.BadMessage as exc:
            self.stats.bad.record(exc.reason, exc.detail)
        except OSError as exc:  # e.g. another /dev/shm (container): the refused frames come again as bytes
            self.stats.bad.record("shm_attach_failed", f"cannot map the master's shared memory: {exc}")
        else:
            self.log.info("frames from the master come through shared memory %s", name)

    def _map_frame(self, msg: m.Message) -> bool:
        """Put the frame a shared-memory handle names into ``msg.arrays``; refuse the frame if it cannot."""
        try:
            if msg.arrays:
                raise m.BadMessage("bad_shm_handle", "a frame has both buffers and a shared-memory handle")
            msg.arrays["data"] = self.rings.view(msg.body["shm"])
        except m.BadMessage as exc:
            self.stats.bad.record(exc.reason, exc.detail)
            self.shm_refused += 1
            self.link.refuse([key_of(msg)], exc.detail)
            return False
        self.shm_frames += 1
        return True

    def _flush(self) -> None:
        assert self._push is not None
        while True:
            with self._outbox_lock:
                if not self._outbox:
                    return
                msg = self._outbox[0]
            if msg.kind == m.CREDIT:  # a frame whose slot was taken back while computing
                with self._outbox_lock:
                    self._outbox.popleft()
                self._busy -= 1
                self.link.refuse(msg.body["refused"], msg.body["reason"])
                continue
            try:
                send(self._push, msg, flags=zmq.NOBLOCK)
            except zmq.Again:
                return  # sorter busy: keep it, heartbeats go on, the master waits for our credit
            with self._outbox_lock:
                self._outbox.popleft()
            done_key = key_of(msg)
            if msg.kind == m.RESULT or (msg.kind == m.GAP and msg.body.get("from_frame")):
                done_key[1] = m.FRAME
            # acknowledged to the master once the sorter confirms it has the result
            self._unconfirmed[tuple(key_of(msg))] = (msg, done_key, time.monotonic())

    def _confirmed(self) -> None:
        """The sorter confirms results it took: now the master may forget their frames."""
        assert self._push is not None
        for _, reply in drain(self._push, self.stats.bad, limit=100):
            keys = reply.body.get("received") if reply.kind == m.CREDIT else None
            if not isinstance(keys, list):
                self.stats.bad.record("unexpected_kind", f"{reply.kind} from the sorter")
                continue
            done = []
            for key in keys:
                entry = self._unconfirmed.pop(tuple(key), None) if isinstance(key, list) else None
                if entry is None:
                    continue
                msg, done_key, _ = entry
                self._busy -= 1
                if msg.kind == m.RESULT:
                    self.stats.count_out()
                done.append(done_key)
            if done:
                self.link.grant(len(done), done)

    def _resend_unconfirmed(self) -> None:
        """Send again what the sorter did not confirm in time (it drops duplicates)."""
        assert self._push is not None
        now = time.monotonic()
        for key, (msg, done_key, sent) in list(self._unconfirmed.items()):
            if now - sent < CONFIRM_TIMEOUT_S:
                continue
            try:
                send(self._push, msg, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            self._unconfirmed[key] = (msg, done_key, now)
            self.resent += 1

    # -- compute thread ------------------------------------------------------------------
    def _compute_loop(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self._inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            if msg is None:
                return
            handle = msg.body.get("shm") if msg.kind == m.FRAME else None
            if handle is None:
                out = self._process(msg)
            else:
                try:
                    out = self._process_shared(msg, handle)
                finally:
                    msg = None  # the last reference to the view: the segment can be unmapped
                    self.rings.done(handle)
            with self._outbox_lock:
                self._outbox.append(out)
            self.wake()  # send the result now, not at the loop's next timeout

    def _process_shared(self, msg: m.Message, handle: dict[str, Any]) -> m.Message:
        """Process a frame read from the master's shared memory; see the module docstring."""
        frame = msg.arrays["data"]
        out = self._process(msg)
        out.arrays = own_arrays(out.arrays, frame)
        if not self.rings.valid(handle):
            self.shm_stale += 1
            reason = f"slot {handle['slot']} was taken back while frame {msg.index} was computed"
            self.log.warning("%s; result dropped", reason)
            body = {"refused": [key_of(msg)], "reason": reason}
            return m.Message(m.CREDIT, scan=msg.scan, index=msg.index, body=body)
        return out

    def _process(self, msg: m.Message) -> m.Message:
        msg.stream = self.group
        if msg.kind == m.SCAN_START:
            msg.meta.setdefault("processing", {})[self.group] = {"steps": self.chain.specs, "version": self.version}
            return msg.stamp(self.name)
        if msg.kind != m.FRAME:
            return msg.stamp(self.name)
        frame = msg.arrays.get("data")
        if frame is None:
            self.stats.bad.record("no_data", f"frame {msg.scan}/{msg.index} has no 'data' buffer")
            return self._failed(msg, "frame has no data buffer")
        meta = dict(msg.meta, scan=msg.scan, index=msg.index)
        chain, version = self.chain, self.version
        try:
            arrays, scalars = split_results(chain(frame, meta))
        except Exception as exc:  # one bad frame must not stop the worker
            self.processing_errors += 1
            self.stats.errors += 1
            self.last_error = f"scan {msg.scan} frame {msg.index}: {exc!r}"
            if self.processing_errors <= 3 or self.processing_errors % 100 == 0:
                self.log.error("processing failed (%d so far): %s", self.processing_errors, self.last_error)
            self.set_health(Health.ALARM, f"{self.processing_errors} frames failed; last: {self.last_error}")
            return self._failed(msg, f"processing failed: {exc!r}")
        result = m.Message(
            m.RESULT,
            scan=msg.scan,
            index=msg.index,
            stream=self.group,
            arrays=arrays,
            scalars=scalars,
            meta=msg.meta,
            times=msg.times,
            version=version,
        )
        self._last_result = time.monotonic()
        if self.health is Health.ON or self.health is Health.RUNNING and msg.scan != self._status_scan:
            self._status_scan = msg.scan  # a new scan while running: say so
            self.set_health(Health.RUNNING, f"Processing scan {msg.scan}")
        return result.stamp(self.name)

    def _failed(self, msg: m.Message, reason: str) -> m.Message:
        return m.Message(
            m.GAP, scan=msg.scan, index=msg.index, stream=self.group, body={"reason": reason, "from_frame": True}
        ).stamp(self.name)

    def teardown(self) -> None:
        # finish what was computed and see it confirmed, tell the master we leave, then close
        deadline = time.monotonic() + 1.0
        while (self._outbox or self._unconfirmed) and self._push is not None and time.monotonic() < deadline:
            self._flush()
            if self._push.poll(10):
                self._confirmed()
        self.link.bye()
        time.sleep(0.05)
        self.link.close()
        if self._push is not None:
            self._push.close(0)
        self._inbox.put(None)
        if self._compute is not None:
            self._compute.join(1.0)
        self.rings.close()

    def counters(self) -> dict[str, Any]:
        c = self.stats.snapshot()
        c.update(
            QueueDepth=self._inbox.qsize() + len(self._outbox),
            QueueCapacity=self.link.credit,
            InFlight=self._busy,
            ProcessingErrors=self.processing_errors,
            ConfigVersion=self.version,
            ShmFrames=self.shm_frames,
            ShmRefused=self.shm_refused,
            ShmStale=self.shm_stale,
            Unconfirmed=len(self._unconfirmed),
            Resent=self.resent,
        )
        return c
