"""A simulated Eiger DCU: the stream v1 as the detector pushes it, with optional faults.

It binds a PUSH socket like the DCU (tcp://127.0.0.1:9999 by default; port 0
picks a free one) and sends a series header at a chosen header_detail, the
images in a chosen encoding, and the series end. Faults a real link shows (a
lost frame, a missing part, a damaged blob, bad JSON, a wrong size, another
series...) can be injected per frame, so the source's error handling is tested
on the wire, and a beamline can rehearse with it before the detector arrives::

    python -m pipelines.sources.eiger_simulator --frames 100 --encoding bs32-lz4 --port 9999

Encodings are written as the DCU writes them (``bs32-lz4<``); on the command
line the trailing ``<`` may be left out, and ``raw`` means ``<``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import zmq

from pipelines.sources.eiger import (
    COUNTRATE_TABLE,
    DETAIL_LEVELS,
    FLATFIELD,
    HEADER,
    IMAGE,
    IMAGE_CONFIG,
    IMAGE_DATA,
    PIXEL_MASK,
    SERIES_END,
    encode_blob,
    parse_encoding,
)
from pipelines.sources.simulator import SimulatedDetector

#: fault name -> what happens to that frame's message
FAULTS: dict[str, str] = {
    "drop": "the image is never sent (a lost frame)",
    "duplicate": "the image is sent twice",
    "missing_part": "the data blob part is left out",
    "corrupt_blob": "the blob is damaged (undecodable when compressed, detectable by hash when raw)",
    "bad_json": "the dimage_d part is truncated JSON",
    "wrong_size": "the dimage_d 'size' is one byte more than the blob",
    "wrong_series": "the image claims another series",
    "unknown_encoding": "the dimage_d 'encoding' is 'zstd<'",
    "bad_config": "the dconfig part is not JSON (the pixels stay good)",
}

WAVELENGTH_A = 1.0
HC_EV_A = 12398.419843


def default_encoding(dtype: np.dtype | str) -> str:
    """What the DCU sends with compression 'bslz4': ``bs<bits>-lz4<``."""
    itemsize = np.dtype(dtype).itemsize
    if itemsize not in (1, 2, 4, 8):
        raise ValueError(f"no bitshuffle encoding for {np.dtype(dtype).name}")
    return f"bs{itemsize * 8}-lz4<"


def normalise_encoding(encoding: str) -> str:
    """Accept ``raw``/``none`` and encodings without the trailing byte order."""
    if encoding in ("raw", "none", ""):
        encoding = "<"
    elif not encoding.endswith(("<", ">")):
        encoding += "<"
    parse_encoding(encoding)
    return encoding


def detector_config(
    shape: Sequence[int], dtype: np.dtype | str, nimages: int, encoding: str, *, frame_time: float = 0.01
) -> dict[str, Any]:
    """A detector configuration like the DCU's header part 2 (shape is (y, x))."""
    rows, cols = int(shape[0]), int(shape[1])
    compression, _, _ = parse_encoding(encoding)
    return {
        "auto_summation": True,
        "beam_center_x": round(cols * 0.47, 3),
        "beam_center_y": round(rows * 0.52, 3),
        "bit_depth_image": np.dtype(dtype).itemsize * 8,
        "bit_depth_readout": 16,
        "compression": {"": "none", "lz4": "lz4", "bslz4": "bslz4"}[compression],
        "count_time": round(frame_time - 1e-7, 9),
        "countrate_correction_applied": True,
        "data_collection_date": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "description": "Simulated EIGER2 (tangopipe)",
        "detector_distance": 0.2,
        "detector_number": "SIM-0000",
        "detector_readout_time": 1e-7,
        "flatfield_correction_applied": True,
        "frame_time": frame_time,
        "nimages": int(nimages),
        "ntrigger": 1,
        "photon_energy": round(HC_EV_A / WAVELENGTH_A, 3),
        "pixel_mask_applied": True,
        "sensor_material": "Si",
        "sensor_thickness": 0.00045,
        "software_version": "1.8.0",
        "threshold_energy": round(HC_EV_A / WAVELENGTH_A / 2, 3),
        "trigger_mode": "ints",
        "wavelength": WAVELENGTH_A,
        "x_pixel_size": 7.5e-05,
        "x_pixels_in_detector": cols,
        "y_pixel_size": 7.5e-05,
        "y_pixels_in_detector": rows,
    }


