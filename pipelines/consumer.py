"""The receiving end of a sorter's ordered stream (the sink and the writers).

A consumer takes every message of the stream in order through a credit link and
grants credit back only once it has finished with a message, so a slow consumer
slows the sorter instead of losing data.

Restarts: a consumer says in its HELLO which scan it is in and the next index it
expects, so a restarted sorter carries on from there; messages it already had
(sent again after a restart of either side) are skipped and counted as duplicates.
"""

from __future__ import annotations

import time
from typing import Any

import zmq

from . import message as m
from .engine import Engine, Health
from .transport import BadPeerMessage, UpstreamLink, receive_many


class StreamLink(UpstreamLink):
    """The credit link to a sorter; HELLO carries where in the stream this consumer is."""

    def __init__(self, context: zmq.Context, name: str, credit: int, position: Any):
        super().__init__(context, name, credit=credit)
        self.position = position

    def hello(self, outstanding: int = 0, extra: dict[str, Any] | None = None) -> None:
        resume = self.position()
        super().hello(outstanding, {**(extra or {}), "resume": resume} if resume else extra)


class ConsumerEngine(Engine):
    """Base of the sink and writer engines: override :meth:`handle`."""

    def __init__(self, name: str, *, credit: int = 16, heartbeat_s: float = 0.5, context: zmq.Context | None = None):
        super().__init__(name, context)
        self.link = StreamLink(self.context, name, credit, self.position)
        self.heartbeat_s = heartbeat_s
        self._wanted = ""
        self.current_scan: int | str | None = None
        self.scans_done = 0
        self._owed = 0  # credit withheld while blocked
        self._open: tuple[int | str, str] | None = None  # the scan in progress (scan, stream)
        self._next = 0  # the next index expected in it
        self.duplicates = 0

    def position(self) -> dict[str, Any] | None:
        """Where in the stream this consumer is (sent in HELLO), None between scans."""
        if self._open is None:
            return None
        return {"scan": self._open[0], "stream": self._open[1], "next": self._next}

    def _fresh(self, msg: m.Message) -> bool:
        """False for a message this consumer already had (sent again after a restart)."""
        if msg.kind == m.SCAN_START:
            if self._open is not None and self._open[0] == msg.scan:
                self.duplicates += 1
                return False
            self._open, self._next = (msg.scan, msg.stream), 0
        elif msg.kind in (m.RESULT, m.GAP) and self._open is not None and self._open[0] == msg.scan:
            assert msg.index is not None
            if msg.index < self._next:
                self.duplicates += 1
                return False
            self._next = msg.index + 1
        elif msg.kind == m.SCAN_END and self._open is not None and self._open[0] == msg.scan:
            self._open = None
        return True

    def connect(self, endpoint: str) -> None:
        """Take the ordered stream from ``endpoint`` (reconnects when it changes)."""
        self._wanted = endpoint

    def step(self) -> None:
        if self._wanted and self._wanted != self.link.endpoint:
            self.log.info("taking the ordered stream from %s (position: %s)", self._wanted, self.position() or "between scans")
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
                    if self._fresh(msg):
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
        c.update(ScansDone=self.scans_done, Duplicates=self.duplicates, NextIndex=self._next if self._open else -1, QueueCapacity=self.link.credit, InFlight=self._owed, QueueDepth=0)
        return c
