"""The data-plane wire format: one ZeroMQ multipart message per unit of work.

Frame 0 is a small UTF-8 JSON header, frames 1..n are raw C-contiguous array
buffers sent without copying. This module is the only place that encodes or
decodes messages, and it validates everything it receives: a bad message raises
:class:`BadMessage` (with a short ``reason`` usable as a counter key), never
anything else, so a device can count it, log it and carry on.

Nothing received is ever unpickled or evaluated: headers are JSON, buffers are
interpreted only through a whitelisted numeric dtype and a bounded shape.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PROTOCOL = "tangopipe/1"

# Kinds of message.  Data kinds travel master -> worker -> sorter -> consumers;
# control kinds travel back up (credit, hello) or keep links alive (heartbeat).
SCAN_START = "scan_start"
FRAME = "frame"
RESULT = "result"
SCAN_END = "scan_end"
GAP = "gap"
HEARTBEAT = "heartbeat"
HELLO = "hello"
CREDIT = "credit"
QUERY = "query"
REPLY = "reply"
BYE = "bye"
BATCH = "batch"  # several messages in one multipart message (sorter -> consumers)
DATA_KINDS = frozenset({SCAN_START, FRAME, RESULT, SCAN_END, GAP})
KINDS = DATA_KINDS | {HEARTBEAT, HELLO, CREDIT, QUERY, REPLY, BYE, BATCH}
MAX_BATCH = 1024

#: dtypes a buffer may have: numeric only, both byte orders.
ALLOWED_DTYPES = frozenset(
    np.dtype(f"{order}{code}").str
    for code in ("b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8", "c8", "c16")
    for order in ("<", ">", "|")
    if (order == "|") == (code in ("b1", "i1", "u1"))
)

MAX_HEADER_BYTES = 1 << 20  # 1 MiB of JSON is already absurd for a header
MAX_BUFFERS = 64
MAX_NDIM = 4
MAX_ELEMENTS = 1 << 30  # 1 G elements: bigger than any detector frame
MAX_INDEX = (1 << 53) - 1  # exact in JSON / float64

_HEADER_KEYS = frozenset(
    {"protocol", "kind", "scan", "index", "stream", "buffers", "scalars", "meta", "times", "version", "body"}
)


class BadMessage(ValueError):
    """A received message that does not follow the protocol.

    ``reason`` is a short, stable key (``bad_json``, ``bad_shape``...) used to
    count and rate-limit log lines per kind of fault.
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Message:
    """One unit on the data plane.

    ``scan`` is the scan id given at StartScan (int or str), ``index`` the
    acquisition index within the scan, ``stream`` the stream it belongs to.
    ``arrays`` and ``scalars`` hold the payload; ``meta`` is free JSON metadata;
    ``times`` maps a stage name to the wall-clock time it handled the message;
    ``version`` is the processing-configuration version that produced a result;
    ``body`` is a small JSON payload for control kinds (credit counts, queries).
    """

    kind: str
    scan: int | str | None = None
    index: int | None = None
    stream: str = ""
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    scalars: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)
    version: int = 0
    body: dict[str, Any] = field(default_factory=dict)

    def stamp(self, stage: str) -> Message:
        self.times[stage] = time.time()
        return self

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _clean_scalar(value: Any) -> Any:
    # NaN and inf are not JSON; send them as strings the decoder turns back.
    if isinstance(value, float | np.floating) and not math.isfinite(value):
        return repr(float(value))
    return value


def encode(msg: Message) -> list:
    """Encode ``msg`` as multipart frames; array buffers are not copied."""
    buffers = []
    descriptors = []
    for name, array in msg.arrays.items():
        array = np.asarray(array)
        if not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)
        descriptors.append({"name": name, "dtype": array.dtype.str, "shape": list(array.shape)})
        buffers.append(memoryview(array).cast("B") if array.size else b"")
    header = {
        "protocol": PROTOCOL,
        "kind": msg.kind,
        "scan": msg.scan,
        "index": msg.index,
        "stream": msg.stream,
        "buffers": descriptors,
        "scalars": {k: _clean_scalar(v) for k, v in msg.scalars.items()},
        "meta": msg.meta,
        "times": msg.times,
        "version": msg.version,
    }
    if msg.body:
        header["body"] = msg.body
    return [json.dumps(header, default=_json_default, allow_nan=False).encode(), *buffers]


