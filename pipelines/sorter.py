"""The sorter: fan in results from any number of workers, restore acquisition order.

:class:`ReorderBuffer` is the ordering logic alone (no sockets): for each scan it
emits the scan start, then indices 0, 1, 2... in order, then the scan end once
every index up to the scan's frame count was emitted. Duplicates (from frames
dispatched twice) are dropped and counted. An index still missing when the
window is full or after the gap timeout becomes a gap record, counted, and the
flow moves on. :class:`SorterEngine` wires it to sockets: workers PUSH results to
its collect endpoint; consumers (sink, writers) take the ordered stream from its
data endpoint through credit links, every consumer every message, and a consumer
without credit holds the sorter back (backpressure), never a drop.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import zmq

from . import message as m
from .engine import Engine, Health
from .transport import BadPeerMessage, Peer, bind_socket, drain, key_of, receive, send

#: how many messages are kept (results as gap records) for a consumer that went away
AWAY_LIMIT = 100_000
#: how long a consumer that went away is waited for before it is forgotten
AWAY_KEEP_S = 3600.0


@dataclass
class _Away:
    """What a consumer that went away (killed, restarting) gets when it comes back under
    the same name: what it had not confirmed, then what it missed, results turned into
    gap records that name the loss, so its files and counters say exactly what is lost."""

    name: str
    since: float
    replay: deque = field(default_factory=deque)  # messages to send again, in order
    open_start: m.Message | None = None  # the scan the consumer was in, if any
    lost: int = 0


@dataclass
class _ScanOrder:
    scan: int | str
    stream: str = ""
    start: m.Message | None = None
    started: bool = False
    next_index: int = 0
    buffer: dict[int, m.Message] = field(default_factory=dict)
    end: m.Message | None = None
    total: int | None = None
    head_since: float = field(default_factory=time.monotonic)


class ReorderBuffer:
    """Restore order per scan within a bounded window; see the module docstring."""

    def __init__(self, window: int = 256, gap_timeout_s: float = 10.0, remember_scans: int = 64):
        if window < 1:
            raise ValueError(f"ReorderWindow must be >= 1, got {window}")
        self.window = window
        self.gap_timeout_s = gap_timeout_s
        self._scans: OrderedDict[int | str, _ScanOrder] = OrderedDict()
        self._finished: deque[int | str] = deque(maxlen=remember_scans)
        self.duplicates = 0
        self.late = 0
        self.missing_starts = 0
        self.missing = 0
        self.missing_indices: deque[tuple[int | str, int]] = deque(maxlen=1000)
        self.emitted = 0
        self.aborted_scans = 0

    def resume(self, scan: int | str, stream: str, next_index: int) -> bool:
        """Continue a scan a consumer was in when this sorter (re)started: its start was
        already delivered, indices below ``next_index`` too. Returns False if the scan is
        known here already (then nothing changes)."""
        if scan in self._finished:
            return False
        order = self._scans.get(scan)
        if order is not None and (order.started or order.start is not None):
            return False
        if order is None:
            order = self._scans[scan] = _ScanOrder(scan, stream)
        order.started = True
        order.next_index = max(0, next_index)
        for index in [i for i in order.buffer if i < order.next_index]:
            del order.buffer[index]
            self.late += 1
        return True

    def _supersede(self, start: m.Message) -> None:
        """A scan start from a restarted master (another ``master_epoch``): the scans of
        the master before it will get no more frames; end them with what they have (the
        holes as gaps) instead of holding the new scan behind them."""
        epoch = start.meta.get("master_epoch")
        if not epoch:
            return
        reason = "the master restarted before this frame was processed"
        for order in list(self._scans.values()):
            if order.scan == start.scan or order.end is not None or order.start is None:
                continue
            if order.start.meta.get("master_epoch") in (None, epoch):
                continue
            self.aborted_scans += 1
            total = max([order.next_index, *(i + 1 for i in order.buffer)])
            for index in range(order.next_index, total):
                if index not in order.buffer:
                    body = {"reason": reason, "by": "sorter"}
                    order.buffer[index] = m.Message(m.GAP, scan=order.scan, index=index, stream=order.stream, body=body)
            aborted = {"frames": total, "aborted": "the master restarted during the scan"}
            order.total = total
            order.end = m.Message(m.SCAN_END, scan=order.scan, stream=order.stream, body=aborted, meta=dict(aborted))

    @property
    def buffered(self) -> int:
        return sum(len(s.buffer) for s in self._scans.values())

    def push(self, msg: m.Message, now: float | None = None) -> list[m.Message]:
        """Take one data message; return the messages now ready, in order."""
        now = time.monotonic() if now is None else now
        if msg.scan in self._finished:
            self.duplicates += 1
            return []
        order = self._scans.get(msg.scan)
        if order is None:
            order = self._scans[msg.scan] = _ScanOrder(msg.scan, msg.stream, head_since=now)
        if msg.kind == m.SCAN_START:
            if order.start is not None or order.started:
                self.duplicates += 1
                return []
            order.start = msg
            self._supersede(msg)
        elif msg.kind == m.SCAN_END:
            if order.end is not None:
                self.duplicates += 1
                return []
            total = msg.body.get("frames")
            order.total = total if isinstance(total, int) and total >= 0 else order.next_index + len(order.buffer)
            order.end = msg
        else:
            index = msg.index
            assert index is not None
            if index < order.next_index:
                self.late += 1
                return []
            if index in order.buffer or (order.total is not None and index >= order.total):
                self.duplicates += 1
                return []
            order.buffer[index] = msg
        return self._drain(now)

    def expire(self, now: float | None = None) -> list[m.Message]:
        """Emit gaps for indices missing past the timeout; call periodically."""
        now = time.monotonic() if now is None else now
        out: list[m.Message] = []
        while self._scans:
            order = next(iter(self._scans.values()))
            waiting = order.buffer or order.end is not None
            if not waiting or now - order.head_since < self.gap_timeout_s:
                break
            if not order.started and order.start is None:  # the start itself never came
                self.missing_starts += 1
                order.start = m.Message(
                    m.SCAN_START, scan=order.scan, stream=order.stream, meta={"start_missing": True}
                )
                out.extend(self._drain(now))
                continue
            out.extend(self._gap(order, now, f"no result within {self.gap_timeout_s:g} s"))
            out.extend(self._drain(now))
        return out

    def _gap(self, order: _ScanOrder, now: float, reason: str) -> list[m.Message]:
        index = order.next_index
        self.missing += 1
        self.missing_indices.append((order.scan, index))
        order.next_index += 1
        order.head_since = now
        body = {"reason": reason, "by": "sorter"}
        return [m.Message(m.GAP, scan=order.scan, index=index, stream=order.stream, body=body)]

    def _drain(self, now: float) -> list[m.Message]:
        out: list[m.Message] = []
        while self._scans:
            order = next(iter(self._scans.values()))
            if not order.started:
                if order.start is None:
                    break
                out.append(order.start)
                order.started = True
                order.head_since = now
            while order.next_index in order.buffer:
                msg = order.buffer.pop(order.next_index)
                if msg.kind == m.GAP:
                    self.missing += 1
                    self.missing_indices.append((order.scan, order.next_index))
                out.append(msg)
                order.next_index += 1
                order.head_since = now
            if order.total is not None and order.next_index >= order.total and not order.buffer:
                assert order.end is not None
                out.append(order.end)
                self._finished.append(order.scan)
                del self._scans[order.scan]
                continue
            if len(order.buffer) >= self.window:
                out.extend(self._gap(order, now, f"reorder window of {self.window} full"))
                continue
            break
        self.emitted += len(out)
        return out


def _resumed(start: m.Message) -> m.Message:
    """A copy of a scan start marked as the resumption of a scan the consumer was in."""
    copy = m.Message(m.SCAN_START, scan=start.scan, stream=start.stream, meta=dict(start.meta), body=dict(start.body))
    copy.times = dict(start.times)
    copy.body["resumed"] = True
    return copy


class SorterEngine(Engine):
    """Sockets around a :class:`ReorderBuffer`; see the module docstring."""

    def __init__(
        self,
        *,
        name: str = "sorter",
        bind: str = "127.0.0.1",
        collect_port: int = 0,
        data_port: int = 0,
        window: int = 256,
        gap_timeout_s: float = 10.0,
        outbox_capacity: int = 64,
        consumer_timeout_s: float = 5.0,
        batch_size: int = 1,
        batch_latency_ms: float = 20.0,
        context: zmq.Context | None = None,
    ):
        super().__init__(name, context)
        self.reorder = ReorderBuffer(window, gap_timeout_s)
        self.bind = bind
        self.ports = (collect_port, data_port)
        self.outbox_capacity = outbox_capacity
        self.consumer_timeout_s = consumer_timeout_s
        if not 1 <= batch_size <= m.MAX_BATCH:
            raise ValueError(f"BatchSize must be between 1 and {m.MAX_BATCH}, got {batch_size}")
        self.batch_size = batch_size
        self.batch_latency_s = batch_latency_ms / 1000.0
        self._waiting_since: dict[bytes, float] = {}
        self.batches_sent = 0
        self.collect_endpoint = ""
        self.endpoint = ""
        self.consumers: dict[bytes, Peer] = {}
        self._outboxes: dict[bytes, deque[m.Message]] = {}
        # per consumer: what was sent and not yet credited (one entry per send), and the
        # scan it confirmed starting and not ending: needed to resume it after a restart
        self._inflight: dict[bytes, deque[list[m.Message]]] = {}
        self._open_start: dict[bytes, m.Message | None] = {}
        self._away: dict[str, _Away] = {}
        self.consumer_losses: dict[str, dict[str, list[list[int]]]] = {}  # name -> scan -> ranges
        self.lost_for_consumers = 0
        self.forgotten_consumers = 0
        self._unclaimed: deque[m.Message] = deque()  # ordered output while no consumer is connected
        self._scan_gaps = 0  # gaps passed on in the current (or last) scan: ALARM until the next scan
        self._pull: zmq.Socket | None = None
        self._router: zmq.Socket | None = None
        self._last_expire = 0.0

    def setup(self) -> None:
        # workers' results arrive on a ROUTER so that each can be confirmed to its worker,
        # which acknowledges the frame to the master only then (end to end: a worker
        # killed with results still in its socket loses nothing, the master re-sends)
        self._pull, self.collect_endpoint = bind_socket(self.context, zmq.ROUTER, self.bind, self.ports[0])
        self._pull.rcvhwm = 16
        self._router, self.endpoint = bind_socket(self.context, zmq.ROUTER, self.bind, self.ports[1])
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.set_health(Health.ON, "Idle; no consumer connected yet")

    def bind_now(self) -> str:
        self.start()
        deadline = time.monotonic() + 5
        while not self.endpoint and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.endpoint

    def _backlog(self) -> int:
        return max((len(q) for q in self._outboxes.values()), default=len(self._unclaimed))

    def step(self) -> None:
        assert self._pull is not None and self._router is not None
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        accepting = self._backlog() < self.outbox_capacity
        if accepting:
            poller.register(self._pull, zmq.POLLIN)
        events = self.poll(poller, 20 if self.batch_size > 1 else None)  # partial batches leave on time
        if self._router in events:
            self._serve_consumers()
        if self._pull in events:
            self._collect()
        now = time.monotonic()
        if now - self._last_expire > 0.2:
            self._last_expire = now
            self._deliver(self.reorder.expire(now))
            self._drop_silent_consumers(now)
            self._forget_old(now)
            self._update_health()
        self._send_all()

    def _collect(self) -> None:
        assert self._pull is not None
        received: dict[bytes, list] = {}
        for _ in range(64):
            if self._backlog() >= self.outbox_capacity:
                break
            try:
                identity, msg = receive(self._pull, routed=True, flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            except BadPeerMessage as exc:
                self.stats.bad.record(exc.reason, exc.detail)
                continue
            if msg.kind not in m.DATA_KINDS or msg.kind == m.FRAME:
                self.stats.bad.record("unexpected_kind", f"{msg.kind} on the collect port")
                continue
            assert identity is not None
            received.setdefault(identity, []).append(key_of(msg))
            if msg.kind == m.RESULT:
                self.stats.count_in(msg.nbytes())
            if msg.kind == m.SCAN_START:
                self.stats.reset_scan()
            self._deliver(self.reorder.push(msg.stamp(self.name)))
        for identity, keys in received.items():  # taken (or known duplicates): the worker may ack them
            try:
                send(self._pull, m.control(m.CREDIT, received=keys), identity, zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the worker is gone or busy; it sends again and the duplicate is dropped

    def _deliver(self, ready: list[m.Message]) -> None:
        now = time.time()
        for msg in ready:
            if msg.kind == m.SCAN_START:
                self._scan_gaps = 0
            elif msg.kind == m.GAP:
                self._scan_gaps += 1
            if msg.kind == m.RESULT:
                self.stats.count_out()
                acquired = msg.times.get("acquired")
                if acquired:
                    self.stats.latency.add(now - acquired)
            for outbox in self._outboxes.values() or [self._unclaimed]:
                outbox.append(msg)
            for away in list(self._away.values()):
                self._keep_for(away, msg)
            self.emit("ordered", msg)

    def _keep_for(self, away: _Away, msg: m.Message) -> None:
        """Keep ``msg`` for a consumer that is away: results as gap records naming the loss."""
        if msg.kind == m.RESULT:
            assert msg.index is not None
            went = time.strftime("%H:%M:%S", time.localtime(time.time() - (time.monotonic() - away.since)))
            reason = f"not delivered: consumer {away.name} was away (killed or restarting) since {went}"
            msg = m.Message(m.GAP, scan=msg.scan, index=msg.index, stream=msg.stream, body={"reason": reason, "by": "sorter"})
            self._count_loss(away.name, msg.scan, msg.index)
            away.lost += 1
        away.replay.append(msg)
        if len(away.replay) > AWAY_LIMIT:
            self._forget(away, f"more than {AWAY_LIMIT} messages missed")

    def _count_loss(self, name: str, scan: int | str, index: int) -> None:
        """Record a result a consumer will not get, as ranges of indices per scan."""
        self.lost_for_consumers += 1
        ranges = self.consumer_losses.setdefault(name, {}).setdefault(str(scan), [])
        if ranges and ranges[-1][1] == index:
            ranges[-1][1] = index + 1
        else:
            ranges.append([index, index + 1])
        if len(self.consumer_losses[name]) > 64:  # the oldest scans' records go first
            del self.consumer_losses[name][next(iter(self.consumer_losses[name]))]

    def _forget(self, away: _Away, why: str) -> None:
        self._away.pop(away.name, None)
        self.forgotten_consumers += 1
        self.log.error("consumer %s forgotten (%s): it starts afresh if it comes back", away.name, why)

    def _send_all(self) -> None:
        """Send each consumer what it has credit for: single messages, or batches of up
        to ``batch_size`` once that many wait or the oldest waited ``batch_latency``."""
        assert self._router is not None
        now = time.monotonic()
        for identity, outbox in self._outboxes.items():
            peer = self.consumers[identity]
            if not outbox:
                self._waiting_since.pop(identity, None)
                continue
            since = self._waiting_since.setdefault(identity, now)
            while outbox and peer.credit > 0:
                if self.batch_size == 1:
                    chunk: m.Message | list[m.Message] = outbox[0]
                    count = 1
                else:
                    if len(outbox) < self.batch_size and now - since < self.batch_latency_s:
                        break
                    count = min(self.batch_size, len(outbox))
                    chunk = [outbox[i] for i in range(count)]
                try:
                    send(self._router, chunk, identity, zmq.NOBLOCK)
                except zmq.ZMQError:
                    break
                self._inflight[identity].append([outbox.popleft() for _ in range(count)])
                peer.credit -= 1
                peer.sent += count
                self.batches_sent += 1
                self._waiting_since[identity] = since = now

    def _serve_consumers(self) -> None:
        assert self._router is not None
        for identity, msg in drain(self._router, self.stats.bad, routed=True, limit=256):
            assert identity is not None
            peer = self.consumers.get(identity)
            if msg.kind == m.HELLO:
                name, credit = msg.body.get("name"), msg.body.get("credit")
                if not isinstance(name, str) or not isinstance(credit, int) or not 0 < credit <= 1024:
                    self.stats.bad.record("bad_hello", f"hello {str(msg.body)[:80]}")
                    continue
                if peer is None:
                    self._add_consumer(identity, name, credit, msg.body.get("resume"))
                else:
                    peer.credit = credit
            elif peer is None:
                if msg.kind in (m.CREDIT, m.HEARTBEAT):
                    try:
                        send(self._router, m.control(m.HELLO, again=True), identity, zmq.NOBLOCK)
                    except zmq.ZMQError:
                        pass
                else:
                    self.stats.bad.record("unknown_peer", f"{msg.kind} from an unknown consumer")
            elif msg.kind == m.CREDIT:
                n = msg.body.get("n", 0)
                if not isinstance(n, int) or not 0 <= n <= 1024:
                    self.stats.bad.record("bad_credit", f"credit {str(msg.body)[:80]} from {peer.name}")
                    continue
                peer.credit += n
                peer.done += n
                peer.last_seen = time.monotonic()
                self._credited(identity, n)
            elif msg.kind == m.HEARTBEAT:
                peer.last_seen = time.monotonic()
            elif msg.kind == m.BYE:
                self._remove(identity, "left")
            else:
                self.stats.bad.record("unexpected_kind", f"{msg.kind} from consumer {peer.name}")

    def _add_consumer(self, identity: bytes, name: str, credit: int, resume: Any) -> None:
        for other, peer in list(self.consumers.items()):  # the same consumer, restarted
            if peer.name == name:
                self._remove(other, "replaced by a new connection under the same name (restarted)")
        self.consumers[identity] = Peer(identity, name, credit=credit)
        self._inflight[identity] = deque()
        self._open_start[identity] = None
        away = self._away.pop(name, None)
        if away is not None:
            outbox = away.replay
            if away.open_start is not None and not (outbox and outbox[0].kind == m.SCAN_START):
                outbox.appendleft(_resumed(away.open_start))
            self.log.warning(
                "consumer %s is back after %.1f s: %d messages sent again, %d results lost for it",
                name, time.monotonic() - away.since, len(outbox), away.lost,
            )  # fmt: skip
        elif not self._outboxes:  # the first consumer takes what was sorted while nobody listened
            outbox, self._unclaimed = self._unclaimed, deque()
        else:
            outbox = deque()
        self._outboxes[identity] = outbox
        if isinstance(resume, dict):
            self._resume_scan(name, resume)
        self.log.info("consumer %s connected with credit %d", name, credit)
        self.emit("consumers", self.consumer_names())

    def _resume_scan(self, name: str, resume: dict) -> None:
        """A consumer in the middle of a scan this sorter does not know (it restarted):
        carry on from where the consumer is; what the old sorter lost becomes gaps."""
        scan, stream, nxt = resume.get("scan"), resume.get("stream", ""), resume.get("next")
        if isinstance(scan, bool) or not isinstance(scan, int | str) or not isinstance(nxt, int) or nxt < 0:
            self.stats.bad.record("bad_hello", f"resume {str(resume)[:80]} from {name}")
            return
        if self.reorder.resume(scan, stream if isinstance(stream, str) else "", nxt):
            self.log.warning("scan %s resumed at index %d for consumer %s (this sorter restarted)", scan, nxt, name)

    def _credited(self, identity: bytes, n: int) -> None:
        inflight = self._inflight[identity]
        for _ in range(min(n, len(inflight))):
            for msg in inflight.popleft():
                if msg.kind == m.SCAN_START:
                    self._open_start[identity] = msg
                elif msg.kind == m.SCAN_END:
                    self._open_start[identity] = None

    def _remove(self, identity: bytes, why: str) -> None:
        """A consumer left: said goodbye, fell silent, or came back under a new connection.
        What it had not confirmed is kept to send again if it comes back (see _Away)."""
        peer = self.consumers.pop(identity)
        unsent = self._outboxes.pop(identity)
        inflight = self._inflight.pop(identity)
        open_start = self._open_start.pop(identity)
        if why == "left" and not unsent and not inflight:
            self.log.info("consumer %s %s", peer.name, why)
        else:
            away = _Away(peer.name, time.monotonic(), open_start=open_start)
            for msg in (msg for chunk in inflight for msg in chunk):
                away.replay.append(msg)
            for msg in unsent:
                away.replay.append(msg)
            self._away[peer.name] = away
            self.log.error(
                "consumer %s %s with %d messages not confirmed: kept to send again when it comes back; "
                "results sorted meanwhile are recorded as lost for it", peer.name, why, len(away.replay),
            )  # fmt: skip
        self.emit("consumers", self.consumer_names())

    def _forget_old(self, now: float) -> None:
        for away in list(self._away.values()):
            if now - away.since > AWAY_KEEP_S:
                self._forget(away, f"away for more than {AWAY_KEEP_S:.0f} s")

    def _drop_silent_consumers(self, now: float) -> None:
        for identity, peer in list(self.consumers.items()):
            if now - peer.last_seen > self.consumer_timeout_s:
                self._remove(identity, f"silent for {now - peer.last_seen:.1f} s")

    def _update_health(self) -> None:
        if self.health is Health.FAULT:
            return
        if self._away:
            names = ", ".join(sorted(self._away))
            self.set_health(
                Health.ALARM,
                f"Consumer {names} went away (killed or stopped): results sorted meanwhile are kept as gap "
                f"records for it ({self.lost_for_consumers} so far, see ConsumerLosses); restart it (tangopipe restart)",
            )
        elif self._scan_gaps:
            self.set_health(
                Health.ALARM,
                f"{self.reorder.missing} frames missing (gap records sent); last {self.reorder.missing_indices[-1]}",
            )
        elif not self.consumers:
            held = f"{len(self._unclaimed)} results held" if self._unclaimed else "results will be held"
            self.set_health(Health.ON, f"No consumer connected: {held} (start the sink/writer)")
        elif self.reorder.buffered or self._backlog():
            self.set_health(Health.RUNNING, f"Sorting; {len(self.consumers)} consumers")
        else:
            self.set_health(Health.ON, f"Idle; {len(self.consumers)} consumers connected")

    def teardown(self) -> None:
        for sock in (self._pull, self._router):
            if sock is not None:
                sock.close(0)

    def consumer_names(self) -> list[str]:
        return sorted(p.name for p in self.consumers.values())

    def counters(self) -> dict[str, Any]:
        c = self.stats.snapshot()
        c.update(
            QueueDepth=self.reorder.buffered,
            QueueCapacity=self.reorder.window,
            Backlog=self._backlog(),
            MissingFrames=self.reorder.missing,
            Duplicates=self.reorder.duplicates,
            LateResults=self.reorder.late,
            Consumers=len(self.consumers),
            LostForConsumers=self.lost_for_consumers,
            ConsumersAway=len(self._away),
            AbortedScans=self.reorder.aborted_scans,
            BatchesSent=self.batches_sent,
        )
        return c
