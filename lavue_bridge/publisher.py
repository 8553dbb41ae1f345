"""Feed Lavue live views: latest image per topic, throttled, never slowing the caller.

Lavue takes one queued message per GUI poll (about 10 Hz) and never skips
ahead, so a full-rate stream would make it lag further and further behind.
:class:`LavuePublisher` therefore keeps only the newest image offered per topic
and a background thread sends it at most ``max_rate_hz`` times a second. An
image replaced before it was sent is counted as *skipped*: the view is
latest-only by design, nothing is lost from the pipeline itself.

ZMQ PUB matches topics by prefix: a Lavue watching ``det`` also receives (and
discards) ``det_roi`` messages, which then take room in its small receive queue.
Prefer topics that are not prefixes of one another.
"""

from __future__ import annotations

import collections
import logging
import math
import socket
import threading
import time
from typing import Any

import numpy as np
import zmq

from lavue_bridge import protocol

logger = logging.getLogger(__name__)

#: Bind addresses meaning "every interface": Lavue users then type the machine's name.
_ANY_INTERFACE = frozenset({"*", "0.0.0.0", "::", "[::]"})
#: Window over which ``stats()`` measures the publish rate.
RATE_WINDOW_S = 1.0


def _positive_number(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


_CHANGE_REPEATS = 4  # datasources messages sent again after a change of topics ...
_CHANGE_REPEAT_S = 0.25  # ... this far apart


class _TopicSlot:
    """What one topic holds: the image waiting to go out and its counters."""

    __slots__ = (
        "topic",
        "image",
        "meta",
        "name",
        "seq",
        "in_flight",
        "retired",
        "last_sent",
        "offered",
        "published",
        "skipped",
        "failed",
        "last_error",
        "sent_times",
    )

    def __init__(self, topic: str):
        self.topic = topic
        self.image: np.ndarray | None = None
        self.meta: dict | None = None
        self.name: str | None = None
        self.seq = 0
        self.in_flight = False
        self.retired = False
        self.last_sent = -math.inf
        self.offered = 0
        self.published = 0
        self.skipped = 0
        self.failed = 0
        self.last_error = ""
        self.sent_times: collections.deque[float] = collections.deque()

    @property
    def pending(self) -> int:
        return int(self.image is not None) + int(self.in_flight)

    def rate_hz(self, now: float) -> float:
        while self.sent_times and self.sent_times[0] <= now - RATE_WINDOW_S:
            self.sent_times.popleft()
        return len(self.sent_times) / RATE_WINDOW_S

    def counters(self, now: float) -> dict[str, Any]:
        return {
            "offered": self.offered,
            "published": self.published,
            "skipped": self.skipped,
            "failed": self.failed,
            "pending": self.pending,
            "rate_hz": self.rate_hz(now),
            "last_error": self.last_error,
        }


class LavuePublisher:
    """A ZMQ PUB socket Lavue connects to, fed latest-only from any thread.

    ``offer()`` only stores a reference under a lock: the array must not be
    modified in place afterwards (pipeline results are fresh arrays). Encoding,
    the transpose Lavue needs (see :func:`lavue_bridge.protocol.lavue_layout`)
    and sending all happen on the publisher's own thread.
    """

    def __init__(
        self,
        bind: str = "127.0.0.1",
        port: int = 0,
        max_rate_hz: float = 10.0,
        datasources_period_s: float = 1.0,
        context: zmq.Context | None = None,
        send_hwm: int = 2,
    ):
        if not isinstance(bind, str) or not bind:
            raise ValueError(f"bind must be a host name, an IP address or '*', got {bind!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an integer in [0, 65535] (0: any free port), got {port!r}")
        if isinstance(send_hwm, bool) or not isinstance(send_hwm, int) or send_hwm < 1:
            raise ValueError(f"send_hwm must be an integer >= 1, got {send_hwm!r}")
        self._max_rate_hz = _positive_number("max_rate_hz", max_rate_hz)
        self._datasources_period_s = _positive_number("datasources_period_s", datasources_period_s)
        self._bind = bind
        self._own_context = context is None
        self._context = zmq.Context() if context is None else context
        self._socket = self._context.socket(zmq.PUB)
        # A slow viewer holds only a couple of frames; newer ones replace what it drops.
        self._socket.setsockopt(zmq.SNDHWM, send_hwm)
        self._socket.setsockopt(zmq.LINGER, 0)
        endpoint = f"tcp://{bind}:{port or '*'}"
        try:
            self._socket.bind(endpoint)
        except zmq.ZMQError as exc:
            self._socket.close(linger=0)
            if self._own_context:
                self._context.term()
            raise OSError(
                f"cannot bind the Lavue publisher to {endpoint} (bind={bind!r}, port={port}): {exc}"
            ) from exc
        last = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._port = int(last.rsplit(":", 1)[1])

        self._cond = threading.Condition()
        self._slots: dict[str, _TopicSlot] = {}
        self._name_seq: dict[str, int] = {}  # survives a topic's removal: names stay unique
        self._retired_totals = {"offered": 0, "published": 0, "skipped": 0, "failed": 0}
        self._retiring: set[_TopicSlot] = set()
        self._datasources_due = True
        self._datasources_next = time.monotonic()
        self._datasources_sent = 0
        # PUB drops when a viewer's queue is full: after a change, repeat the list a few times
        self._datasources_burst = 0
        self._closing = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"lavue-publisher:{self._port}", daemon=True)
        self._thread.start()

    # -- what a Lavue user needs ------------------------------------------------

    @property
    def address(self) -> str:
        """``host:port`` as a Lavue user types it (before ``/topic``)."""
        host = socket.gethostname() if self._bind in _ANY_INTERFACE else self._bind
        return f"{host}:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    @property
    def topics(self) -> list[str]:
        with self._cond:
            return list(self._slots)

    @property
    def max_rate_hz(self) -> float:
        """Most messages per second per topic; settable while running."""
        return self._max_rate_hz

    @max_rate_hz.setter
    def max_rate_hz(self, value: float) -> None:
        rate = _positive_number("max_rate_hz", value)
        with self._cond:
            self._max_rate_hz = rate
            self._cond.notify()

    @property
    def datasources_period_s(self) -> float:
        """Seconds between two ``datasources`` messages; settable while running."""
        return self._datasources_period_s

    @datasources_period_s.setter
    def datasources_period_s(self, value: float) -> None:
        period = _positive_number("datasources_period_s", value)
        with self._cond:
            self._datasources_period_s = period
            self._cond.notify()

    # -- feeding ----------------------------------------------------------------

    def offer(self, topic: str, image: np.ndarray, meta: dict | None = None, name: str | None = None) -> None:
        """Make ``image`` the newest one of ``topic``; returns at once.

        ``image`` is (rows, cols) or channel-first (C, rows, cols), any numeric
        dtype. ``meta`` keys go into Lavue's metadata as they are (axis metadata
        in Lavue's x-first convention, see :mod:`lavue_bridge.protocol`).
        ``name`` must differ from frame to frame (Lavue redraws on a new name);
        without one, "<topic> #<n>" is used. A topic not seen before is
        announced to Lavue at once.
        """
        protocol.check_topic(topic)
        protocol.check_image(image)
        if meta is not None:
            if not isinstance(meta, dict):
                raise TypeError(f"meta must be a dict or None, got {type(meta).__name__}")
            clash = protocol.RESERVED_KEYS.intersection(meta)
            if clash:
                raise ValueError(f"meta keys {sorted(clash)} are reserved: pass the frame name as name=")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {type(name).__name__} {name!r}")
        with self._cond:
            if self._closing:
                raise RuntimeError(f"offer({topic!r}): the Lavue publisher on port {self._port} is closed")
            slot = self._slots.get(topic)
            if slot is None:
                slot = self._add_topic(topic)
            if slot.image is not None:
                slot.skipped += 1
            seq = self._name_seq[topic] = self._name_seq[topic] + 1
            slot.image, slot.meta, slot.name, slot.seq = image, meta, name, seq
            slot.offered += 1
            self._cond.notify()

    def set_topics(self, topics: list[str]) -> None:
        """Declare the topics on offer; Lavue hears of any change at once.

        New topics are announced before their first image; a removed topic's
        waiting image is dropped (counted as skipped).
        """
        if isinstance(topics, str):
            raise TypeError(f"topics must be a list of str, got the str {topics!r}")
        wanted = list(dict.fromkeys(topics))
        for topic in wanted:
            protocol.check_topic(topic)
        with self._cond:
            if self._closing:
                raise RuntimeError(f"set_topics(): the Lavue publisher on port {self._port} is closed")
            if set(wanted) == set(self._slots):
                return
            for topic in [t for t in self._slots if t not in wanted]:
                self._retire(self._slots.pop(topic))
            for topic in wanted:
                if topic not in self._slots:
                    self._add_topic(topic)
            self._datasources_due = True
            self._datasources_burst = _CHANGE_REPEATS
            self._cond.notify()

    def _add_topic(self, topic: str) -> _TopicSlot:
        # caller holds the lock
        slot = self._slots[topic] = _TopicSlot(topic)
        self._name_seq.setdefault(topic, 0)
        self._datasources_due = True
        self._datasources_burst = _CHANGE_REPEATS
        return slot

    def _retire(self, slot: _TopicSlot) -> None:
        # caller holds the lock
        if slot.image is not None:
            slot.image = slot.meta = None
            slot.skipped += 1
        slot.retired = True
        if slot.in_flight:
            self._retiring.add(slot)  # folded into the totals once sent
        else:
            self._fold(slot)

    def _fold(self, slot: _TopicSlot) -> None:
        for key in self._retired_totals:
            self._retired_totals[key] += getattr(slot, key)

    # -- health -----------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters: totals, and per topic ``offered``, ``published``, ``skipped``,
        ``failed``, ``pending`` (waiting or being sent) and ``rate_hz`` (sent in the
        last second). Always ``offered == published + skipped + failed + pending``."""
        now = time.monotonic()
        with self._cond:
            per_topic = {topic: slot.counters(now) for topic, slot in self._slots.items()}
            totals = dict(self._retired_totals)
            totals["pending"] = 0
            for slot in self._retiring:
                for key in totals:
                    totals[key] += slot.pending if key == "pending" else getattr(slot, key)
            for counters in per_topic.values():
                for key in totals:
                    totals[key] += counters[key]
            return {
                **totals,
                "rate_hz": sum(c["rate_hz"] for c in per_topic.values()),
                "datasources_sent": self._datasources_sent,
                "max_rate_hz": self._max_rate_hz,
                "topics": per_topic,
            }

    # -- the sending thread -------------------------------------------------------

    def _next_work(
        self,
    ) -> tuple[list[tuple[_TopicSlot, np.ndarray, dict | None, str]], list[str] | None] | None:
        """Wait until something is due; take it out of the slots. None when closing."""
        with self._cond:
            while True:
                if self._closing:
                    return None
                now = time.monotonic()
                interval = 1.0 / self._max_rate_hz
                if not self._datasources_due and now >= self._datasources_next:
                    self._datasources_due = True
                wake = self._datasources_next
                ready = []
                for slot in self._slots.values():
                    if slot.image is None or slot.in_flight:
                        continue
                    due = slot.last_sent + interval
                    if due <= now:
                        ready.append(slot)
                    else:
                        wake = min(wake, due)
                if ready or self._datasources_due:
                    break
                self._cond.wait(timeout=max(wake - now, 0.0))
            work = []
            for slot in ready:
                name = slot.name if slot.name is not None else f"{slot.topic} #{slot.seq}"
                work.append((slot, slot.image, slot.meta, name))
                slot.image = slot.meta = slot.name = None
                slot.in_flight = True
                slot.last_sent = now
            topics = None
            if self._datasources_due:
                topics = list(self._slots)
                self._datasources_due = False
                if self._datasources_burst > 0:
                    self._datasources_burst -= 1
                    self._datasources_next = now + min(_CHANGE_REPEAT_S, self._datasources_period_s)
                else:
                    self._datasources_next = now + self._datasources_period_s
            return work, topics

    def _run(self) -> None:
        while True:
            taken = self._next_work()
            if taken is None:
                return
            work, topics = taken
            if topics is not None:
                try:
                    self._socket.send_multipart(protocol.encode_datasources(topics))
                    with self._cond:
                        self._datasources_sent += 1
                except zmq.ZMQError as exc:
                    logger.warning("Lavue publisher: datasources not sent: %s", exc)
            for slot, image, meta, name in work:
                error = ""
                try:
                    parts = protocol.encode_image(slot.topic, image, name, meta)
                    self._socket.send_multipart(parts, copy=False)
                except Exception as exc:  # a bad frame is counted, never stops the view
                    error = f"{type(exc).__name__}: {exc}"
                    logger.warning("Lavue publisher: %s frame %r not sent: %s", slot.topic, name, error)
                with self._cond:
                    slot.in_flight = False
                    if error:
                        slot.failed += 1
                        slot.last_error = error
                    else:
                        slot.published += 1
                        slot.sent_times.append(time.monotonic())
                    if slot.retired and slot in self._retiring:
                        self._retiring.discard(slot)
                        self._fold(slot)
                    self._cond.notify()

    # -- lifetime -------------------------------------------------------------------

    def close(self) -> None:
        """Stop the thread and close the socket; safe to call twice."""
        with self._cond:
            if self._closed:
                return
            self._closing = True
            self._cond.notify()
        self._thread.join()
        with self._cond:
            if self._closed:
                return
            self._closed = True
        self._socket.close(linger=0)
        if self._own_context:
            self._context.term()

    def __enter__(self) -> LavuePublisher:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closing else "open"
        return f"<LavuePublisher {self.address} {state} topics={self.topics} max_rate_hz={self._max_rate_hz}>"
