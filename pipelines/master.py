"""The pipeline master: ingest frames from a source, queue them, dispatch them by credit.

Every data message (scan start, frame, gap, scan end) is a work item that must
reach exactly one worker of every worker group. Items stay held by the master
until a worker of each group acknowledges them, so the frames a worker holds
when it dies are dispatched again. The queue is bounded in frames and bytes;
when it is full the overflow policy decides: ``block`` the source (nothing
lost), or drop the newest / oldest frame, replacing it by a gap record so the
loss is counted and visible downstream, never silent.

Workers on the master's host (same host name and kernel boot id in their HELLO)
get frames through a shared-memory ring (pipelines/shm.py): the frame is copied
once into a slot and only a handle goes over ZeroMQ. The slot is held until the
worker acknowledges the frame and reclaimed when the worker leaves, is lost or
refuses the handle; one slot serves every group that has the frame on a
shared-memory worker at the same time. When no slot is free (or the ring cannot
be made) the frame goes over ZeroMQ as usual and the fallback is counted: the
delivery rules do not depend on the path.
"""

from __future__ import annotations

import enum
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from . import message as m
from . import shm
from .engine import Engine, Health
from .sources import FrameSource
from .transport import Peer, bind_socket, drain, key_of, key_tuple, send

#: StartScan metadata copied into every frame's metadata (the steps see only the frame's)
SCAN_KEYS_FOR_STEPS = ("scan_shape", "snake", "energy_keV", "wavelength")


class OverflowPolicy(enum.StrEnum):
    BLOCK = "block"
    DROP_NEWEST = "drop_newest"
    DROP_OLDEST = "drop_oldest"


class ScanError(RuntimeError):
    """A scan command that does not fit the master's state (named in the message)."""


@dataclass(eq=False)
class WorkItem:
    msg: m.Message
    groups_left: set[str]
    nbytes: int
    acquired: float = field(default_factory=time.time)
    in_flight: int = 0  # how many workers hold it now
    key: tuple = ()
    shm: dict[str, Any] | None = None  # handle of the ring slot holding a copy of the frame
    shm_holders: set[bytes] = field(default_factory=set)  # workers sent that handle, not done yet


#: how long a lost worker keeps the master in ALARM if it does not come back
LOST_ALARM_S = 600.0