def _restore_scalar(value: Any) -> Any:
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    return value


def _check_descriptor(i: int, desc: Any, nbytes: int) -> tuple[str, np.dtype, tuple[int, ...]]:
    if not isinstance(desc, dict):
        raise BadMessage("bad_buffer", f"buffer descriptor {i} is not an object")
    name = desc.get("name")
    if not isinstance(name, str) or not name or len(name) > 200:
        raise BadMessage("bad_buffer", f"buffer {i} has no valid name")
    dtype_str = desc.get("dtype")
    if not isinstance(dtype_str, str) or len(dtype_str) > 8:
        raise BadMessage("bad_dtype", f"buffer {name!r}: dtype {dtype_str!r} is not a numeric dtype")
    try:
        dtype = np.dtype(dtype_str)
    except TypeError as exc:
        raise BadMessage("bad_dtype", f"buffer {name!r}: dtype {dtype_str!r} is not understood") from exc
    if dtype.str not in ALLOWED_DTYPES:
        raise BadMessage("bad_dtype", f"buffer {name!r}: dtype {dtype_str!r} is not a numeric dtype")
    shape = desc.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_ELEMENTS for n in shape)
    ):
        raise BadMessage("bad_shape", f"buffer {name!r}: shape {shape!r} is not a list of <= {MAX_NDIM} sizes")
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise BadMessage("bad_shape", f"buffer {name!r}: shape {shape} has {count} elements")
    if count * dtype.itemsize != nbytes:
        raise BadMessage(
            "bad_size",
            f"buffer {name!r}: shape {shape} of {dtype.str} needs {count * dtype.itemsize} bytes, got {nbytes}",
        )
    return name, dtype, tuple(shape)


def decode(frames: Sequence[Any]) -> Message:
    """Decode and validate received frames (bytes or zmq.Frame).

    Arrays are read-only views on the received buffers (no copy).
    Raises :class:`BadMessage` for anything that is not a valid message.
    """
    if not frames:
        raise BadMessage("no_parts", "empty message")
    raw_header = frames[0].buffer if hasattr(frames[0], "buffer") else frames[0]
    if len(raw_header) > MAX_HEADER_BYTES:
        raise BadMessage("header_too_big", f"header of {len(raw_header)} bytes (limit {MAX_HEADER_BYTES})")
    try:
        header = json.loads(bytes(raw_header))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadMessage("bad_json", f"header is not JSON ({exc.__class__.__name__})") from exc
    if not isinstance(header, dict):
        raise BadMessage("bad_header", "header is not a JSON object")
    if header.get("protocol") != PROTOCOL:
        raise BadMessage("bad_protocol", f"protocol {str(header.get('protocol'))[:40]!r}, expected {PROTOCOL!r}")
    unknown = set(header) - _HEADER_KEYS
    if unknown:
        raise BadMessage("bad_header", f"unknown header keys {sorted(unknown)[:5]}")
    kind = header.get("kind")
    if kind not in KINDS:
        raise BadMessage("bad_kind", f"unknown kind {str(kind)[:40]!r}")
    scan = header.get("scan")
    if scan is not None and (
        isinstance(scan, bool) or not isinstance(scan, int | str) or (isinstance(scan, str) and len(scan) > 200)
    ):
        raise BadMessage("bad_scan", f"scan id {str(scan)[:40]!r} is not an int or short string")
    if isinstance(scan, int) and not -MAX_INDEX <= scan <= MAX_INDEX:
        raise BadMessage("bad_scan", f"scan id {scan} out of range")
    index = header.get("index")
    if index is not None and (isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= MAX_INDEX):
        raise BadMessage("bad_index", f"index {str(index)[:40]!r} is not an integer in [0, 2**53)")
    if kind in (FRAME, RESULT, GAP) and (scan is None or index is None):
        raise BadMessage("bad_index", f"a {kind} message needs a scan and an index")
    stream = header.get("stream", "")
    if not isinstance(stream, str) or len(stream) > 200:
        raise BadMessage("bad_stream", "stream is not a short string")
    descriptors = header.get("buffers", [])
    if not isinstance(descriptors, list) or len(descriptors) > MAX_BUFFERS:
        raise BadMessage("bad_buffer", "buffers is not a list of at most 64 descriptors")
    if len(descriptors) != len(frames) - 1:
        raise BadMessage("bad_parts", f"header describes {len(descriptors)} buffers, message has {len(frames) - 1}")
    arrays: dict[str, np.ndarray] = {}
    for i, desc in enumerate(descriptors):
        part = frames[i + 1]
        buf = part.buffer if hasattr(part, "buffer") else part
        name, dtype, shape = _check_descriptor(i, desc, len(memoryview(buf).cast("B")))
        if name in arrays:
            raise BadMessage("bad_buffer", f"buffer name {name!r} appears twice")
        arrays[name] = np.frombuffer(buf, dtype=dtype).reshape(shape) if shape else np.frombuffer(buf, dtype)[0]
    scalars = header.get("scalars", {})
    if not isinstance(scalars, dict) or not all(
        isinstance(v, int | float | str | bool) or v is None for v in scalars.values()
    ):
        raise BadMessage("bad_scalars", "scalars is not an object of numbers")
    meta = header.get("meta", {})
    times = header.get("times", {})
    body = header.get("body", {})
    if not isinstance(meta, dict) or not isinstance(body, dict):
        raise BadMessage("bad_header", "meta and body must be JSON objects")
    if not isinstance(times, dict) or not all(isinstance(v, int | float) for v in times.values()):
        raise BadMessage("bad_header", "times must map stage names to numbers")
    version = header.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise BadMessage("bad_header", "version must be an integer")
    return Message(
        kind=kind,
        scan=scan,
        index=index,
        stream=stream,
        arrays=arrays,
        scalars={k: _restore_scalar(v) for k, v in scalars.items()},
        meta=meta,
        times=times,
        version=version,
        body=body,
    )