def default_tables(shape: Sequence[int]) -> dict[str, np.ndarray]:
    """Flat field, pixel mask and count-rate table for header_detail "all" (deterministic)."""
    rows, cols = int(shape[0]), int(shape[1])
    flatfield = (1.0 + 0.05 * np.linspace(-1, 1, cols, dtype=np.float32)[None, :]).repeat(rows, 0)
    mask = np.zeros((rows, cols), np.uint32)
    mask[rows // 2, :] = 1  # a module gap
    mask[::97, ::89] |= 2  # dead pixels
    mask[3 % rows, 5 % cols] |= 8  # a noisy pixel
    counts = np.arange(1000, dtype=np.float32)
    countrate = np.stack([counts, counts * (1 + counts / 5000)]).astype(np.float32)
    return {"flatfield": flatfield.astype(np.float32), "pixel_mask": mask, "countrate_table": countrate}


def _json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _appendix(value: Any) -> bytes:
    return value.encode() if isinstance(value, str) else _json(value)


def series_header_parts(
    series: int,
    detail: str,
    config: Mapping[str, Any],
    *,
    flatfield: np.ndarray | None = None,
    pixel_mask: np.ndarray | None = None,
    countrate_table: np.ndarray | None = None,
    appendix: Any = None,
) -> list[bytes]:
    """The series header message at ``detail`` ("none", "basic", "all")."""
    if detail not in DETAIL_LEVELS:
        raise ValueError(f"header detail {detail!r} must be one of {DETAIL_LEVELS}")
    parts = [_json({"htype": HEADER, "series": series, "header_detail": detail})]
    if detail in ("basic", "all"):
        parts.append(_json(config))
    if detail == "all":
        for htype, table in (
            (FLATFIELD, flatfield),
            (PIXEL_MASK, pixel_mask),
            (COUNTRATE_TABLE, countrate_table),
        ):
            if table is None or np.ndim(table) != 2:
                raise ValueError(f"header detail 'all' needs a 2-D {htype} table, got {np.shape(table)}")
            table = np.ascontiguousarray(table, dtype=table.dtype.newbyteorder("<"))
            rows, cols = table.shape
            parts.append(_json({"htype": htype, "shape": [cols, rows], "type": table.dtype.name}))
            parts.append(table.tobytes())
    if appendix is not None:
        parts.append(_appendix(appendix))
    return parts


def image_parts(
    series: int,
    frame: int,
    array: np.ndarray,
    encoding: str,
    *,
    block_bytes: int = 0,
    start_time: int = 0,
    stop_time: int = 0,
    real_time: int = 0,
    appendix: Any = None,
) -> list[bytes]:
    """One image message; ``hash`` is the md5 of the blob."""
    array = np.asarray(array)
    blob = encode_blob(array, encoding, block_bytes)
    rows, cols = array.shape
    parts = [
        _json({"htype": IMAGE, "series": series, "frame": frame, "hash": hashlib.md5(blob).hexdigest()}),
        _json(
            {
                "htype": IMAGE_DATA,
                "shape": [cols, rows],
                "type": array.dtype.name,
                "encoding": encoding,
                "size": len(blob),
            }
        ),
        blob,
        _json(
            {"htype": IMAGE_CONFIG, "start_time": start_time, "stop_time": stop_time, "real_time": real_time}
        ),
    ]
    if appendix is not None:
        parts.append(_appendix(appendix))
    return parts


def series_end_parts(series: int) -> list[bytes]:
    return [_json({"htype": SERIES_END, "series": series})]


def apply_fault(parts: list[bytes], fault: str) -> list[list[bytes]]:
    """The messages to send instead of one image message (see :data:`FAULTS`)."""
    if fault not in FAULTS:
        raise ValueError(f"fault {fault!r} is not one of {', '.join(FAULTS)}")
    parts = list(parts)
    first = json.loads(parts[0])
    desc = json.loads(parts[1])
    if fault == "drop":
        return []
    if fault == "duplicate":
        return [parts, list(parts)]
    if fault == "missing_part":
        del parts[2]
    elif fault == "corrupt_blob":
        parts[2] = _damage(parts[2], desc["encoding"])
    elif fault == "bad_json":
        parts[1] = parts[1][: len(parts[1]) // 2]
    elif fault == "wrong_size":
        desc["size"] += 1
        parts[1] = _json(desc)
    elif fault == "wrong_series":
        first["series"] += 1000
        parts[0] = _json(first)
    elif fault == "unknown_encoding":
        desc["encoding"] = "zstd<"
        parts[1] = _json(desc)
    elif fault == "bad_config":
        parts[3] = b'{"htype":"dconfig-1.0","real_time":%f (real, start, stop)}'
    return [parts]


def _damage(blob: bytes, encoding: str) -> bytes:
    """Damage a blob so that a compressed one cannot be decoded (same length)."""
    compression, _, _ = parse_encoding(encoding)
    damaged = bytearray(blob)
    if compression == "bslz4" and len(damaged) >= 16:
        damaged[12:16] = (len(blob) * 2).to_bytes(4, "big")  # first block claims more than the blob holds
    elif compression == "lz4":
        damaged[:] = b"\xff" * len(damaged)  # a literal run longer than the input
    else:
        for i in range(0, len(damaged), max(1, len(damaged) // 16)):
            damaged[i] ^= 0xFF
    return bytes(damaged)


class SimulatedEigerDCU:
    """A PUSH socket that speaks Eiger stream v1.

    ``send_timeout_s`` is how long one message may wait for a consumer (PUSH
    holds messages while nobody pulls); None waits forever. Series numbers count
    up from ``first_series`` like the DCU's arm counter.
    """

    def __init__(
        self,
        port: int = 9999,
        *,
        host: str = "127.0.0.1",
        sndhwm: int = 100,
        send_timeout_s: float | None = 10.0,
        first_series: int = 1,
    ):
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"DCU port must be 0 (any free port) or 1..65535, got {port!r}")
        if send_timeout_s is not None and not send_timeout_s > 0:
            raise ValueError(f"DCU send_timeout_s must be positive seconds or None, got {send_timeout_s!r}")
        self.send_timeout_s = send_timeout_s
        self.next_series = int(first_series)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._thread_result: int | BaseException | None = None
        self._socket = zmq.Context.instance().socket(zmq.PUSH)
        self._socket.setsockopt(zmq.SNDHWM, sndhwm)
        try:
            self._socket.bind(f"tcp://{host}:{port or '*'}")
        except zmq.ZMQError as exc:
            self._socket.close(0)
            raise OSError(f"DCU cannot bind tcp://{host}:{port}: {exc}") from exc
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.port = int(self.endpoint.rsplit(":", 1)[1])
        self.messages_sent = 0

    def send_parts(self, parts: Sequence[bytes]) -> None:
        """Send one multipart message (waits up to ``send_timeout_s`` for a consumer)."""
        deadline = None if self.send_timeout_s is None else time.monotonic() + self.send_timeout_s
        while not self._socket.poll(100, zmq.POLLOUT):
            if self._stop.is_set():
                raise InterruptedError("DCU stopped while waiting for a consumer")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(
                    f"no consumer took a message from {self.endpoint} within {self.send_timeout_s} s"
                )
        self._socket.send_multipart(list(parts), copy=False)
        self.messages_sent += 1

    def send_series(
        self,
        frames: int | Iterable[np.ndarray],
        *,
        encoding: str | None = None,
        detail: str = "basic",
        series: int | None = None,
        shape: Sequence[int] = (512, 512),
        dtype: str = "uint32",
        rate_hz: float = 0.0,
        config: Mapping[str, Any] | None = None,
        header_appendix: Any = None,
        image_appendix: Any = None,
        flatfield: np.ndarray | None = None,
        pixel_mask: np.ndarray | None = None,
        countrate_table: np.ndarray | None = None,
        faults: Mapping[int, str] | None = None,
        block_bytes: int = 0,
        send_end: bool = True,
        seed: int = 7,
    ) -> int:
        """Send one series and return its number (also when :meth:`stop` aborted it).

        ``frames`` is a count (images of :class:`SimulatedDetector` with
        ``shape`` (y, x), ``dtype``, ``seed``) or the images themselves (a
        sequence or a 3-D stack). ``encoding`` defaults to ``bs<bits>-lz4<``;
        ``config`` overrides keys of the detector configuration (e.g. a wrong
        ``nimages``); the "all" tables default to :func:`default_tables`;
        ``faults`` maps frame numbers to a :data:`FAULTS` name.
        """
        self._stop.clear()
        if isinstance(frames, int):
            if frames < 0:
                raise ValueError(f"frames must be >= 0, got {frames}")
            detector = SimulatedDetector(shape=list(shape), dtype=dtype, rate_hz=0, frames=frames, seed=seed)
            count, images = frames, (detector.frame(i) for i in range(frames))
            shape, pixel = detector.shape, detector.dtype
        else:
            stack = frames if isinstance(frames, np.ndarray) else list(frames)
            count = len(stack)
            if count == 0:
                raise ValueError("frames is an empty sequence; pass 0 to send an empty series")
            shape, pixel = np.shape(stack[0]), np.asarray(stack[0]).dtype
            images = iter(stack)
        encoding = normalise_encoding(encoding) if encoding else default_encoding(pixel)
        faults = dict(faults or {})
        for frame, fault in faults.items():
            if fault not in FAULTS:
                raise ValueError(f"fault {fault!r} for frame {frame} is not one of {', '.join(FAULTS)}")
        if series is None:
            series = self.next_series
        self.next_series = series + 1
        frame_time = 1.0 / rate_hz if rate_hz > 0 else 0.01
        header_config = detector_config(shape, pixel, count, encoding, frame_time=frame_time)
        header_config.update(config or {})
        tables = default_tables(shape)
        for name, given in (
            ("flatfield", flatfield),
            ("pixel_mask", pixel_mask),
            ("countrate_table", countrate_table),
        ):
            if given is not None:
                tables[name] = np.asarray(given)
        header = series_header_parts(series, detail, header_config, appendix=header_appendix, **tables)
        count_ns = int(round(header_config.get("count_time", frame_time) * 1e9))
        try:
            self.send_parts(header)
            start = time.monotonic()
            for frame, image in enumerate(images):
                if rate_hz > 0:
                    delay = start + frame / rate_hz - time.monotonic()
                    if delay > 0 and self._stop.wait(delay):
                        return series
                if self._stop.is_set():
                    return series
                begin = int(frame * frame_time * 1e9)
                parts = image_parts(
                    series,
                    frame,
                    image,
                    encoding,
                    block_bytes=block_bytes,
                    start_time=begin,
                    stop_time=begin + count_ns,
                    real_time=count_ns,
                    appendix=image_appendix,
                )
                for message in apply_fault(parts, faults[frame]) if frame in faults else [parts]:
                    self.send_parts(message)
            if send_end:
                self.send_parts(series_end_parts(series))
        except InterruptedError:  # stop() while waiting for the consumer: like an aborted series
            pass
        return series

    def start_series(self, frames: int | Iterable[np.ndarray], **options: Any) -> threading.Thread:
        """:meth:`send_series` in a thread; :meth:`wait` joins it and returns the series number."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("a series is still being sent; wait() for it first")

        def run() -> None:
            try:
                self._thread_result = self.send_series(frames, **options)
            except BaseException as exc:  # handed to wait()
                self._thread_result = exc

        self._thread_result = None
        self._thread = threading.Thread(target=run, name="eiger-dcu", daemon=True)
        self._thread.start()
        return self._thread

    def wait(self, timeout: float | None = None) -> int | None:
        """Join the series started by :meth:`start_series`; re-raises its error."""
        if self._thread is None:
            return None
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the series is still being sent after {timeout} s")
        result, self._thread = self._thread_result, None
        if isinstance(result, BaseException):
            raise result
        return result

    def stop(self) -> None:
        """Abort a series being sent (its end is not sent)."""
        self._stop.set()

    def close(self, linger_s: float = 2.0) -> None:
        """Stop sending and close, giving queued messages ``linger_s`` to leave."""
        if self._thread is not None and self._thread.is_alive():
            self._stop.set()
            self._thread.join(5.0)
        self._socket.close(int(linger_s * 1000))

    def __enter__(self) -> SimulatedEigerDCU:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fault_arg(text: str) -> tuple[int, str]:
    frame, _, fault = text.partition(":")
    if not frame.isdigit() or fault not in FAULTS:
        raise argparse.ArgumentTypeError(
            f"--fault takes FRAME:KIND with KIND one of {', '.join(FAULTS)}, got {text!r}"
        )
    return int(frame), fault


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: send series like a DCU until done (or Ctrl-C)."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.sources.eiger_simulator",
        description="A simulated Eiger DCU pushing the stream v1 on a ZMQ PUSH socket.",
    )
    parser.add_argument("--frames", type=int, default=100, help="images per series (default 100)")
    parser.add_argument(
        "--encoding",
        default=None,
        help="'<' or 'raw', 'lz4<', 'bs8-lz4<', 'bs16-lz4<', 'bs32-lz4<' (the '<' may be left out; "
        "default bs<bits>-lz4< for --dtype)",
    )
    parser.add_argument(
        "--detail", choices=DETAIL_LEVELS, default="basic", help="header_detail (default basic)"
    )
    parser.add_argument(
        "--port", type=int, default=9999, help="TCP port to bind, 0 for any free (default 9999)"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)"
    )
    parser.add_argument("--shape", type=int, nargs=2, default=(2048, 2048), metavar=("Y", "X"))
    parser.add_argument("--dtype", default="uint32", choices=("uint8", "uint16", "uint32"))
    parser.add_argument("--rate-hz", type=float, default=0.0, help="frame rate, 0 = as fast as possible")
    parser.add_argument("--series", type=int, default=1, help="number of the first series (default 1)")
    parser.add_argument(
        "--repeat", type=int, default=1, help="series to send one after the other (default 1)"
    )
    parser.add_argument(
        "--fault",
        type=_fault_arg,
        action="append",
        default=[],
        metavar="FRAME:KIND",
        help=f"inject a fault into one frame; KIND is one of {', '.join(FAULTS)}",
    )
    parser.add_argument(
        "--send-timeout", type=float, default=None, help="give up when no consumer pulls for this long (s)"
    )
    args = parser.parse_args(argv)
    try:
        encoding = normalise_encoding(args.encoding) if args.encoding else None
    except ValueError as exc:
        parser.error(f"--encoding: {exc}")
    try:
        dcu = SimulatedEigerDCU(
            args.port, host=args.host, send_timeout_s=args.send_timeout, first_series=args.series
        )
    except OSError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"simulated Eiger DCU pushing on {dcu.endpoint}", flush=True)
    try:
        for _ in range(args.repeat):
            start = time.monotonic()
            series = dcu.send_series(
                args.frames,
                encoding=encoding,
                detail=args.detail,
                shape=args.shape,
                dtype=args.dtype,
                rate_hz=args.rate_hz,
                faults=dict(args.fault),
            )
            took = time.monotonic() - start
            rate = args.frames / took if took > 0 else float("inf")
            print(
                f"series {series}: {args.frames} frames sent in {took:.2f} s ({rate:.1f} frames/s)",
                flush=True,
            )
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        dcu.close(0)
        return 130
    except TimeoutError as exc:
        print(exc, file=sys.stderr)
        dcu.close(0)
        return 1
    dcu.close(linger_s=10.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
