"""Same-host fast path: frames in a shared-memory ring owned by the master.

Pushing an 8 MB frame through a TCP socket costs two kernel copies; a worker on
the master's host can instead read the frame where the master put it. The
master copies each frame it dispatches to such a worker once into a slot of a
:class:`FrameRing` and sends only a small handle (segment, slot, generation,
dtype, shape) in the FRAME message's ``body``; the worker maps the segment read
only (:class:`RingReader`) and runs its steps on a numpy view of the slot.

A slot is held from dispatch until the worker acknowledges the frame, or until
the worker leaves or is declared lost (then the master reclaims it and sends
the frame again). Each slot has a generation counter, stored in the segment's
header, that the master bumps whenever it takes or releases the slot: a handle
whose generation is not the slot's current one is stale, and a worker that
finds the generation changed after computing (it was declared lost, the slot
was reused) throws its result away instead of sending results of the wrong data.

Segments are named ``tangopipe-ring-<pid>-<token>``. The master unlinks its
segment when it stops; if it dies, Python's resource tracker unlinks it, and a
master starting later removes segments whose PID is no longer alive. Workers
never register the segment with the resource tracker (they do not use
``SharedMemory`` to attach), so a worker process exiting never unlinks it.
Linux only (``/dev/shm``, the kernel boot id); elsewhere frames go over ZeroMQ.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import re
import secrets
import socket
import struct
import threading
import weakref
from collections import deque
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np

from .message import ALLOWED_DTYPES, MAX_NDIM, BadMessage

log = logging.getLogger("tangopipe.shm")

SHM_DIR = "/dev/shm"
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
NAME_PREFIX = "tangopipe-ring-"
NAME_PATTERN = re.compile(r"tangopipe-ring-(\d{1,10})-([0-9a-f]{8})\Z")
MAGIC = b"TPRING01"
PAGE = 4096
MAX_SLOTS = 4096
AUTO_SLOTS = 32  # slots of a ring sized automatically: at most this many...
AUTO_BYTES = 512 << 20  # ...and at most this much memory (and half of what /dev/shm has free)
_HEADER = struct.Struct("<8sQQQQ")  # magic, slots, slot_bytes, data offset, owner pid
_GENERATIONS_AT = 64  # one little-endian uint64 per slot from here on
_GENERATION = struct.Struct("<Q")


def boot_id() -> str:
    """This kernel's boot id ("" where there is none): equal on two peers only if they share a host."""
    try:
        with open(BOOT_ID_PATH) as f:
            return f.read().strip()
    except OSError:
        return ""


def shm_supported() -> bool:
    """Whether this host can use the ring at all (POSIX shared memory in /dev/shm, a boot id)."""
    return os.path.isdir(SHM_DIR) and bool(boot_id())


def hello_fields() -> dict[str, Any]:
    """What a worker adds to its HELLO so the master can tell it runs on the same host."""
    return {"host": socket.gethostname(), "boot_id": boot_id(), "shm": True}


