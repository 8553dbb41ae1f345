"""The receiving end of a sorter's ordered stream (the sink and the writers).

A consumer takes every message of the stream in order through a credit link and
grants credit back only once it has finished with a message, so a slow consumer
slows the sorter instead of losing data.
"""

from __future__ import annotations

import time
from typing import Any

import zmq

from . import message as m
from .engine import Engine, Health
from .transport import BadPeerMessage, UpstreamLink, receive_many


class ConsumerEngine(Engine):
    """Base of the sink and writer engines: override :meth:`handle`."""

    def __init__(self, name: str, *, credit: int = 16, heartbeat_s: float = 0.5, context: zmq.Context | None = None):
        super().__init__(name, context)
        self.link = UpstreamLink(self.context, name, credit=credit)
        self.heartbeat_s = heartbeat_s
        self._wanted = ""
        self.current_scan: int | str | None = None
        self.scans_done = 0
        self._owed = 0  # credit withheld while blocked

    def connect(self, endpoint: str) -> None:
        """Take the ordered stream from ``endpoint`` (reconnects when it changes)."""
        self._wanted = endpoint

    def step(self) -> None:
        if self._wanted and self._wanted != self.link.endpoint:
            self.link.connect(self._wanted)
            self.set_health(Health.ON, f"Connected to {self._wanted}; idle")
        poller = zmq.Poller()
        if self.link.sock is not None:
            poller.register(self.link.sock, zmq.POLLIN)
        for sock in self.extra_sockets():
            poller.register(sock, zmq.POLLIN)
        events = self.poll(poller)
        for sock in events:
            if sock is self.link.sock:
                self._take_stream()
            else:
                self.on_socket(sock)
        if self.link.sock is not None:
            if self._owed and not self.blocked():
                self.link.grant(self._owed)
                self._owed = 0
            if self.link.heartbeat_due(self.heartbeat_s):
                self.link.heartbeat()
        self.idle()

    def _take_stream(self) -> None:
        assert self.link.sock is not None
        for _ in range(64):
            try:
                msgs = receive_many(self.link.sock, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            except BadPeerMessage as exc:
                self.stats.bad.record(exc.reason, exc.detail)
                continue
            if msgs[0].kind == m.HELLO:  # the sorter restarted and does not know us
                self.link.hello()
                continue
            for msg in msgs:
                if msg.kind in m.DATA_KINDS:
                    self._dispatch(msg)
                else:
                    self.stats.bad.record("unexpected_kind", f"{msg.kind} from the sorter")
            self._owed += 1  # one credit per message or batch

    def extra_sockets(self) -> list[zmq.Socket]:
        """Further sockets the loop should poll (a query port); see :meth:`on_socket`."""
        return []

    def on_socket(self, sock: zmq.Socket) -> None:
        """Called when one of :meth:`extra_sockets` is readable."""

    def _dispatch(self, msg: m.Message) -> None:
        if msg.kind == m.SCAN_START:
            self.current_scan = msg.scan
            self.stats.reset_scan()
            self.set_health(Health.RUNNING, f"Scan {msg.scan} running")
        elif msg.kind == m.RESULT:
            self.stats.count_in(msg.nbytes())
            acquired = msg.times.get("acquired")
            if acquired:
                self.stats.latency.add(time.time() - acquired)
        try:
            self.handle(msg)
        except Exception as exc:
            self.stats.errors += 1
            self.log.exception("handling %s %s/%s failed", msg.kind, msg.scan, msg.index)
            self.set_health(Health.FAULT, f"{self.name} failed on scan {msg.scan} index {msg.index}: {exc}")
            return
        if msg.kind == m.SCAN_END:
            self.scans_done += 1
            if self.health is Health.RUNNING:
                self.set_health(Health.ON, f"Scan {msg.scan} done; idle")

    def blocked(self) -> bool:
        """True while the consumer cannot take more (withholds credit: backpressure)."""
        return False

    def handle(self, msg: m.Message) -> None:
        """Process one ordered message (scan start, result, gap, scan end)."""

    def idle(self) -> None:
        """Called every loop turn (flush files, publish views)."""

    def teardown(self) -> None:
        self.link.bye()
        time.sleep(0.02)
        self.link.close()

    def counters(self) -> dict[str, Any]:
        c = self.stats.snapshot()
        c.update(ScansDone=self.scans_done, QueueCapacity=self.link.credit, InFlight=self._owed, QueueDepth=0)
        return c
