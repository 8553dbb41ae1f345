"""SimulatedCamera: a LimaCCDs-like camera for tests and demos of the ``tango_image`` source.

It speaks the part of the LimaCCDs interface a pipeline needs: ``acq_nb_frames``
and ``acq_expo_time`` to set an acquisition up, ``prepareAcq``/``startAcq``/``stopAcq``
to run it, ``acq_status`` and ``last_image_ready`` to follow it, and an ``image``
attribute (uint16, 2-D) whose change events are pushed from code, one per frame, at
the acquisition rate (one frame per exposure time). Frame ``i`` of every
acquisition is :meth:`pipelines.sources.simulator.SimulatedDetector.frame` ``(i)``,
so a test can check what came through. ``last_image_ready`` is pushed just before
each image with the same timestamp, so a client can pair them.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import tango
from tango import AttrQuality, AttrWriteType, DevState
from tango.server import Device, attribute, command, device_property, run

from pipelines.sources.simulator import SimulatedDetector

MAX_SIDE = 4096  # largest image side the image attribute carries


class SimulatedCamera(Device):
    """A simulated area detector with a LimaCCDs-like acquisition interface."""

    Shape = device_property(dtype=(int,), default_value=[512, 512], doc="image size [rows, columns]")
    Seed = device_property(
        dtype=int, default_value=7, doc="seed of the simulated frames (same seed, same frames)"
    )

    def init_device(self) -> None:
        super().init_device()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nb_frames = 1
        self._expo_time = 0.05
        self._prepared = False
        self._last_ready = -1
        self._acq_status = "Ready"
        self._image = np.zeros((0, 0), np.uint16)  # no image before the first acquisition
        self._image_time = time.time()
        self.detector: SimulatedDetector | None = None
        for name in ("image", "last_image_ready", "acq_status"):
            self.set_change_event(name, True, False)
        try:
            shape = list(self.Shape)
            if len(shape) != 2 or not all(0 < n <= MAX_SIDE for n in shape):
                raise ValueError(f"property Shape must be [rows, columns] of 1..{MAX_SIDE}, got {shape}")
            self.detector = SimulatedDetector(shape=shape, dtype="uint16", rate_hz=0, seed=self.Seed)
        except ValueError as exc:  # init_device never raises: FAULT and say why
            self._acq_status = "Fault"
            self.set_state(DevState.FAULT)
            self.set_status(f"{exc}. Fix the property in Jive and run Init.")
            return
        self.set_state(DevState.ON)
        self.set_status(f"Ready: {shape[0]}x{shape[1]} uint16 frames")

    def delete_device(self) -> None:
        self._stop_acquisition()
        super().delete_device()

    # -- acquisition settings ----------------------------------------------------------
    @attribute(dtype=int, access=AttrWriteType.READ_WRITE, doc="frames per acquisition (0: until stopAcq)")
    def acq_nb_frames(self) -> int:
        return self._nb_frames

    @acq_nb_frames.write
    def acq_nb_frames(self, value: int) -> None:
        if value < 0:
            raise ValueError(f"acq_nb_frames must be >= 0 (0: until stopAcq), got {value}")
        self._require_idle("acq_nb_frames")
        self._nb_frames = int(value)

    @attribute(
        dtype=float, access=AttrWriteType.READ_WRITE, unit="s", format="%.4f", doc="exposure time per frame"
    )
    def acq_expo_time(self) -> float:
        return self._expo_time

    @acq_expo_time.write
    def acq_expo_time(self, value: float) -> None:
        if not value > 0:
            raise ValueError(f"acq_expo_time must be a positive number of seconds, got {value}")
        self._require_idle("acq_expo_time")
        self._expo_time = float(value)

    # -- what a client follows ---------------------------------------------------------
    @attribute(dtype=int, doc="index of the last frame acquired in this acquisition (-1: none yet)")
    def last_image_ready(self) -> int:
        return self._last_ready

    @attribute(dtype=str, doc="Ready, Running or Fault")
    def acq_status(self) -> str:
        return self._acq_status

    @attribute(
        dtype=((np.uint16,),),
        max_dim_x=MAX_SIDE,
        max_dim_y=MAX_SIDE,
        doc="the last frame (empty before the first); a change event is pushed for every frame",
    )
    def image(self) -> np.ndarray | tuple[np.ndarray, float, AttrQuality]:
        with self._lock:
            if not self._image.size:  # PyTango 10.0 cannot take an empty image with a time stamp
                return self._image
            return self._image, self._image_time, AttrQuality.ATTR_VALID

    # -- commands ----------------------------------------------------------------------
    @command
    def prepareAcq(self) -> None:
        """Arm the next acquisition (required before each startAcq, as with LimaCCDs)."""
        self._require_idle("prepareAcq")
        if self.detector is None:
            raise RuntimeError(f"prepareAcq: the camera is in FAULT ({self.get_status()})")
        self._prepared = True
        self._last_ready = -1
        self.push_change_event("last_image_ready", -1)

    @command
    def startAcq(self) -> None:
        """Start acquiring acq_nb_frames frames, one per acq_expo_time."""
        self._require_idle("startAcq")
        if not self._prepared:
            raise RuntimeError(
                "startAcq: run prepareAcq first (each acquisition is prepared, as with LimaCCDs)"
            )
        self._prepared = False
        self._stop.clear()
        self._set_status("Running")
        self._thread = threading.Thread(
            target=self._acquire, args=(self._nb_frames, self._expo_time), name="acquisition", daemon=True
        )
        self._thread.start()

    @command
    def stopAcq(self) -> None:
        """Stop the running acquisition (a no-op when idle)."""
        self._stop_acquisition()

    # -- internals ---------------------------------------------------------------------
    def _require_idle(self, what: str) -> None:
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError(f"{what}: an acquisition is running; run stopAcq first")

    def _set_status(self, status: str) -> None:
        self._acq_status = status
        self.set_state(DevState.RUNNING if status == "Running" else DevState.ON)
        self.push_change_event("acq_status", status)

    def _stop_acquisition(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(2.0)

    def _acquire(self, count: int, period: float) -> None:
        """Push one frame per period (the schedule does not drift); count 0: until stopAcq."""
        assert self.detector is not None
        with tango.EnsureOmniThread():
            start = time.monotonic()
            index = 0
            while count == 0 or index < count:
                if self._stop.wait(max(0.0, start + (index + 1) * period - time.monotonic())):
                    break
                frame = self.detector.frame(index)
                now = time.time()
                with self._lock:
                    self._image, self._image_time, self._last_ready = frame, now, index
                try:
                    self.push_change_event("last_image_ready", index, now, AttrQuality.ATTR_VALID)
                    self.push_change_event("image", frame, now, AttrQuality.ATTR_VALID)
                except tango.DevFailed:  # the device is being deleted
                    return
                index += 1
            try:
                self._set_status("Ready")
            except tango.DevFailed:
                pass


def main(args: list[str] | None = None) -> None:
    run((SimulatedCamera,), args=args)


if __name__ == "__main__":
    main()
