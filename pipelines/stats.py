"""Counters, rates and latencies every engine exposes (and every device publishes)."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import numpy as np


class RateMeter:
    """Events (or bytes) per second over a sliding window of a few seconds."""

    def __init__(self, window_s: float = 2.0):
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque()
        self._lock = threading.Lock()

    def add(self, amount: float = 1.0) -> None:
        now = time.monotonic()
        with self._lock:
            self._samples.append((now, amount))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._samples and now - self._samples[0][0] > self.window_s:
            self._samples.popleft()

    def rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            if not self._samples:
                return 0.0
            total = sum(a for _, a in self._samples)
        return total / self.window_s


class LatencyRecorder:
    """Latency samples since the scan started (bounded reservoir), for p50 and p99."""

    def __init__(self, capacity: int = 20000):
        self._samples: deque[float] = deque(maxlen=capacity)

    def add(self, seconds: float) -> None:
        self._samples.append(seconds)

    def reset(self) -> None:
        self._samples.clear()

    def percentiles_ms(self) -> tuple[float, float]:
        if not self._samples:
            return 0.0, 0.0
        p50, p99 = np.percentile(np.fromiter(self._samples, float), [50, 99])
        return float(p50 * 1e3), float(p99 * 1e3)


class BadMessageLog:
    """Counts malformed input per reason and logs each reason at most every ``period_s``."""

    def __init__(self, logger: logging.Logger, where: str, period_s: float = 10.0):
        self.logger = logger
        self.where = where
        self.period_s = period_s
        self.by_reason: dict[str, int] = {}
        self._last_logged: dict[str, float] = {}
        self.last_error = ""

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def record(self, reason: str, detail: str) -> None:
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        self.last_error = f"{reason}: {detail}"
        now = time.monotonic()
        if now - self._last_logged.get(reason, -1e9) >= self.period_s:
            self._last_logged[reason] = now
            self.logger.warning(
                "%s: bad message (%s, %d so far): %s", self.where, reason, self.by_reason[reason], detail
            )


class FlowStats:
    """The standard counters of a pipeline stage."""

    def __init__(self, logger: logging.Logger, where: str):
        self.frames_in = 0
        self.frames_out = 0
        self.bytes_in = 0
        self.dropped = 0
        self.errors = 0
        self.in_rate = RateMeter()
        self.out_rate = RateMeter()
        self.byte_rate = RateMeter()
        self.latency = LatencyRecorder()
        self.bad = BadMessageLog(logger, where)

    def count_in(self, nbytes: int = 0) -> None:
        self.frames_in += 1
        self.bytes_in += nbytes
        self.in_rate.add()
        if nbytes:
            self.byte_rate.add(nbytes)

    def count_out(self, n: int = 1) -> None:
        self.frames_out += n
        self.out_rate.add(n)

    def reset_scan(self) -> None:
        self.latency.reset()

    def snapshot(self) -> dict[str, float | int]:
        p50, p99 = self.latency.percentiles_ms()
        return {
            "FramesIn": self.frames_in,
            "FramesOut": self.frames_out,
            "BadMessages": self.bad.total,
            "DroppedFrames": self.dropped,
            "Errors": self.errors,
            "InputRateHz": round(self.in_rate.rate(), 3),
            "OutputRateHz": round(self.out_rate.rate(), 3),
            "BytesPerSecond": round(self.byte_rate.rate(), 1),
            "LatencyP50Ms": round(p50, 3),
            "LatencyP99Ms": round(p99, 3),
        }
