"""Frames from a Tango image attribute, by change events (a LimaCCDs-like camera).

The source subscribes to the CHANGE events of ``device/attribute`` (a 2-D image
attribute) and queues every new image; :meth:`TangoImageSource.frames` hands them to
the master. ``device`` is a full Tango name (``tango://host:port/a/b/c``, with
``#dbase=no`` for a server without database) or a device name looked up in the
database of ``TANGO_HOST``.

The subscription is made when the source is built and kept between scans, so a
camera started right after StartScan (as a scan's hooks do) loses no frame; images
arriving while no scan runs are counted (``outside_scan``) and let go. A scan takes
StartScan's ``frames`` images and ends, or takes images until :meth:`stop` when it
gives none. With ``start_acquisition`` the source drives the camera itself as a
LimaCCDs device is driven: ``acq_nb_frames`` = the scan's frames, ``prepareAcq``,
``startAcq`` at scan start, and ``stopAcq`` when the scan is stopped early.

``frames_attribute`` names a frame counter (LimaCCDs' ``last_image_ready``): its
change events are paired with the images by their timestamp (the device pushes the
counter with the image's time), and when a pairing is missing the counter is read
as the image arrives. The value goes into the frame's metadata as ``frame_number``,
and a jump in the numbers is counted as ``missing_frames``.

Nothing received raises out of :meth:`TangoImageSource.frames`: a full queue (the
master cannot keep up), a malformed image, an event error, the device going away
are counted by reason (:meth:`TangoImageSource.stats`), the latest is in
``last_error`` and in the log. A watcher thread pings the device every second; when
it is gone the outage is counted and reported, and when it answers again the events
are subscribed anew. Only a device that cannot be reached when a scan starts (within
``timeout_s``), or an attribute it does not have, raises :class:`SourceError`.

pytango is imported here and only here in ``pipelines/``: this source speaks Tango by
nature, and ``pipelines`` must import without it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from pipelines.sources import SourceError

log = logging.getLogger(__name__)

#: counters of :meth:`TangoImageSource.stats`, by reason
COUNTERS = (
    "frames",  # images handed to the master
    "images",  # image events received (in a scan or not)
    "outside_scan",  # images received while no scan was running (let go)
    "dropped",  # images lost because the queue was full (the master did not keep up)
    "extra_images",  # images after the scan had all its frames (let go)
    "repeated_images",  # an image with the timestamp of the one before (a re-sent value)
    "empty_images",  # image events without pixels (the camera has no image yet)
    "bad_images",  # values that are not a 2-D array of numbers
    "missing_frames",  # frame numbers skipped (images the device made that never arrived)
    "frame_number_errors",  # frame counter unreadable or not an integer
    "event_errors",  # error events from Tango (device or event channel down, missed events)
    "device_lost",  # outages: the device stopped answering
    "subscribe_errors",  # failed (re)subscriptions
    "resubscriptions",  # subscriptions made again after an outage or an error event
    "acquisition_errors",  # prepareAcq/startAcq/stopAcq that failed (start_acquisition)
)

WATCH_PERIOD_S = 1.0  # the device is pinged this often
_POLL_S = 0.1  # frames() looks at stop() this often
_PAIRS_KEPT = 1024  # frame-counter values kept for pairing with images
_MAX_PROXY_TIMEOUT_S = 3.0


class TangoImageSource:
    """Frame source fed by change events of a Tango image attribute; see the module docstring.

    ``queue_frames`` bounds the images held for the master; more are dropped and
    counted. ``timeout_s`` is how long a scan waits for the device at its start.
    """

    def __init__(
        self,
        *,
        device: str,
        attribute: str = "image",
        timeout_s: float = 10.0,
        frames_attribute: str = "",
        start_acquisition: bool = False,
        queue_frames: int = 64,
    ):
        if not isinstance(device, str) or not device.strip() or device.count("/") < 2:
            raise ValueError(
                f"tango_image device must be a Tango device name like 'id00/limaccds/cam1' or "
                f"'tango://host:10000/id00/limaccds/cam1', got {device!r}"
            )
        for name, value in (("attribute", attribute), ("frames_attribute", frames_attribute)):
            if not isinstance(value, str) or "/" in value or value != value.strip():
                raise ValueError(f"tango_image {name} must be an attribute name like 'image', got {value!r}")
        if not attribute:
            raise ValueError("tango_image attribute must name the image attribute, got ''")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or not timeout_s > 0:
            raise ValueError(f"tango_image timeout_s must be a positive number of seconds, got {timeout_s!r}")
        if isinstance(queue_frames, bool) or not isinstance(queue_frames, int) or queue_frames < 1:
            raise ValueError(
                f"tango_image queue_frames must be a positive number of images, got {queue_frames!r}"
            )
        self.device = device.strip()
        self.attribute = attribute
        self.timeout_s = float(timeout_s)
        self.frames_attribute = frames_attribute
        self.start_acquisition = bool(start_acquisition)
        self.queue_frames = queue_frames
        self.last_error: str | None = None
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._cond = threading.Condition()
        self._queue: deque[tuple[np.ndarray, dict[str, Any]]] = deque()
        self._accepting = False  # a scan takes images
        self._expected = 0  # images the running scan takes (0: until stop)
        self._arrived = 0  # images of the running scan that arrived (queued or dropped)
        self._stop = threading.Event()
        self._closing = threading.Event()
        self._watcher: threading.Thread | None = None
        # the connection, touched by the watcher thread (and the event callbacks)
        self._proxy: Any = None
        self._event_ids: list[int] = []
        self._generation = 0  # events of older subscriptions are ignored
        self._subscribing: int | None = None  # thread id inside subscribe_event (initial values)
        self._subscribed = threading.Event()
        self._resubscribe = False  # an error event asks for a new subscription
        self._outage = False  # the device is known to be unreachable
        self._config_error = ""  # the device answers but lacks the attribute
        self._unreachable = ""  # why the device did not answer, last time
        self._last_time: float | None = None
        self._last_number: int | None = None
        self._numbers: OrderedDict[float, int] = OrderedDict()
        self._ever_subscribed = False
        self._shape: tuple[int, ...] | None = None
        self._dtype: str | None = None
        self.connect()

    # ---- what the master and the devices read

    def stats(self) -> dict[str, int]:
        """Counters since construction, by reason (all keys always present)."""
        with self._cond:
            return dict(self._counts)

    @property
    def subscribed(self) -> bool:
        """True while the image events are subscribed (the device answered)."""
        return self._subscribed.is_set()

    @property
    def scanning(self) -> bool:
        """True while a scan takes images (from the start of :meth:`frames` to its end)."""
        return self._accepting

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "detector": "tango_image",
            "device": self.device,
            "attribute": self.attribute,
        }
        if self.frames_attribute:
            info["frames_attribute"] = self.frames_attribute
        if self._shape is not None:
            info["shape"] = list(self._shape)
        if self._dtype is not None:
            info["dtype"] = self._dtype
        return info

    # ---- control

    def connect(self) -> None:
        """Start subscribing in the background (done at construction; again after :meth:`close`)."""
        if self._watcher is not None and self._watcher.is_alive():
            return
        self._closing.clear()
        self._watcher = threading.Thread(target=self._watch, name=f"tango_image {self.device}", daemon=True)
        self._watcher.start()

    def wait_subscribed(self, timeout_s: float | None = None) -> bool:
        """Wait until the image events are subscribed; False after ``timeout_s`` (default: the source's)."""
        self.connect()
        return self._subscribed.wait(self.timeout_s if timeout_s is None else timeout_s)

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        """Stop a running :meth:`frames`, unsubscribe and end the watcher thread."""
        self.stop()
        self._closing.set()
        watcher = self._watcher
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(2 * _MAX_PROXY_TIMEOUT_S)

    def __enter__(self) -> TangoImageSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- one scan

    def frames(self, scan: Mapping[str, Any]) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
        expected = scan.get("frames", 0)
        if isinstance(expected, bool) or not isinstance(expected, int) or expected < 0:
            raise SourceError(
                f"tango_image: the scan's frames must be a non-negative integer, got {expected!r}"
            )
        self._stop.clear()
        self._wait_for_device()
        if self._stop.is_set():
            return
        with self._cond:
            self._queue.clear()
            self._expected, self._arrived = expected, 0
            self._last_number = None
            self._accepting = True
        started = False
        try:
            if self.start_acquisition:
                self._start_camera(expected)
                started = True
            taken = 0
            while not expected or taken < expected:
                item = self._next()
                if item is None:
                    return
                taken += 1
                yield item
        finally:
            with self._cond:
                self._accepting = False
                left, done = len(self._queue), not expected or self._arrived >= expected
                self._queue.clear()
            if left:
                self._count("outside_scan", f"{left} images queued when the scan stopped were let go", left)
            if started and not (expected and done):
                self._in_tango_thread(self._stop_camera, wait_s=0)

    def _wait_for_device(self) -> None:
        self.connect()
        deadline = time.monotonic() + self.timeout_s
        while not self._subscribed.wait(_POLL_S):
            if self._stop.is_set():
                return
            if self._config_error:
                raise SourceError(f"tango_image: {self._config_error}")
            if time.monotonic() > deadline:
                raise SourceError(
                    f"tango_image: device {self.device} cannot be reached within {self.timeout_s:g} s "
                    f"({self._unreachable or 'no answer'}); start its server or fix the source's device"
                )

    def _next(self) -> tuple[np.ndarray, dict[str, Any]] | None:
        """The next image of the scan, or None when stopped or when every frame arrived."""
        with self._cond:
            while not self._queue:
                if self._stop.is_set():
                    return None
                if self._expected and self._arrived >= self._expected:
                    return None  # the rest were dropped: the scan has all it will get
                self._cond.wait(_POLL_S)
            item = self._queue.popleft()
            self._counts["frames"] += 1
            return item

    def _start_camera(self, frames: int) -> None:
        def start() -> None:
            proxy = self._proxy
            proxy.write_attribute("acq_nb_frames", frames)
            proxy.command_inout("prepareAcq")
            proxy.command_inout("startAcq")

        try:
            self._in_tango_thread(start, wait_s=self.timeout_s)
        except Exception as exc:
            self._count("acquisition_errors", f"starting the acquisition failed: {_describe(exc)}")
            raise SourceError(
                f"tango_image: device {self.device} did not start an acquisition of {frames} frames "
                f"(acq_nb_frames, prepareAcq, startAcq): {_describe(exc)}"
            ) from None

    def _stop_camera(self) -> None:
        try:
            self._proxy.command_inout("stopAcq")
        except Exception as exc:
            self._count("acquisition_errors", f"stopAcq failed: {_describe(exc)}")

    def _in_tango_thread(self, fn: Callable[[], None], wait_s: float) -> None:
        """Run ``fn`` in a thread known to omniORB (a Tango call from a plain thread of a
        device server can crash it); wait up to ``wait_s`` for it, polling stop()."""
        import tango

        error: list[BaseException] = []

        def run() -> None:
            with tango.EnsureOmniThread():
                try:
                    fn()
                except BaseException as exc:
                    error.append(exc)

        thread = threading.Thread(target=run, name=f"tango_image call {self.device}", daemon=True)
        thread.start()
        deadline = time.monotonic() + wait_s
        while thread.is_alive() and time.monotonic() < deadline and not self._stop.is_set():
            thread.join(_POLL_S)
        if thread.is_alive():
            if wait_s and not self._stop.is_set():
                raise TimeoutError(f"no answer within {wait_s:g} s")
            return
        if error:
            raise error[0]

    # ---- events (Tango's event threads)

    def _on_image(self, generation: int, event: Any) -> None:
        if generation != self._generation:
            return
        initial = threading.get_ident() == self._subscribing
        if event.err:
            if initial:
                return  # the subscription itself reports this
            self._count("event_errors", f"event error from {self.device}/{self.attribute}: {_errors(event)}")
            self._resubscribe = True
            return
        value = event.attr_value
        stamp = value.time.totime()
        image = value.value
        if initial:
            self._last_time = stamp  # the current value, not a new image
            return
        with self._cond:
            self._counts["images"] += 1
        if stamp == self._last_time:
            self._count("repeated_images", f"image of {_when(stamp)} sent again; ignored")
            return
        self._last_time = stamp
        if not isinstance(image, np.ndarray) or image.ndim != 2 or image.dtype.kind not in "biuf":
            what = (
                f"{image.ndim}-D {image.dtype} array"
                if isinstance(image, np.ndarray)
                else type(image).__name__
            )
            self._count(
                "bad_images", f"{self.device}/{self.attribute} sent a {what}, not a 2-D image; dropped"
            )
            return
        if image.size == 0:
            self._count("empty_images", f"{self.device}/{self.attribute} sent an empty image; ignored")
            return
        with self._cond:
            accepting = self._accepting
            if not accepting:
                self._counts["outside_scan"] += 1
        if not accepting:
            return
        meta: dict[str, Any] = {"event_time": stamp}
        number = self._frame_number(stamp)
        if number is not None:
            meta["frame_number"] = number
        with self._cond:
            if not self._accepting:  # the scan stopped meanwhile
                self._counts["outside_scan"] += 1
                return
            extra = bool(self._expected) and self._arrived >= self._expected
            full = len(self._queue) >= self.queue_frames
            if not extra:
                self._arrived += 1
                if not full:
                    self._queue.append((image, meta))
                    self._cond.notify_all()
        if extra:
            self._count(
                "extra_images", f"image of {_when(stamp)} came after the scan's {self._expected} frames"
            )
        elif full:
            self._count(
                "dropped",
                f"queue of {self.queue_frames} images full: the master does not keep up with {self.device}; "
                "an image was dropped (add workers, or a larger queue_frames)",
            )
        else:
            self._shape, self._dtype = image.shape, image.dtype.name

    def _on_number(self, generation: int, event: Any) -> None:
        if generation != self._generation or event.err:
            return  # the image events report the outages
        value = event.attr_value.value
        if isinstance(value, int | np.integer) and not isinstance(value, bool):
            with self._cond:
                self._numbers[event.attr_value.time.totime()] = int(value)
                while len(self._numbers) > _PAIRS_KEPT:
                    self._numbers.popitem(last=False)

    def _frame_number(self, stamp: float) -> int | None:
        """The frame counter of the image with timestamp ``stamp`` (None without a counter)."""
        if not self.frames_attribute:
            return None
        with self._cond:
            number = self._numbers.pop(stamp, None)
        if number is None:
            try:
                value = self._proxy.read_attribute(self.frames_attribute).value
            except Exception as exc:
                self._count("frame_number_errors", f"{self.device}/{self.frames_attribute}: {_describe(exc)}")
                return None
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                self._count(
                    "frame_number_errors",
                    f"{self.device}/{self.frames_attribute} is {value!r}, not an integer frame number",
                )
                return None
            number = int(value)
        last, self._last_number = self._last_number, number
        if last is not None and number > last + 1:
            self._count(
                "missing_frames",
                f"{self.device}: frame numbers jump from {last} to {number}; {number - last - 1} images never arrived",
                number - last - 1,
            )
        return number

    # ---- the watcher thread: subscribe, ping, resubscribe

    def _watch(self) -> None:
        import tango

        with tango.EnsureOmniThread():
            try:
                while not self._closing.is_set():
                    if not self._subscribed.is_set() or self._resubscribe:
                        self._subscribe(tango)
                    else:
                        self._ping(tango)
                    self._closing.wait(WATCH_PERIOD_S)
            finally:
                self._unsubscribe()
                self._subscribed.clear()

    def _ping(self, tango: Any) -> None:
        try:
            self._proxy.ping()
        except tango.DevFailed as exc:
            self._lost("does not answer", exc)

    def _lost(self, what: str, exc: BaseException) -> None:
        self._unreachable = _describe(exc)
        text = f"device {self.device} {what}: {self._unreachable}"
        self._subscribed.clear()
        if self._outage:
            self.last_error = text
            return
        self._outage = True
        if self._ever_subscribed:
            self._count("device_lost", f"{text}; frames stop until it is back")
        else:  # not there yet: said once, and a scan that starts now fails after timeout_s
            self.last_error = text
            log.warning("tango_image: %s; trying again every %g s", text, WATCH_PERIOD_S)

    def _subscribe(self, tango: Any) -> None:
        try:
            if self._proxy is None:
                self._proxy = tango.DeviceProxy(self.device)
                self._proxy.set_timeout_millis(int(1000 * min(self.timeout_s, _MAX_PROXY_TIMEOUT_S)))
            self._proxy.ping()
        except tango.DevFailed as exc:
            self._lost("cannot be reached", exc)
            return
        self._unsubscribe()
        self._generation += 1
        generation = self._generation
        self._resubscribe = False
        self._subscribing = threading.get_ident()
        try:
            self._event_ids.append(
                self._proxy.subscribe_event(
                    self.attribute,
                    tango.EventType.CHANGE_EVENT,
                    lambda event: self._on_image(generation, event),
                )
            )
            if self.frames_attribute:
                self._subscribe_numbers(tango, generation)
        except tango.DevFailed as exc:
            self._subscribing = None
            self._unsubscribe()
            self._subscribe_failed(tango, exc)
            return
        finally:
            self._subscribing = None
        self._config_error = ""
        self._subscribed.set()
        if self._ever_subscribed:
            with self._cond:
                self._counts["resubscriptions"] += 1
            log.warning(
                "tango_image: %s/%s answers again; its events are subscribed anew",
                self.device,
                self.attribute,
            )
        else:
            log.info("tango_image: %s/%s subscribed", self.device, self.attribute)
        self._ever_subscribed = True
        self._outage = False

    def _subscribe_numbers(self, tango: Any, generation: int) -> None:
        try:
            self._event_ids.append(
                self._proxy.subscribe_event(
                    self.frames_attribute,
                    tango.EventType.CHANGE_EVENT,
                    lambda event: self._on_number(generation, event),
                )
            )
        except tango.DevFailed as exc:  # no events for it: read it with each image
            if self.frames_attribute not in self._attributes(tango):
                raise
            log.info(
                "tango_image: %s/%s has no change events (%s); read with each image",
                self.device,
                self.frames_attribute,
                _describe(exc),
            )

    def _subscribe_failed(self, tango: Any, exc: Any) -> None:
        names = self._attributes(tango)
        missing = [a for a in (self.attribute, self.frames_attribute) if a and names and a not in names]
        if missing:
            self._config_error = (
                f"device {self.device} has no attribute {missing[0]!r} (it has {', '.join(sorted(names))}); "
                "fix the source's attribute or frames_attribute"
            )
            self._count("subscribe_errors", self._config_error)
            return
        self._count(
            "subscribe_errors",
            f"subscribing to change events of {self.device}/{self.attribute} failed: {_describe(exc)} "
            "(does the device push change events for it?)",
        )

    def _attributes(self, tango: Any) -> list[str]:
        try:
            return list(self._proxy.get_attribute_list())
        except (tango.DevFailed, AttributeError):
            return []

    def _unsubscribe(self) -> None:
        ids, self._event_ids = self._event_ids, []
        for event_id in ids:
            try:
                self._proxy.unsubscribe_event(event_id)
            except Exception as exc:  # a dead channel: nothing more will come from it
                log.debug("tango_image: unsubscribing %s: %s", event_id, exc)

    # ---- counting and reporting

    def _count(self, reason: str, text: str, n: int = 1) -> None:
        with self._cond:
            self._counts[reason] += n
            seen = self._counts[reason]
        self.last_error = text
        if seen == n or seen % 1000 < n:
            log.warning("tango_image %s (%d so far): %s", reason, seen, text)
        else:
            log.debug("tango_image %s: %s", reason, text)


def _describe(exc: BaseException) -> str:
    """The first line of a Tango error (or the exception's text)."""
    args = getattr(exc, "args", ())
    if args and hasattr(args[0], "desc"):
        return f"{args[0].reason}: {args[0].desc.strip().splitlines()[0]}"
    return str(exc) or type(exc).__name__


def _errors(event: Any) -> str:
    errors = getattr(event, "errors", ()) or ()
    if not errors:
        return "unknown error"
    return f"{errors[0].reason}: {errors[0].desc.strip().splitlines()[0]}"


def _when(stamp: float) -> str:
    if not math.isfinite(stamp):
        return "unknown time"
    return time.strftime("%H:%M:%S", time.localtime(stamp)) + f".{int(stamp % 1 * 1000):03d}"
