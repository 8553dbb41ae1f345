"""Frames from a separate detector process over ZeroMQ, as at a beamline.

The detector binds a PUSH socket and sends one tangopipe FRAME message per image
(the array in buffer ``data``, ``index`` its frame number, ``scan`` the id of its
series), then SCAN_END (``body={"frames": n}``) when the series is done.
:class:`FrameStreamSource` connects a PULL socket to it and hands the frames to
the master. Anything malformed is counted (:meth:`FrameStreamSource.stats`) and
skipped: a broken sender never stops a scan.

A scan ends at the series end, after StartScan's ``frames`` frames if it gave
that number, or at :meth:`FrameStreamSource.stop`. A series left before its end
(EndScan during the series, or the frame count reached before the SCAN_END was
read) is remembered, and what is left of it is skipped in the next scan, so an
aborted series never leaks into the next one. Detectors therefore give each
series its own id, as :class:`StreamDetector` does.

:class:`StreamDetector` is the detector side, on :class:`SimulatedDetector`
frames; it runs as its own process for benchmarks and demos::

    python -m pipelines.sources.stream --port 9998 --frames 1000 --rate-hz 0
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from .. import message as m
from ..stats import BadMessageLog
from ..transport import advertised_host, send
from . import SourceError
from .simulator import SimulatedDetector

#: messages buffered at most on each side of the link: frames wait in the
#: master's bounded queue, not in ZeroMQ, so backpressure reaches the detector
STREAM_HWM = 4
_POLL_MS = 100
_ENDPOINT = re.compile(r"^(tcp://[^\s:]+:\d+|ipc://\S+|inproc://\S+)$")
_REMEMBER_SERIES = 64


class FrameStreamSource:
    """Frames pushed by a detector process; see the module docstring.

    ``endpoint`` is where the detector's PUSH socket is bound; ``timeout_s`` how
    long a scan waits for any message (before its first frame or between frames)
    before it fails with an error naming the endpoint.
    """

    def __init__(self, *, endpoint: str = "tcp://127.0.0.1:9998", timeout_s: float = 10.0):
        if not isinstance(endpoint, str) or not _ENDPOINT.match(endpoint):
            raise ValueError(
                f"stream source endpoint {endpoint!r} is not a ZeroMQ endpoint; expected e.g. 'tcp://127.0.0.1:9998'"
            )
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or not timeout_s > 0:
            raise ValueError(f"stream source timeout_s must be a number of seconds > 0, got {timeout_s!r}")
        self.endpoint = endpoint
        self.timeout_s = float(timeout_s)
        self.log = logging.getLogger("tangopipe.source.stream")
        self.bad = BadMessageLog(self.log, f"stream source {endpoint}")
        self._context = zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._stop = threading.Event()
        self._left: OrderedDict[Any, None] = OrderedDict()  # series left before their end
        self.frames_received = 0
        self.series_ended = 0
        self.skipped = 0
        self.last_shape: tuple[int, ...] = ()
        self.last_dtype = ""

    def _socket(self) -> zmq.Socket:
        # Connected once and kept: a frame already on its way is never lost between scans.
        if self._sock is None:
            sock = self._context.socket(zmq.PULL)
            sock.linger = 0
            sock.rcvhwm = STREAM_HWM
            sock.connect(self.endpoint)
            self._sock = sock
        return self._sock

    def frames(self, scan: Mapping[str, Any]) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
        expected = scan.get("frames", 0)
        if isinstance(expected, bool) or not isinstance(expected, int) or expected < 0:
            expected = 0
        self._stop.clear()
        sock = self._socket()
        series: Any = None
        count = 0
        ended = False
        last_message = time.monotonic()
        try:
            while not self._stop.is_set() and not (expected and count >= expected):
                if not sock.poll(_POLL_MS, zmq.POLLIN):
                    silent = time.monotonic() - last_message
                    if silent > self.timeout_s:
                        raise SourceError(
                            f"no message from the detector at {self.endpoint} for {silent:.1f} s "
                            f"(timeout_s {self.timeout_s:g}); is it running and sending?"
                        )
                    continue
                parts = sock.recv_multipart(copy=False)
                last_message = time.monotonic()
                try:
                    msg = m.decode(parts)
                except m.BadMessage as exc:
                    self.bad.record(exc.reason, exc.detail)
                    continue
                if msg.scan in self._left:  # what is left of a series a scan already left
                    self.skipped += 1
                    if msg.kind == m.SCAN_END:
                        del self._left[msg.scan]
                    continue
                if msg.kind == m.FRAME:
                    data = msg.arrays.get("data")
                    if data is None or data.ndim != 2:
                        got = "no 'data' buffer" if data is None else f"'data' of shape {list(data.shape)}"
                        self.bad.record(
                            "bad_frame", f"frame {msg.scan}/{msg.index}: {got}, expected a 2-D image"
                        )
                        continue
                    series = msg.scan
                    count += 1
                    self.frames_received += 1
                    self.last_shape, self.last_dtype = data.shape, data.dtype.name
                    yield data, {**msg.meta, "series": msg.scan, "frame_number": msg.index}
                elif msg.kind == m.SCAN_END:
                    self.series_ended += 1
                    ended = True
                    return
                elif msg.kind not in (m.SCAN_START, m.HEARTBEAT):
                    self.bad.record("unexpected_kind", f"{msg.kind} message from the detector")
        finally:
            if series is not None and not ended:
                self._left[series] = None
                while len(self._left) > _REMEMBER_SERIES:
                    self._left.popitem(last=False)

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        """Disconnect from the detector (only when no scan is running)."""
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def stats(self) -> dict[str, Any]:
        """Frames received, series ended, messages skipped (left-over series) and malformed ones."""
        return {
            "frames": self.frames_received,
            "series_ended": self.series_ended,
            "skipped": self.skipped,
            "bad_messages": self.bad.total,
            "bad_by_reason": dict(self.bad.by_reason),
            "last_bad": self.bad.last_error,
        }

    def describe(self) -> dict[str, Any]:
        return {
            "detector": "stream",
            "endpoint": self.endpoint,
            "timeout_s": self.timeout_s,
            "shape": list(self.last_shape),
            "dtype": self.last_dtype,
        }


class DetectorStopped(RuntimeError):
    """:meth:`StreamDetector.stop` was called while a series was being sent."""


class StreamDetector:
    """The detector side: binds PUSH on ``bind:port`` (0: a free port) and sends
    series of :class:`SimulatedDetector` frames at ``rate_hz`` (0: as fast as the
    receiver takes them; sends block while it is full, as a real detector's do)."""

    def __init__(
        self,
        port: int = 9998,
        bind: str = "127.0.0.1",
        shape: tuple[int, int] | list[int] = (2048, 2048),
        dtype: str = "uint16",
        rate_hz: float = 0,
        *,
        seed: int = 7,
    ):
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"detector port must be 0..65535 (0: any free port), got {port!r}")
        if isinstance(rate_hz, bool) or not isinstance(rate_hz, int | float) or rate_hz < 0:
            raise ValueError(
                f"detector rate_hz must be a number >= 0 (0: as fast as possible), got {rate_hz!r}"
            )
        self.simulator = SimulatedDetector(shape=list(shape), dtype=dtype, rate_hz=0, frames=0, seed=seed)
        self.rate_hz = float(rate_hz)
        self._context = zmq.Context()
        self._sock = self._context.socket(zmq.PUSH)
        self._sock.sndhwm = STREAM_HWM
        # watch connections from before the bind, so no receiver is missed
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self.receivers = 0
        try:
            address = "*" if bind in ("", "0.0.0.0") else bind
            if port:
                self._sock.bind(f"tcp://{address}:{port}")
            else:
                port = self._sock.bind_to_random_port(f"tcp://{address}")
        except zmq.ZMQError as exc:
            self.close()
            raise OSError(
                f"detector cannot bind tcp://{bind}:{port}: {exc}; choose another port (0: any)"
            ) from exc
        self.endpoint = f"tcp://{advertised_host(bind)}:{port}"
        self._run = uuid.uuid4().hex[:8]
        self._series = 0
        self._stop = threading.Event()

    def _count_receivers(self, wait_ms: int) -> None:
        while self._monitor.poll(wait_ms):
            event = recv_monitor_message(self._monitor)["event"]
            self.receivers += 1 if event == zmq.EVENT_ACCEPTED else -1
            wait_ms = 0

    def wait_for_receiver(self, timeout_s: float | None = None) -> None:
        """Wait until a receiver is connected (TimeoutError after ``timeout_s``; None: for ever)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._count_receivers(0)
        while self.receivers <= 0:
            if self._stop.is_set():
                raise DetectorStopped("stopped while waiting for a receiver")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"no receiver connected to {self.endpoint} within {timeout_s:g} s")
            self._count_receivers(_POLL_MS)

    def send_series(self, n: int, timeout_s: float | None = None) -> str:
        """Send ``n`` frames and the series end; return the series id.

        The series starts once a receiver is connected (its clock too, when
        paced). Waiting, for the receiver or for a send, lasts at most
        ``timeout_s`` (None: for ever); raises TimeoutError, or
        :class:`DetectorStopped` after :meth:`stop`.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"frames per series must be an integer >= 0, got {n!r}")
        self._stop.clear()
        self.wait_for_receiver(timeout_s)
        self._series += 1
        series = f"{self._run}-{self._series}"
        period = 1.0 / self.rate_hz if self.rate_hz > 0 else 0.0
        start = time.perf_counter()
        for i in range(n):
            if period:
                delay = start + i * period - time.perf_counter()
                if delay > 0 and self._stop.wait(delay):
                    raise DetectorStopped(f"series {series} stopped after {i} of {n} frames")
            msg = m.Message(m.FRAME, scan=series, index=i, meta={"exposure_time": period})
            msg.arrays["data"] = self.simulator.frame(i)
            self._send(msg, timeout_s)
        self._send(m.Message(m.SCAN_END, scan=series, body={"frames": n}), timeout_s)
        return series

    def _send(self, msg: m.Message, timeout_s: float | None) -> None:
        # stamped once the pipe has room: time spent waiting for a slow receiver is not latency
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if self._sock.poll(_POLL_MS, zmq.POLLOUT):
                try:
                    send(self._sock, msg.stamp("detector"), flags=zmq.NOBLOCK)
                    return
                except zmq.Again:
                    pass
            if self._stop.is_set():
                raise DetectorStopped(f"stopped while sending {msg.kind} {msg.scan}/{msg.index}")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(
                    f"no receiver took {msg.kind} {msg.scan}/{msg.index} at {self.endpoint} within {timeout_s:g} s"
                )

    def stop(self) -> None:
        """Make a running :meth:`send_series` return soon (from another thread)."""
        self._stop.set()

    def close(self, linger_s: float = 0.0) -> None:
        """Close the socket, waiting at most ``linger_s`` for queued messages to leave."""
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        self._monitor.close(0)
        self._sock.close(int(linger_s * 1000))
        self._context.term()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.sources.stream",
        description="A simulated detector process: pushes frames to a tangopipe 'stream' source.",
    )
    parser.add_argument(
        "--port", type=int, default=9998, help="port to bind (0: any free port; default 9998)"
    )
    parser.add_argument("--bind", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--frames", type=int, default=1000, help="frames per series (default 1000)")
    parser.add_argument(
        "--series", type=int, default=1, help="series to send, one after the other (default 1)"
    )
    parser.add_argument(
        "--rate-hz", type=float, default=0.0, help="frame rate (0: as fast as taken; default 0)"
    )
    parser.add_argument("--shape", type=int, nargs=2, default=[2048, 2048], metavar=("ROWS", "COLS"))
    parser.add_argument("--dtype", default="uint16", help="pixel type (default uint16)")
    parser.add_argument(
        "--timeout-s", type=float, default=60.0, help="give up when nobody takes a frame this long"
    )
    args = parser.parse_args(argv)
    try:
        detector = StreamDetector(args.port, args.bind, args.shape, args.dtype, args.rate_hz)
    except (ValueError, OSError) as exc:
        print(f"stream detector: {exc}", file=sys.stderr)
        return 2
    print(f"stream detector: sending on {detector.endpoint}", flush=True)
    code = 0
    try:
        for _ in range(args.series):
            started, cpu = time.perf_counter(), time.process_time()
            series = detector.send_series(args.frames, args.timeout_s)
            took, cpu = time.perf_counter() - started, time.process_time() - cpu
            print(f"series {series}: {args.frames} frames in {took:.3f} s, cpu {cpu:.3f} s", flush=True)
    except (TimeoutError, DetectorStopped) as exc:
        print(f"stream detector: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    finally:
        detector.close(linger_s=args.timeout_s if code == 0 else 0.0)
    return code


if __name__ == "__main__":
    sys.exit(main())