def control(kind: str, **body: Any) -> Message:
    """A small control message (hello, credit, heartbeat, bye, query, reply)."""
    return Message(kind=kind, body=body)


def encode_batch(msgs: Sequence[Message]) -> list:
    """Several messages as one multipart message: a small header listing how many
    parts each has, then each message's parts (buffers still not copied)."""
    encoded = [encode(msg) for msg in msgs]
    header = {"protocol": PROTOCOL, "kind": BATCH, "body": {"parts": [len(e) for e in encoded]}}
    return [json.dumps(header).encode()] + [part for e in encoded for part in e]


def decode_many(frames: Sequence[Any]) -> list[Message]:
    """Decode a message or a batch of messages into a list (validated as decode does)."""
    if not frames:
        raise BadMessage("no_parts", "empty message")
    first = frames[0].buffer if hasattr(frames[0], "buffer") else frames[0]
    if len(first) > 200 or b'"batch"' not in bytes(first):
        return [decode(frames)]
    try:
        header = json.loads(bytes(first))
    except ValueError as exc:
        raise BadMessage("bad_json", f"header is not JSON ({exc.__class__.__name__})") from exc
    if not isinstance(header, dict) or header.get("kind") != BATCH:
        return [decode(frames)]
    if header.get("protocol") != PROTOCOL:
        raise BadMessage("bad_protocol", f"protocol {str(header.get('protocol'))[:40]!r}, expected {PROTOCOL!r}")
    parts = header.get("body", {}).get("parts") if isinstance(header.get("body"), dict) else None
    if (
        not isinstance(parts, list)
        or not 0 < len(parts) <= MAX_BATCH
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in parts)
        or sum(parts) != len(frames) - 1
    ):
        raise BadMessage("bad_batch", f"batch part counts {str(parts)[:60]} do not match {len(frames) - 1} parts")
    out, start = [], 1
    for n in parts:
        msg = decode(frames[start : start + n])
        if msg.kind == BATCH:
            raise BadMessage("bad_batch", "a batch inside a batch")
        out.append(msg)
        start += n
    return out
