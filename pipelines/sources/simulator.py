"""A simulated area detector: deterministic Debye-Scherrer rings on noise.

Frames are cheap to make at full size and rate: a few ring patterns and a few
noise fields are computed once, and frame ``i`` is ``rings[i % R] + noise[i % N]``
with R and N coprime, so consecutive frames differ and any frame can be
recomputed from its index alone (tests compare results against
:meth:`SimulatedDetector.frame`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

_RING_VARIANTS = 5
_NOISE_VARIANTS = 7


class SimulatedDetector:
    """Frame source for demos and tests.

    ``frames`` is the default number of frames per scan and ``rate_hz`` the
    acquisition rate (0: as fast as possible); StartScan's metadata keys
    ``frames`` and ``rate_hz`` override them for one scan.
    """

    def __init__(
        self,
        *,
        shape: list[int] | tuple[int, int] = (2048, 2048),
        dtype: str = "uint16",
        rate_hz: float = 50.0,
        frames: int = 100,
        seed: int = 7,
        pixel_size_um: float = 75.0,
    ):
        if not (isinstance(shape, list | tuple) and len(shape) == 2 and all(int(n) > 0 for n in shape)):
            raise ValueError(f"simulator shape must be [rows, cols] with positive sizes, got {shape!r}")
        self.shape = (int(shape[0]), int(shape[1]))
        try:
            self.dtype = np.dtype(dtype)
        except TypeError as exc:
            raise ValueError(f"simulator dtype {dtype!r} is not a numpy dtype (use uint16, uint32, float32)") from exc
        if self.dtype.kind not in "uif":
            raise ValueError(f"simulator dtype {dtype!r} must be an integer or float type")
        if rate_hz < 0:
            raise ValueError(f"simulator rate_hz must be >= 0, got {rate_hz}")
        if frames < 0:
            raise ValueError(f"simulator frames must be >= 0, got {frames}")
        self.rate_hz = float(rate_hz)
        self.default_frames = int(frames)
        self.seed = int(seed)
        self.pixel_size_um = float(pixel_size_um)
        self._stop = threading.Event()
        self._rings, self._noise = self._patterns()

    def _patterns(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        rows, cols = self.shape
        rng = np.random.default_rng(self.seed)
        y = np.arange(rows, dtype=np.float32)[:, None] - rows * 0.52
        x = np.arange(cols, dtype=np.float32)[None, :] - cols * 0.47
        r = np.sqrt(x * x + y * y)
        scale = max(rows, cols) / 2048.0
        radii = np.array([180, 310, 420, 560, 690, 830], dtype=np.float32) * scale
        widths = np.array([4, 5, 6, 6, 7, 8], dtype=np.float32) * scale
        heights = np.array([900, 600, 450, 300, 220, 150], dtype=np.float32)
        top = np.iinfo(self.dtype).max if self.dtype.kind in "ui" else 1e9
        rings, noise = [], []
        for v in range(_RING_VARIANTS):
            img = np.zeros(self.shape, np.float32)
            gain = 1.0 + 0.15 * v
            for rad, w, h in zip(radii, widths, heights, strict=True):
                img += h * gain * np.exp(-0.5 * ((r - rad) / w) ** 2)
            rings.append(np.clip(img, 0, top / 2).astype(self.dtype))
        for _ in range(_NOISE_VARIANTS):
            noise.append(np.clip(rng.poisson(20.0, self.shape), 0, top / 2).astype(self.dtype))
        return rings, noise

    def frame(self, index: int) -> np.ndarray:
        """The frame with acquisition index ``index`` (a new array)."""
        return self._rings[index % _RING_VARIANTS] + self._noise[index % _NOISE_VARIANTS]

    def frames(self, scan: Mapping[str, Any]) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
        count = int(scan.get("frames", self.default_frames))
        rate_hz = float(scan.get("rate_hz", self.rate_hz))  # a scan may ask for another rate
        self._stop.clear()
        period = 1.0 / rate_hz if rate_hz > 0 else 0.0
        start = time.perf_counter()
        for i in range(count):
            if self._stop.is_set():
                return
            if period:
                delay = start + i * period - time.perf_counter()
                if delay > 0 and self._stop.wait(delay):
                    return
            yield self.frame(i), {"exposure_time": period or 0.0}

    def stop(self) -> None:
        self._stop.set()

    def describe(self) -> dict[str, Any]:
        return {
            "detector": "simulator",
            "shape": list(self.shape),
            "dtype": self.dtype.name,
            "rate_hz": self.rate_hz,
            "pixel_size_um": self.pixel_size_um,
            "seed": self.seed,
        }