class MasterEngine(Engine):
    """Queue and credit dispatcher; see the module docstring."""

    def __init__(
        self,
        source: FrameSource,
        *,
        name: str = "master",
        groups: Iterable[str] = ("main",),
        bind: str = "127.0.0.1",
        port: int = 0,
        queue_capacity: int = 64,
        queue_bytes: int = 2 << 30,
        overflow_policy: str = "block",
        heartbeat_timeout_s: float = 3.0,
        stream: str = "raw",
        use_shm: bool = True,
        shm_slots: int = 0,
        shm_slot_bytes: int = 0,
        context: zmq.Context | None = None,
    ):
        super().__init__(name, context)
        try:
            self.policy = OverflowPolicy(overflow_policy)
        except ValueError:
            choices = ", ".join(p.value for p in OverflowPolicy)
            raise ValueError(f"OverflowPolicy {overflow_policy!r} is not one of {choices}") from None
        if queue_capacity < 1:
            raise ValueError(f"MaxQueueFrames must be >= 1, got {queue_capacity}")
        if type(shm_slots) is not int or not 0 <= shm_slots <= shm.MAX_SLOTS:
            raise ValueError(f"ShmSlots must be 0 (automatic) to {shm.MAX_SLOTS}, got {shm_slots!r}")
        if type(shm_slot_bytes) is not int or shm_slot_bytes < 0:
            raise ValueError(f"ShmSlotBytes must be 0 (first frame's size) or more, got {shm_slot_bytes!r}")
        self.groups = list(dict.fromkeys(groups))
        if not self.groups:
            raise ValueError("the master needs at least one worker group")
        self.source = source
        self.bind, self.port = bind, port
        self.queue_capacity = queue_capacity
        self.queue_bytes = queue_bytes
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.stream = stream
        self.endpoint = ""
        self._cond = threading.Condition()
        self._pending: dict[str, deque[WorkItem]] = {g: deque() for g in self.groups}
        self._held: OrderedDict[tuple, WorkItem] = OrderedDict()
        self._held_frames = 0
        self._held_bytes = 0
        self.peers: dict[bytes, Peer] = {}
        self.redispatched = 0
        self._dispatch_count = 0
        self.lost_workers = 0
        self._lost_names: dict[str, float] = {}  # workers lost and not back yet -> when (ALARM)
        self.dispatched = 0
        self.scan_id: int | str | None = None
        self.scan_meta: dict[str, Any] = {}
        self.scan_frames = 0
        self.scan_expected = 0
        self.scan_dropped = 0
        self._last_scan = 0  # numbering goes on from here (a device sets it from the database)
        # this run of the master: scans of an earlier run (killed mid-scan) are ended by the sorter
        self.epoch = uuid.uuid4().hex[:12]
        self._scan_open = False
        self._closing = False
        self._ended_by_source = False
        self._source_thread: threading.Thread | None = None
        self._sock: zmq.Socket | None = None
        self._source_error = ""
        # same-host fast path
        self.use_shm = bool(use_shm) and shm.shm_supported()
        self.shm_slots = shm_slots  # 0: shm.auto_slots, from the first frame's size
        self.shm_slot_bytes = shm_slot_bytes
        self._boot_id = shm.boot_id()
        self._ring: shm.FrameRing | None = None
        self._shm_error = ""  # why no ring could be made; tried again at the next scan
        self._shm_peers: dict[bytes, str] = {}  # same-host workers -> ring segment announced to them
        self.shm_frames = 0
        self.shm_fallbacks = 0
        self.shm_refused = 0
        self.shm_reclaimed = 0

    # -- control (any thread) ------------------------------------------------------------
    def setup(self) -> None:
        if self.use_shm:
            shm.remove_stale_segments()
        self._sock, self.endpoint = bind_socket(self.context, zmq.ROUTER, self.bind, self.port)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.set_health(Health.ON, f"Idle; waiting for StartScan; workers connect to {self.endpoint}")
        if getattr(self.source, "drives_scans", False):
            threading.Thread(target=self._follow_scans, name=f"{self.name}-follow", daemon=True).start()

    def _follow_scans(self) -> None:
        """For a source that has scans of its own (a chained pipeline): start and end
        our scans with its scans, so no one has to send StartScan here."""
        while not self._stop.is_set():
            try:
                meta = self.source.wait_scan(0.5)  # type: ignore[attr-defined]
                if meta is None or self._stop.is_set():
                    continue
                self.start_scan(meta)
                while self.acquiring and not self._stop.is_set():
                    time.sleep(0.05)
                if self._scan_open:
                    self.end_scan()
            except ScanError as exc:  # e.g. someone sent StartScan by hand: wait for it to end
                self.log.warning("following the upstream scans: %s", exc)
                self._stop.wait(1.0)

    def bind_now(self) -> str:
        """Start the loop and wait until the data endpoint is bound; return it."""
        self.start()
        deadline = time.monotonic() + 5
        while not self.endpoint and self.health is not Health.FAULT and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.endpoint

    def start_scan(self, meta: Mapping[str, Any] | None = None) -> int | str:
        """Open a scan and start acquiring from the source; returns the scan id."""
        meta = dict(meta or {})
        with self._cond:
            if self._scan_open:
                raise ScanError(f"scan {self.scan_id} is still open; send EndScan first")
            scan_id = meta.get("scan_id", self._last_scan + 1)
            if isinstance(scan_id, bool) or not isinstance(scan_id, int | str):
                raise ScanError(f"scan_id {scan_id!r} must be an integer or a string")
            if isinstance(scan_id, int):
                self._last_scan = max(self._last_scan, scan_id)
            expected = meta.get("frames", 0)
            if isinstance(expected, bool) or not isinstance(expected, int) or expected < 0:
                raise ScanError(f"frames {expected!r} must be a non-negative integer")
            self.scan_id, self.scan_meta = scan_id, meta
            self.scan_frames = self.scan_dropped = 0
            self.scan_expected = expected
            self._scan_open = True
            self._ended_by_source = False
            self._source_error = ""
            self._shm_error = ""
            self.stats.reset_scan()
            meta.setdefault("scan_uid", uuid.uuid4().hex)  # tells this scan's file from another with its id
            meta["master_epoch"] = self.epoch
            start = m.Message(m.SCAN_START, scan=scan_id, stream=self.stream, meta=meta)
            start.meta["source"] = self.source.describe()
            self._enqueue(start.stamp("master"), count=False)
        self._source_thread = threading.Thread(
            target=self._acquire, args=(scan_id, meta), name=f"{self.name}-source", daemon=True
        )
        self._source_thread.start()
        self.set_health(Health.RUNNING, f"Scan {scan_id} running")
        if self._lost_names:
            self._lost_alarm()
        self.emit("scan_started", scan_id)
        return scan_id

    def end_scan(self, timeout: float = 2.0) -> int:
        """Stop acquiring and close the scan; returns the number of frames acquired.

        After a source ended the scan by itself (an Eiger series end), a late EndScan
        (e.g. Sardana's post-scan hook) is answered with that scan's frame count."""
        with self._cond:
            if not self._scan_open:
                if self._ended_by_source:
                    self._ended_by_source = False
                    return self.scan_frames
                raise ScanError("no scan is open; send StartScan first")
        self.source.stop()
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        thread = self._source_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                raise ScanError(f"the source did not stop within {timeout} s; try EndScan again")
        with self._cond:
            end = m.Message(m.SCAN_END, scan=self.scan_id, stream=self.stream, body={"frames": self.scan_frames})
            end.meta = {"frames": self.scan_frames, "dropped": self.scan_dropped, "expected": self.scan_expected}
            end.meta.update(getattr(self.source, "scan_end_meta", dict)())  # e.g. positions of the scan points
            self._enqueue(end.stamp("master"), count=False)
            self._scan_open = False
            self._closing = False
            frames = self.scan_frames
        self.set_health(Health.ON, f"Scan {self.scan_id} ended after {frames} frames; idle")
        self.emit("scan_ended", (self.scan_id, frames))
        return frames

    def continue_numbering(self, last_scan: int) -> None:
        """Number the next scans after ``last_scan`` (kept across restarts by the device)."""
        self._last_scan = max(self._last_scan, int(last_scan))

    @property
    def last_scan(self) -> int:
        return self._last_scan

    @property
    def scan_open(self) -> bool:
        return self._scan_open

    @property
    def acquiring(self) -> bool:
        return self._source_thread is not None and self._source_thread.is_alive()

    # -- source thread -------------------------------------------------------------------
    def _acquire(self, scan_id: int | str, meta: dict[str, Any]) -> None:
        # what steps may need to know about the scan travels with every frame
        scan_keys = {k: meta[k] for k in SCAN_KEYS_FOR_STEPS if k in meta}
        try:
            for index, (array, frame_meta) in enumerate(self.source.frames(meta)):
                frame_meta = {**scan_keys, **frame_meta}
                msg = m.Message(m.FRAME, scan=scan_id, index=index, stream=self.stream, meta=frame_meta)
                msg.arrays["data"] = array
                msg.stamp("acquired")
                self.stats.count_in(array.nbytes)
                with self._cond:
                    self.scan_frames = index + 1
                    self._enqueue(msg, count=True)
                    if not self._scan_open:
                        return
            if getattr(self.source, "ends_scans", False) and self._scan_open and not self._closing:
                self._ended_by_source = True  # a later EndScan is answered, not refused
                self.end_scan()  # the stream said the series is over (an Eiger series end)
        except Exception as exc:  # a broken source is reported, the scan can still be ended
            self.log.exception("source failed")
            self._source_error = f"source failed: {exc}"
            self.set_health(Health.FAULT, f"Scan {scan_id}: {self._source_error}; EndScan, fix the source, retry")

    def _enqueue(self, msg: m.Message, count: bool) -> None:
        """Add a work item (caller holds the condition); apply the overflow policy to frames."""
        nbytes = msg.nbytes()
        if count:
            while self._held_frames >= self.queue_capacity or self._held_bytes + nbytes > self.queue_bytes:
                if self.policy is OverflowPolicy.BLOCK:
                    if self._closing:  # EndScan: accept the frame in hand rather than lose it
                        break
                    self._cond.wait(0.1)
                    continue
                victim = self._oldest_undispatched() if self.policy is OverflowPolicy.DROP_OLDEST else None
                if victim is None:  # drop_newest, or nothing old is still droppable
                    msg = self._as_gap(msg, "dropped by overflow policy (queue full)")
                    nbytes = 0
                    count = False
                else:
                    self._release_bytes(victim)
                    victim.msg = self._as_gap(victim.msg, "dropped by overflow policy (queue full)")
                    victim.nbytes = 0
                self.stats.dropped += 1
                self.scan_dropped += 1
                if self.health is not Health.FAULT:
                    self.set_health(
                        Health.ALARM,
                        f"Scan {self.scan_id}: {self.stats.dropped} frames dropped by OverflowPolicy "
                        f"{self.policy.value}; workers are too slow: add workers or use 'block'",
                    )
                if not count:
                    break
        item = WorkItem(msg, set(self.groups), nbytes, msg.times.get("acquired", time.time()))
        item.key = tuple(key_of(msg))
        self._held[item.key] = item
        if msg.kind == m.FRAME:
            self._held_frames += 1
            self._held_bytes += nbytes
        for group in self.groups:
            self._pending[group].append(item)
        self.wake()  # dispatch now, not at the loop's next timeout

    def _oldest_undispatched(self) -> WorkItem | None:
        for item in self._held.values():
            if item.msg.kind == m.FRAME and item.in_flight == 0 and len(item.groups_left) == len(self.groups):
                return item
        return None

    @staticmethod
    def _as_gap(msg: m.Message, reason: str) -> m.Message:
        return m.Message(m.GAP, scan=msg.scan, index=msg.index, stream=msg.stream, body={"reason": reason})

    def _release_bytes(self, item: WorkItem) -> None:
        if item.msg.kind == m.FRAME:
            self._held_frames -= 1
            self._held_bytes -= item.nbytes
            self._cond.notify_all()

    # -- loop thread ---------------------------------------------------------------------
    def step(self) -> None:
        assert self._sock is not None
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        if self.poll(poller):
            for identity, msg in drain(self._sock, self.stats.bad, routed=True, limit=1000):
                self._handle(identity, msg)
        self._check_peers()
        self._dispatch()

    def _handle(self, identity: bytes | None, msg: m.Message) -> None:
        assert identity is not None
        peer = self.peers.get(identity)
        if msg.kind == m.HELLO:
            name, group, credit = msg.body.get("name"), msg.body.get("group"), msg.body.get("credit")
            if group not in self._pending:
                self.stats.bad.record("unknown_group", f"worker {name!r} is in group {group!r}, not {self.groups}")
                return
            if not isinstance(credit, int) or not 0 < credit <= 1024 or not isinstance(name, str):
                self.stats.bad.record("bad_hello", f"hello from {identity!r}: {msg.body}")
                return
            if peer is not None:
                self._requeue(peer, "said hello again")
            for other, old in list(self.peers.items()):  # the same worker on a new connection
                if old.name == name and other != identity:
                    self._requeue(old, "reconnected")
                    del self.peers[other]
                    self._shm_peers.pop(other, None)
            self.peers[identity] = Peer(identity, name, group, credit)
            if self._lost_names.pop(name, None) is not None:
                self.log.info("worker %s is back", name)
                self._lost_alarm()
            self._shm_peers.pop(identity, None)
            local = self.use_shm and shm.same_host(msg.body, self._boot_id)
            if local:
                self._shm_peers[identity] = ""
            path = " (shared memory)" if local else ""
            self.log.info("worker %s joined group %s with credit %d%s", name, group, credit, path)
            self.emit("workers", self.worker_names())
            return
        if peer is None:
            if msg.kind in (m.CREDIT, m.HEARTBEAT):  # a worker from before a master restart
                try:
                    send(self._sock, m.control(m.HELLO, again=True), identity, zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            else:
                self.stats.bad.record("unknown_peer", f"{msg.kind} from unknown peer {identity!r}")
            return
        peer.last_seen = time.monotonic()
        if msg.kind == m.CREDIT:
            self._acknowledge(peer, msg)
        elif msg.kind == m.BYE:
            self._requeue(peer, "left")
            del self.peers[identity]
            self._shm_peers.pop(identity, None)
            self.emit("workers", self.worker_names())
        elif msg.kind != m.HEARTBEAT:
            self.stats.bad.record("unexpected_kind", f"{msg.kind} from worker {peer.name}")

    def _acknowledge(self, peer: Peer, msg: m.Message) -> None:
        n, done, refused = msg.body.get("n", 0), msg.body.get("done", []), msg.body.get("refused", [])
        lists = isinstance(done, list) and isinstance(refused, list)
        if not isinstance(n, int) or not 0 <= n <= 1024 or not lists:
            self.stats.bad.record("bad_credit", f"credit from {peer.name}: {str(msg.body)[:80]}")
            return
        now = time.time()
        with self._cond:
            if refused:
                self._take_back(peer, refused, str(msg.body.get("reason", ""))[:200])
            for raw in done:
                key = self._credit_key(raw)
                if key is None:
                    continue
                item = peer.in_flight.pop(key, None)
                if item is None:
                    continue  # already re-dispatched after a timeout: the sorter drops the duplicate
                item.in_flight -= 1
                peer.done += 1
                self._drop_slot(item, peer.identity)
                item.groups_left.discard(peer.group)
                if item.msg.kind == m.FRAME:
                    self.stats.latency.add(now - item.acquired)
                if not item.groups_left:
                    self._held.pop(item.key, None)
                    self._release_bytes(item)
            peer.credit += n

    def _credit_key(self, raw: Any) -> tuple | None:
        """A key acknowledged or refused by a worker, or None (counted) if it is not one."""
        try:
            key = key_tuple(raw)
            hash(key)
        except m.BadMessage as exc:
            self.stats.bad.record(exc.reason, exc.detail)
            return None
        except TypeError:  # e.g. a list inside: not a key we ever sent
            self.stats.bad.record("bad_credit", f"key {str(raw)[:60]} is not [scan, kind, index]")
            return None
        return key

    def _take_back(self, peer: Peer, keys: list, reason: str) -> None:
        """Frames a worker could not read from shared memory: send them again, to it over ZeroMQ."""
        items = []
        for raw in keys:
            key = self._credit_key(raw)
            item = peer.in_flight.pop(key, None) if key is not None else None
            if item is not None:
                item.in_flight -= 1
                self._drop_slot(item, peer.identity)
                items.append(item)
        for item in reversed(items):
            self._pending[peer.group].appendleft(item)
        self.shm_refused += len(items)
        self.redispatched += len(items)
        # refusals of frames it no longer holds are late answers from before it was declared lost
        if items and self._shm_peers.pop(peer.identity, None) is not None:
            why = f"worker {peer.name} cannot read frames from shared memory ({reason})"
            self.log.warning("%s; it gets them over ZeroMQ", why)

    def _drop_slot(self, item: WorkItem, identity: bytes) -> bool:
        """``identity`` no longer holds the item's slot; free the slot when nobody does."""
        if item.shm is None or identity not in item.shm_holders:
            return False
        item.shm_holders.discard(identity)
        if not item.shm_holders:
            if self._ring is not None:
                self._ring.release(item.shm)
            item.shm = None
        return True

    def _requeue(self, peer: Peer, why: str) -> None:
        if not peer.in_flight:
            return
        with self._cond:
            items = list(peer.in_flight.values())
            for item in reversed(items):
                item.in_flight -= 1
                self.shm_reclaimed += self._drop_slot(item, peer.identity)
                self._pending[peer.group].appendleft(item)
            peer.in_flight.clear()
            self.redispatched += len(items)
        self.log.warning("worker %s %s: %d items dispatched again", peer.name, why, len(items))
        self.emit("redispatched", (peer.name, len(items)))

    def _check_peers(self) -> None:
        now = time.monotonic()
        for identity, peer in list(self.peers.items()):
            if now - peer.last_seen > self.heartbeat_timeout_s:
                self.lost_workers += 1
                self._requeue(peer, f"silent for {now - peer.last_seen:.1f} s (lost)")
                del self.peers[identity]
                self._shm_peers.pop(identity, None)
                self._lost_names[peer.name] = now
                self._lost_alarm()
                self.emit("workers", self.worker_names())
        for name, since in list(self._lost_names.items()):
            if now - since > LOST_ALARM_S:  # not coming back (scaled down, host gone): stop saying so
                del self._lost_names[name]
                self._lost_alarm()

    def _lost_alarm(self) -> None:
        """ALARM while workers that stopped answering are not back, naming them."""
        if self.health is Health.FAULT:
            return
        if self._lost_names:
            names = ", ".join(sorted(self._lost_names))
            self.set_health(
                Health.ALARM,
                f"Worker {names} lost (stopped answering): its frames went to the other workers; "
                "restart it (tangopipe restart, or Astor)",
            )
        elif self.health is Health.ALARM and self.status.startswith("Worker "):
            running = self._scan_open
            self.set_health(Health.RUNNING if running else Health.ON, f"Scan {self.scan_id} running" if running else "Idle")

    def _dispatch(self) -> None:
        assert self._sock is not None
        with self._cond:
            for group, pending in self._pending.items():
                while pending:
                    peer = self._best_peer(group)
                    if peer is None:
                        break
                    item = pending[0]
                    out = item.msg
                    local = item.msg.kind == m.FRAME and peer.identity in self._shm_peers
                    try:
                        if local:
                            out = self._shared_frame(item, peer)
                        send(self._sock, out, peer.identity, zmq.NOBLOCK)
                    except zmq.ZMQError:  # peer gone or its pipe full: try again next turn
                        if item.shm is not None and not item.shm_holders and self._ring is not None:
                            self._ring.release(item.shm)
                            item.shm = None
                        peer.credit = 0
                        break
                    if out is not item.msg:
                        item.shm_holders.add(peer.identity)
                        self.shm_frames += 1
                    elif local:
                        self.shm_fallbacks += 1
                    pending.popleft()
                    peer.credit -= 1
                    peer.sent += 1
                    self._dispatch_count += 1
                    peer.last_sent = self._dispatch_count
                    peer.in_flight[tuple(key_of(item.msg))] = item
                    item.in_flight += 1
                    if item.msg.kind == m.FRAME:
                        self.dispatched += 1
                        self.stats.count_out()

    def _shared_frame(self, item: WorkItem, peer: Peer) -> m.Message:
        """The message that sends ``item`` to a same-host worker: a slot handle, or the
        frame itself when no slot is free (counted as a fallback)."""
        if item.shm is None:
            data = item.msg.arrays.get("data")
            ring = self._ring_for(data) if data is not None and len(item.msg.arrays) == 1 else None
            item.shm = ring.put(data) if ring is not None else None
            if item.shm is None:
                return item.msg
        segment = item.shm["segment"]
        if self._shm_peers[peer.identity] != segment:  # tell it where to look before the first handle
            assert self._ring is not None
            send(self._sock, m.control(m.HELLO, shm=self._ring.announcement()), peer.identity, zmq.NOBLOCK)
            self._shm_peers[peer.identity] = segment
        msg = item.msg
        return m.Message(
            m.FRAME,
            scan=msg.scan,
            index=msg.index,
            stream=msg.stream,
            meta=msg.meta,
            times=msg.times,
            version=msg.version,
            body={"shm": item.shm},
        )

    def _ring_for(self, data: Any) -> shm.FrameRing | None:
        """The ring to put ``data`` in: made at the first frame, made again (when no slot is
        held) for a bigger frame; None when the frame cannot go through shared memory."""
        if self._shm_error or not isinstance(data, np.ndarray):
            return None
        ring = self._ring
        if ring is not None and ring.fits(data):
            return ring
        if data.dtype.str not in m.ALLOWED_DTYPES or data.ndim > m.MAX_NDIM:
            return None
        if ring is not None:
            if ring.in_use:
                return None
            ring.close()
            self._ring = None
        slot_bytes = max(self.shm_slot_bytes, data.nbytes, 1)
        slots = self.shm_slots or shm.auto_slots(slot_bytes, self.queue_capacity)
        try:
            self._ring = shm.FrameRing(slots, slot_bytes)
        except (OSError, ValueError) as exc:
            self._shm_error = str(exc)
            self.log.warning("no shared-memory ring (%s); same-host workers get frames over ZeroMQ", exc)
            return None
        ring = self._ring
        self.log.info("shared-memory ring %s: %d slots of %d bytes", ring.name, ring.slots, ring.slot_bytes)
        return ring

    def _best_peer(self, group: str) -> Peer | None:
        """The worker of ``group`` with the most free credit; on a tie the one served
        longest ago, so idle workers share the frames in turn."""
        best = None
        for peer in self.peers.values():
            if peer.group != group or peer.credit <= 0:
                continue
            if best is None or (peer.credit, -peer.last_sent) > (best.credit, -best.last_sent):
                best = peer
        return best

    def teardown(self) -> None:
        self.source.stop()
        close = getattr(self.source, "close", None)
        if close is not None:
            close()
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
        with self._cond:
            if self._ring is not None:
                self._ring.close()
                self._ring = None
            for item in self._held.values():
                item.shm, item.shm_holders = None, set()
            self._shm_peers.clear()

    @property
    def shm_segment(self) -> str:
        """Name of the shared-memory ring in /dev/shm ("" while there is none)."""
        ring = self._ring
        return ring.name if ring is not None else ""

    # -- views ---------------------------------------------------------------------------
    def worker_names(self) -> list[str]:
        return sorted(p.name for p in self.peers.values())

    def counters(self) -> dict[str, Any]:
        c = self.stats.snapshot()
        with self._cond:
            queued = sum(
                1 for g in self.groups for item in self._pending[g] if item.msg.kind == m.FRAME
            )
            c.update(
                QueueDepth=self._held_frames,
                QueueCapacity=self.queue_capacity,
                QueuedBytes=self._held_bytes,
                Undispatched=queued,
                InFlight=sum(len(p.in_flight) for p in self.peers.values()),
                Workers=len(self.peers),
                Redispatched=self.redispatched,
                LostWorkers=self.lost_workers,
                ScanFrames=self.scan_frames,
                ShmFrames=self.shm_frames,
                ShmFallbacks=self.shm_fallbacks,
                ShmSlotsInUse=self._ring.in_use if self._ring is not None else 0,
                ShmSlots=self._ring.slots if self._ring is not None else 0,
                ShmWorkers=len(self._shm_peers),
                ShmRefused=self.shm_refused,
                ShmReclaimed=self.shm_reclaimed,
            )
        return c