def same_host(hello_body: dict[str, Any], own_boot_id: str | None = None) -> bool:
    """True if the HELLO comes from a worker that asks for shared memory and runs on this host."""
    own = boot_id() if own_boot_id is None else own_boot_id
    return (
        hello_body.get("shm") is True
        and bool(own)
        and hello_body.get("boot_id") == own
        and hello_body.get("host") == socket.gethostname()
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_segments(shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink ring segments left by masters that died (their PID is gone); return their names."""
    removed = []
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return removed
    for name in names:
        match = NAME_PATTERN.match(name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        try:
            os.unlink(os.path.join(shm_dir, name))
            removed.append(name)
        except OSError:  # another user's, or removed meanwhile
            continue
    if removed:
        log.warning("removed %d shared-memory segment(s) left by dead masters: %s", len(removed), removed)
    return removed


def auto_slots(slot_bytes: int, limit: int) -> int:
    """How many slots a ring gets when not configured: enough for the frames workers hold at
    once (``limit``: the master's queue capacity), bounded in memory; at least 2."""
    slot_bytes = _round_up(max(slot_bytes, 1), PAGE)
    n = min(limit, AUTO_SLOTS, AUTO_BYTES // slot_bytes)
    free = _free_bytes(SHM_DIR)
    if free is not None:
        n = min(n, free // 2 // slot_bytes)
    return max(n, 2)


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _destroy(shm: SharedMemory) -> None:
    """Unlink first (always possible), then unmap (fails while views exist: the OS unmaps at exit)."""
    try:
        shm.unlink()
    except FileNotFoundError:
        pass
    try:
        shm.close()
    except BufferError:
        pass


class FrameRing:
    """Master side: ``slots`` slots of ``slot_bytes`` bytes in one shared-memory segment.

    Used from the master's loop thread only. :meth:`put` copies a frame into a
    free slot (the least recently freed one) and returns its handle, or None when
    the ring is full; :meth:`release` gives the slot back.
    """

    def __init__(self, slots: int, slot_bytes: int):
        if isinstance(slots, bool) or not isinstance(slots, int) or not 1 <= slots <= MAX_SLOTS:
            raise ValueError(f"shm slots must be an integer between 1 and {MAX_SLOTS}, got {slots!r}")
        if isinstance(slot_bytes, bool) or not isinstance(slot_bytes, int) or slot_bytes < 1:
            raise ValueError(f"shm slot_bytes must be a positive integer, got {slot_bytes!r}")
        self.slots = slots
        self.slot_bytes = _round_up(slot_bytes, PAGE)
        self.data_offset = _round_up(_GENERATIONS_AT + 8 * slots, PAGE)
        self.size = self.data_offset + slots * self.slot_bytes
        free = _free_bytes(SHM_DIR)
        if free is not None and self.size > free:
            raise OSError(
                f"a ring of {slots} slots x {self.slot_bytes} bytes needs {self.size} bytes, "
                f"{SHM_DIR} has {free} free; enlarge {SHM_DIR} or set fewer shm slots"
            )
        self.name = f"{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self._shm = SharedMemory(name=self.name, create=True, size=self.size)
        self._finalizer = weakref.finalize(self, _destroy, self._shm)
        fd = getattr(self._shm, "_fd", -1)
        if fd >= 0 and hasattr(os, "posix_fallocate"):
            try:  # reserve the pages now: a full /dev/shm fails here, not with SIGBUS on a later write
                os.posix_fallocate(fd, 0, self.size)
            except OSError as exc:
                self.close()
                raise OSError(f"cannot reserve {self.size} bytes in {SHM_DIR}: {exc}") from exc
        buf = self._shm.buf
        _HEADER.pack_into(buf, 0, MAGIC, slots, self.slot_bytes, self.data_offset, os.getpid())
        self._generations = np.ndarray((slots,), dtype="<u8", buffer=buf, offset=_GENERATIONS_AT)
        self._data = np.ndarray((slots, self.slot_bytes), dtype=np.uint8, buffer=buf, offset=self.data_offset)
        self._free: deque[int] = deque(range(slots))
        self._held: dict[int, int] = {}  # slot -> generation of its handle

    @property
    def in_use(self) -> int:
        return len(self._held)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def announcement(self) -> dict[str, Any]:
        """What a worker needs to attach this ring (sent to it before its first handle)."""
        return {"segment": self.name, "slots": self.slots, "slot_bytes": self.slot_bytes}

    def fits(self, array: np.ndarray) -> bool:
        return (
            array.dtype.str in ALLOWED_DTYPES and array.ndim <= MAX_NDIM and array.nbytes <= self.slot_bytes
        )

    def put(self, array: np.ndarray) -> dict[str, Any] | None:
        """Copy ``array`` into a free slot; its handle, or None when every slot is held."""
        if self.closed:
            raise RuntimeError(f"ring {self.name} is closed")
        if not self.fits(array):
            raise ValueError(
                f"frame of {array.nbytes} bytes ({array.dtype.str}, ndim {array.ndim}) does not fit "
                f"a slot of {self.slot_bytes} bytes"
            )
        if not self._free:
            return None
        slot = self._free.popleft()
        generation = int(self._generations[slot]) + 1
        self._generations[slot] = generation  # bumped before the data changes (see RingReader.valid)
        target = self._data[slot, : array.nbytes].view(array.dtype).reshape(array.shape)
        np.copyto(target, array, casting="no")
        self._held[slot] = generation
        return {
            "segment": self.name,
            "slot": slot,
            "generation": generation,
            "dtype": array.dtype.str,
            "shape": list(array.shape),
        }

    def release(self, handle: dict[str, Any]) -> bool:
        """Give back the slot of ``handle``; False if the handle is not the current holder's."""
        slot, generation = handle.get("slot"), handle.get("generation")
        if handle.get("segment") != self.name or self._held.get(slot) != generation:
            return False
        del self._held[slot]
        self._generations[slot] = generation + 1  # every handle to it is stale from now on
        self._free.append(slot)
        return True

    def close(self) -> None:
        """Unlink the segment (workers' mappings stay valid until they unmap) and unmap it here."""
        self._generations = self._data = None  # type: ignore[assignment]  # drop views before unmapping
        self._held.clear()
        self._free.clear()
        self._finalizer()


def _free_bytes(path: str) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class _Segment:
    """One ring segment mapped read only by a worker."""

    def __init__(self, name: str, slots: int, slot_bytes: int):
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        try:
            size = os.fstat(fd).st_size
            if size < _GENERATIONS_AT:
                raise BadMessage(
                    "bad_shm_segment", f"segment {name!r} has {size} bytes, too small for a ring"
                )
            self.mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        magic, n, nbytes, data_offset, _pid = _HEADER.unpack_from(self.mm, 0)
        if magic != MAGIC or n != slots or nbytes != slot_bytes:
            self.mm.close()
            raise BadMessage(
                "bad_shm_segment",
                f"segment {name!r} holds {n} x {nbytes} bytes (magic {magic!r}), announced {slots} x {slot_bytes}",
            )
        if data_offset < _GENERATIONS_AT + 8 * n or data_offset + n * nbytes > size:
            self.mm.close()
            raise BadMessage("bad_shm_segment", f"segment {name!r} of {size} bytes cannot hold its slots")
        self.name = name
        self.slots = n
        self.slot_bytes = nbytes
        self.data_offset = data_offset
        self.users = 0

    def generation(self, slot: int) -> int:
        return _GENERATION.unpack_from(self.mm, _GENERATIONS_AT + 8 * slot)[0]


def _check_int(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadMessage("bad_shm_handle", f"{what} {str(value)[:40]!r} is not an integer in [{low}, {high}]")
    return value


class RingReader:
    """Worker side: the rings the master announced, mapped read only.

    :meth:`view` validates a handle against what was announced and what the
    segment's header says now, and returns a read-only numpy view (no copy).
    Thread-safe: the loop thread attaches and makes views, the compute thread
    checks and returns them.
    """

    def __init__(self) -> None:
        self._segments: dict[str, _Segment] = {}
        self._current = ""
        self._lock = threading.Lock()

    @property
    def segments(self) -> list[str]:
        with self._lock:
            return list(self._segments)

    def attach(self, announcement: Any) -> str:
        """Map the segment of a master's announcement (raises BadMessage or OSError); return its name."""
        if not isinstance(announcement, dict):
            raise BadMessage(
                "bad_shm_announcement", f"announcement {str(announcement)[:60]!r} is not an object"
            )
        name = announcement.get("segment")
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise BadMessage(
                "bad_shm_announcement", f"segment name {str(name)[:60]!r} is not a tangopipe ring"
            )
        slots = _check_int(announcement.get("slots"), "announced slots", 1, MAX_SLOTS)
        slot_bytes = _check_int(announcement.get("slot_bytes"), "announced slot_bytes", 1, 1 << 40)
        with self._lock:
            known = self._segments.get(name)
            if known is None:
                self._segments[name] = _Segment(name, slots, slot_bytes)
            elif (known.slots, known.slot_bytes) != (slots, slot_bytes):
                raise BadMessage(
                    "bad_shm_segment",
                    f"segment {name!r} holds {known.slots} x {known.slot_bytes} bytes, announced {slots} x {slot_bytes}",
                )
            self._current = name
            self._close_retired()
        return name

    def _resolve(self, handle: Any) -> tuple[_Segment, int, int, np.dtype, tuple[int, ...]]:
        if not isinstance(handle, dict):
            raise BadMessage("bad_shm_handle", f"handle {str(handle)[:60]!r} is not an object")
        name = handle.get("segment")
        segment = self._segments.get(name) if isinstance(name, str) else None
        if segment is None or name != self._current:
            raise BadMessage("bad_shm_handle", f"segment {str(name)[:60]!r} was not announced by the master")
        slot = _check_int(handle.get("slot"), "slot", 0, segment.slots - 1)
        generation = _check_int(handle.get("generation"), "generation", 1, (1 << 64) - 1)
        dtype_str = handle.get("dtype")
        if not isinstance(dtype_str, str) or dtype_str not in ALLOWED_DTYPES:
            raise BadMessage(
                "bad_shm_handle", f"dtype {str(dtype_str)[:20]!r} is not an allowed numeric dtype"
            )
        dtype = np.dtype(dtype_str)
        shape = handle.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_NDIM
            or not all(
                isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= segment.slot_bytes for n in shape
            )
        ):
            raise BadMessage(
                "bad_shm_handle", f"shape {str(shape)[:60]} is not a list of <= {MAX_NDIM} sizes"
            )
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > segment.slot_bytes:
            raise BadMessage(
                "bad_shm_handle",
                f"shape {shape} of {dtype_str} needs {nbytes} bytes, a slot has {segment.slot_bytes}",
            )
        return segment, slot, generation, dtype, tuple(shape)

    def view(self, handle: Any) -> np.ndarray:
        """The frame a handle names, as a read-only view; raises BadMessage for a bad or stale handle.

        Call :meth:`done` with the same handle once the view is no longer used.
        """
        with self._lock:
            segment, slot, generation, dtype, shape = self._resolve(handle)
            current = segment.generation(slot)
            if current != generation:
                raise BadMessage(
                    "stale_shm_handle",
                    f"slot {slot} of {segment.name} is at generation {current}, not {generation}",
                )
            offset = segment.data_offset + slot * segment.slot_bytes
            array = np.ndarray(shape, dtype=dtype, buffer=segment.mm, offset=offset)
            segment.users += 1
        return array

    def valid(self, handle: dict[str, Any]) -> bool:
        """Whether the slot still holds the handle's frame: checked after computing on a view.

        The master bumps the generation before it writes a slot again, so an
        unchanged generation after the results were made means they were made
        from the frame the handle named.
        """
        with self._lock:
            segment = self._segments.get(handle["segment"])
            return segment is not None and segment.generation(handle["slot"]) == handle["generation"]

    def done(self, handle: dict[str, Any]) -> None:
        with self._lock:
            segment = self._segments.get(handle["segment"])
            if segment is not None:
                segment.users -= 1
            self._close_retired()

    def _close_retired(self) -> None:
        for name, segment in list(self._segments.items()):
            if name != self._current and segment.users <= 0:
                try:
                    segment.mm.close()
                except BufferError:  # a view is still referenced somewhere: try again later
                    continue
                del self._segments[name]

    def close(self) -> None:
        """Unmap every segment (those with live views are left to the OS at exit)."""
        with self._lock:
            self._current = ""
            for segment in self._segments.values():
                segment.users = 0
            self._close_retired()
