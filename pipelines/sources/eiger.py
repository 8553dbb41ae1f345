"""The Eiger stream v1 (SIMPLON "stream" interface): parsing, decoding, and the source.

The detector's DCU binds a PUSH socket (TCP 9999) and sends one multipart
message per series header, per image and per series end:

* header ``[{"htype":"dheader-1.0","series":S,"header_detail":D}, ...]``; detail
  ``"basic"`` adds the detector configuration (JSON), ``"all"`` adds after it the
  flat field, pixel mask and count-rate table as (descriptor JSON, raw blob)
  pairs; an optional appendix part comes last;
* image ``[{"htype":"dimage-1.0","series":S,"frame":N,"hash":H},
  {"htype":"dimage_d-1.0","shape":[x,y],"type":T,"encoding":E,"size":n}, blob,
  {"htype":"dconfig-1.0","start_time":ns,"stop_time":ns,"real_time":ns}]`` and an
  optional appendix part;
* end ``[{"htype":"dseries_end-1.0","series":S}]``.

Shapes are ``[x, y]`` (fast axis first): the numpy array is ``(y, x)``. Blob
encodings: ``<`` raw little-endian, ``lz4<`` one bare LZ4 block, ``bsN-lz4<``
bitshuffle-LZ4 exactly as the HDF5 bitshuffle filter writes a chunk (12-byte
header: u64 big-endian uncompressed bytes, u32 big-endian block size in bytes;
then per block a u32 big-endian compressed size and the LZ4 block; the last
``n % 8`` elements are copied raw).

This module parses and validates everything it receives: a broken part raises
:class:`EigerProtocolError` with a ``reason`` usable as a counter key, or is
returned as a *problem* when the rest of the message is still usable. Nothing
received is unpickled or evaluated: parts are JSON or raw numbers of a
whitelisted dtype. :class:`EigerStreamSource` turns the stream into frames for the
master, counting and reporting every fault without ever raising for bad input.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import struct
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import bitshuffle
import lz4.block
import numpy as np
import zmq

from pipelines.sources import SourceError

log = logging.getLogger(__name__)

HEADER = "dheader-1.0"
IMAGE = "dimage-1.0"
IMAGE_DATA = "dimage_d-1.0"
IMAGE_CONFIG = "dconfig-1.0"
SERIES_END = "dseries_end-1.0"
FLATFIELD = "dflatfield-1.0"
PIXEL_MASK = "dpixelmask-1.0"
COUNTRATE_TABLE = "dcountrate_table-1.0"

DETAIL_LEVELS = ("none", "basic", "all")
#: header parts without the appendix, per header_detail
HEADER_PARTS = {"none": 1, "basic": 2, "all": 8}
#: the (descriptor htype, attribute name) of the header_detail "all" tables, in order
DETAIL_TABLES = ((FLATFIELD, "flatfield"), (PIXEL_MASK, "pixel_mask"), (COUNTRATE_TABLE, "countrate_table"))

#: pixel types an image or table may have
PIXEL_TYPES = frozenset(
    {"uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float32", "float64"}
)
MAX_JSON_BYTES = 4 << 20  # the detector configuration is a few kB
MAX_ELEMENTS = 1 << 30
#: bitshuffle's default: 8 kB blocks (what the DCU and the HDF5 filter use)
DEFAULT_BLOCK_BYTES = 8192

_ENCODING = re.compile(r"^(?:(lz4)|bs(8|16|32|64)-lz4)?([<>])$")
_BSHUF_HEADER = struct.Struct(">QI")
_BLOCK_SIZE = struct.Struct(">I")


class EigerProtocolError(ValueError):
    """A part of the Eiger stream that does not follow stream v1.

    ``reason`` is a stable counter key (``bad_json``, ``bad_parts``,
    ``size_mismatch``, ``decode_errors``, ``unknown_encoding``, ``bad_config``,
    ``hash_mismatch``); ``series``/``frame`` name the image when known.
    """

    def __init__(self, reason: str, detail: str, *, series: int | None = None, frame: int | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.series = series
        self.frame = frame

    def where(self) -> str:
        """'frame 12 of series 3: ' (or less when unknown), for error reports."""
        if self.frame is not None and self.series is not None:
            return f"frame {self.frame} of series {self.series}: "
        if self.frame is not None:
            return f"frame {self.frame}: "
        if self.series is not None:
            return f"series {self.series}: "
        return ""


# --------------------------------------------------------------------------- blobs


def parse_encoding(encoding: str) -> tuple[str, int, str]:
    """Split an Eiger encoding into (compression, bitshuffle element bytes, byte order).

    compression is ``""`` (raw), ``"lz4"`` or ``"bslz4"``; element bytes is 0
    unless bitshuffled.
    """
    match = _ENCODING.match(encoding) if isinstance(encoding, str) else None
    if match is None:
        raise EigerProtocolError(
            "unknown_encoding",
            f"encoding {encoding!r} is not one of '<', 'lz4<', 'bs8-lz4<', 'bs16-lz4<', 'bs32-lz4<'",
        )
    if match.group(1):
        return "lz4", 0, match.group(3)
    if match.group(2):
        return "bslz4", int(match.group(2)) // 8, match.group(3)
    return "", 0, match.group(3)


def pixel_dtype(type_name: str, byte_order: str = "<") -> np.dtype:
    """The numpy dtype of an Eiger pixel type name (whitelisted)."""
    if type_name not in PIXEL_TYPES:
        raise EigerProtocolError(
            "bad_parts", f"pixel type {type_name!r} is not one of {', '.join(sorted(PIXEL_TYPES))}"
        )
    return np.dtype(type_name).newbyteorder(byte_order)


def default_block_elements(elem_size: int) -> int:
    """bitshuffle's default block size in elements for ``elem_size``-byte elements."""
    return max(DEFAULT_BLOCK_BYTES // elem_size // 8 * 8, 128)


def bitshuffle_lz4_compress(raw: bytes | memoryview, elem_size: int, block_bytes: int = 0) -> bytes:
    """Bitshuffle-LZ4 ``raw`` with the 12-byte header (an HDF5 bitshuffle chunk)."""
    view = memoryview(raw).cast("B")
    if len(view) % elem_size:
        raise ValueError(f"bitshuffle: {len(view)} bytes is not a whole number of {elem_size}-byte elements")
    if block_bytes == 0:
        block = default_block_elements(elem_size)
    elif block_bytes < 0 or block_bytes % (8 * elem_size):
        raise ValueError(
            f"block_bytes {block_bytes} must be 0 (default) or a positive multiple of 8 elements "
            f"of {elem_size} bytes"
        )
    else:
        block = block_bytes // elem_size
    elements = np.frombuffer(view, dtype=f"u{elem_size}")
    body = bitshuffle.compress_lz4(elements, block)
    return _BSHUF_HEADER.pack(len(view), block * elem_size) + body.tobytes()


def bitshuffle_lz4_decompress(blob: bytes | memoryview, nbytes: int, elem_size: int) -> np.ndarray:
    """Undo :func:`bitshuffle_lz4_compress`; returns ``nbytes`` as a uint8 array.

    The block structure is walked and checked before the C decoder runs, so a
    corrupt size field can never make it read past the blob.
    """
    view = memoryview(blob).cast("B")
    if len(view) < _BSHUF_HEADER.size:
        raise EigerProtocolError(
            "decode_errors", f"bitshuffle-lz4 blob of {len(view)} bytes is shorter than its 12-byte header"
        )
    total, block_bytes = _BSHUF_HEADER.unpack_from(view, 0)
    if total != nbytes:
        raise EigerProtocolError(
            "size_mismatch", f"bitshuffle-lz4 header says {total} bytes, the image needs {nbytes}"
        )
    if nbytes % elem_size:
        raise EigerProtocolError(
            "decode_errors", f"{nbytes} bytes is not a whole number of {elem_size}-byte elements"
        )
    block = block_bytes // elem_size
    if block <= 0 or block_bytes % elem_size or block % 8:
        raise EigerProtocolError(
            "decode_errors",
            f"bitshuffle-lz4 block size {block_bytes} bytes is not a positive multiple of 8 elements",
        )
    count = nbytes // elem_size
    full, rest = divmod(count, block)
    blocks = full + (1 if rest - rest % 8 else 0)
    pos = _BSHUF_HEADER.size
    end = len(view)
    unpack = _BLOCK_SIZE.unpack_from
    for index in range(blocks):
        if pos + 4 > end:
            raise EigerProtocolError(
                "decode_errors", f"bitshuffle-lz4 blob ends inside block {index} of {blocks}"
            )
        pos += 4 + unpack(view, pos)[0]
    pos += (count % 8) * elem_size
    if pos != end:
        raise EigerProtocolError(
            "decode_errors", f"bitshuffle-lz4 blocks add up to {pos} bytes, the blob has {end}"
        )
    if count == 0:
        return np.zeros(0, np.uint8)
    body = np.frombuffer(view, dtype=np.uint8, offset=_BSHUF_HEADER.size)
    try:
        out = bitshuffle.decompress_lz4(body, (count,), np.dtype(f"u{elem_size}"), block)
    except (RuntimeError, ValueError) as exc:
        raise EigerProtocolError("decode_errors", f"bitshuffle-lz4 decompression failed ({exc})") from exc
    return out.view(np.uint8)


def decode_blob(
    blob: bytes | memoryview, shape_xy: Sequence[int], type_name: str, encoding: str
) -> np.ndarray:
    """Decode an image blob into a ``(y, x)`` array (read-only when raw, zero-copy)."""
    compression, elem_size, order = parse_encoding(encoding)
    dtype = pixel_dtype(type_name, order)
    x, y = shape_xy
    nbytes = x * y * dtype.itemsize
    view = memoryview(blob).cast("B")
    if compression == "":
        if len(view) != nbytes:
            raise EigerProtocolError(
                "size_mismatch", f"raw blob of {len(view)} bytes, a {x}x{y} {type_name} image needs {nbytes}"
            )
        data = np.frombuffer(view, dtype=dtype)
    elif compression == "lz4":
        try:
            raw = lz4.block.decompress(view, uncompressed_size=nbytes, return_bytearray=True)
        except lz4.block.LZ4BlockError as exc:
            raise EigerProtocolError("decode_errors", f"lz4 decompression failed ({exc})") from exc
        if len(raw) != nbytes:
            raise EigerProtocolError(
                "size_mismatch", f"lz4 blob decompressed to {len(raw)} bytes, the image needs {nbytes}"
            )
        data = np.frombuffer(raw, dtype=dtype)
    else:
        data = bitshuffle_lz4_decompress(view, nbytes, elem_size).view(dtype)
    return data.reshape(y, x)


def encode_blob(array: np.ndarray, encoding: str, block_bytes: int = 0) -> bytes:
    """Encode a ``(y, x)`` array as the DCU does (the inverse of :func:`decode_blob`)."""
    compression, elem_size, order = parse_encoding(encoding)
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"an Eiger image is 2-D (y, x), got shape {array.shape}")
    raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder(order)).tobytes()
    if compression == "":
        return raw
    if compression == "lz4":
        return lz4.block.compress(raw, store_size=False)
    return bitshuffle_lz4_compress(raw, elem_size, block_bytes)


# --------------------------------------------------------------------------- messages


@dataclass
class SeriesHeader:
    """A parsed series header; ``problems`` lists the parts that were unusable."""

    series: int
    detail: str
    config: dict[str, Any] = field(default_factory=dict)
    flatfield: np.ndarray | None = None
    pixel_mask: np.ndarray | None = None
    countrate_table: np.ndarray | None = None
    appendix: Any = None
    problems: list[EigerProtocolError] = field(default_factory=list)

    @property
    def frames_expected(self) -> int | None:
        """nimages x ntrigger from the configuration (None when not announced)."""
        nimages = self.config.get("nimages")
        ntrigger = self.config.get("ntrigger", 1)
        if _is_int(nimages) and _is_int(ntrigger) and nimages >= 0 and ntrigger >= 0:
            return nimages * ntrigger
        return None

    @property
    def image_shape(self) -> tuple[int, int] | None:
        """(y, x) announced by the configuration, if any."""
        x = self.config.get("x_pixels_in_detector")
        y = self.config.get("y_pixels_in_detector")
        if _is_int(x) and _is_int(y) and x > 0 and y > 0:
            return (y, x)
        return None


@dataclass
class EigerImage:
    """A parsed and decoded image; ``problems`` lists non-fatal faults (dconfig, extra parts)."""

    series: int
    frame: int
    hash: str
    data: np.ndarray
    encoding: str
    config: dict[str, Any] = field(default_factory=dict)
    appendix: Any = None
    problems: list[EigerProtocolError] = field(default_factory=list)


@dataclass
class SeriesEnd:
    series: int | None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def part_bytes(part: Any) -> memoryview:
    """A received part (zmq.Frame, bytes, memoryview) as a byte view, without copying."""
    if isinstance(part, zmq.Frame):
        return part.buffer
    return memoryview(part).cast("B")


def load_json_part(part: Any, what: str, **where: Any) -> dict[str, Any]:
    """Parse one JSON-object part; only JSON, never anything else."""
    view = part_bytes(part)
    if len(view) > MAX_JSON_BYTES:
        raise EigerProtocolError(
            "bad_json", f"{what} is {len(view)} bytes, more than a JSON part may be", **where
        )
    try:
        value = json.loads(bytes(view))
    except (UnicodeDecodeError, ValueError) as exc:
        raise EigerProtocolError("bad_json", f"{what} is not valid JSON ({exc})", **where) from exc
    if not isinstance(value, dict):
        raise EigerProtocolError(
            "bad_json", f"{what} is JSON {type(value).__name__}, expected an object", **where
        )
    return value


def _appendix(part: Any) -> Any:
    """The appendix as JSON when it is JSON, else as text (it is free user data)."""
    raw = bytes(part_bytes(part))
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", errors="replace")


def _shape_xy(value: Any, what: str, **where: Any) -> tuple[int, int]:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(_is_int(n) and n > 0 for n in value)
        or value[0] * value[1] > MAX_ELEMENTS
    ):
        raise EigerProtocolError(
            "bad_parts", f"{what} shape {value!r} is not [x, y] of positive sizes", **where
        )
    return value[0], value[1]


def message_htype(parts: Sequence[Any]) -> tuple[str, dict[str, Any]]:
    """The htype and first part of a message (raises on an unusable first part)."""
    if not parts:
        raise EigerProtocolError("bad_parts", "empty message")
    first = load_json_part(parts[0], "part 1")
    htype = first.get("htype")
    if not isinstance(htype, str):
        raise EigerProtocolError("bad_parts", f"part 1 has no 'htype' string: {_clip(first)}")
    return htype, first


def _clip(value: Any, limit: int = 200) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


def parse_header(parts: Sequence[Any], first: dict[str, Any] | None = None) -> SeriesHeader:
    """Parse a series header at any detail level.

    Raises only when part 1 is unusable; broken later parts (configuration,
    tables, a missing or extra part) become ``problems`` and the series still starts.
    """
    if first is None:
        _, first = message_htype(parts)
    if first.get("htype") != HEADER:
        raise EigerProtocolError("bad_parts", f"expected htype {HEADER!r}, got {first.get('htype')!r}")
    series = first.get("series")
    if not _is_int(series):
        raise EigerProtocolError("bad_parts", f"series header has no integer 'series': {_clip(first)}")
    detail = first.get("header_detail")
    header = SeriesHeader(series=series, detail=detail if detail in DETAIL_LEVELS else "none")
    problems = header.problems
    if detail not in DETAIL_LEVELS:
        problems.append(
            EigerProtocolError(
                "bad_parts", f"header_detail {detail!r} is not one of {DETAIL_LEVELS}", series=series
            )
        )
        return header
    expected = HEADER_PARTS[detail]
    if len(parts) < expected:
        problems.append(
            EigerProtocolError(
                "bad_parts",
                f"header_detail {detail!r} needs {expected} parts, got {len(parts)} (a part is missing)",
                series=series,
            )
        )
    elif len(parts) > expected + 1:
        problems.append(
            EigerProtocolError(
                "bad_parts",
                f"header_detail {detail!r} has {expected} parts and an optional appendix, got {len(parts)}",
                series=series,
            )
        )
    if detail in ("basic", "all") and len(parts) > 1:
        try:
            header.config = load_json_part(parts[1], "the detector configuration (part 2)", series=series)
        except EigerProtocolError as exc:
            problems.append(exc)
    if detail == "all":
        for index, (htype, name) in enumerate(DETAIL_TABLES):
            at = 2 + 2 * index
            if len(parts) < at + 2:
                break
            try:
                setattr(header, name, _parse_table(parts[at], parts[at + 1], htype, at, series))
            except EigerProtocolError as exc:
                problems.append(exc)
    if len(parts) == expected + 1:
        header.appendix = _appendix(parts[expected])
    return header


def _parse_table(desc_part: Any, blob_part: Any, htype: str, at: int, series: int) -> np.ndarray:
    """One (descriptor, raw blob) pair of a header_detail "all" header, as a (y, x) copy."""
    desc = load_json_part(desc_part, f"the {htype} descriptor (part {at + 1})", series=series)
    if desc.get("htype") != htype:
        raise EigerProtocolError(
            "bad_parts", f"part {at + 1} should be {htype!r}, got htype {desc.get('htype')!r}", series=series
        )
    x, y = _shape_xy(desc.get("shape"), htype, series=series)
    type_name = desc.get("type")
    try:
        dtype = pixel_dtype(type_name)
    except EigerProtocolError as exc:
        raise EigerProtocolError(exc.reason, f"{htype}: {exc.detail}", series=series) from exc
    blob = part_bytes(blob_part)
    if len(blob) != x * y * dtype.itemsize:
        raise EigerProtocolError(
            "size_mismatch",
            f"{htype} blob (part {at + 2}) has {len(blob)} bytes, [{x}, {y}] {type_name} needs "
            f"{x * y * dtype.itemsize}",
            series=series,
        )
    return np.frombuffer(blob, dtype=dtype).reshape(y, x).astype(dtype.newbyteorder("="))


def _looks_like_dconfig(part: Any) -> bool:
    view = part_bytes(part)
    if len(view) > MAX_JSON_BYTES:
        return False
    try:
        value = json.loads(bytes(view))
    except ValueError:
        return False
    return isinstance(value, dict) and value.get("htype") == IMAGE_CONFIG


def parse_image(
    parts: Sequence[Any], first: dict[str, Any] | None = None, *, verify_hash: bool = False
) -> EigerImage:
    """Parse and decode an image message.

    Raises when the pixels are unusable (or, with ``verify_hash``, their md5
    differs from ``hash``); a broken dconfig part or extra parts become
    ``problems`` of the image.
    """
    if first is None:
        _, first = message_htype(parts)
    if first.get("htype") != IMAGE:
        raise EigerProtocolError("bad_parts", f"expected htype {IMAGE!r}, got {first.get('htype')!r}")
    series, frame = first.get("series"), first.get("frame")
    where = {"series": series if _is_int(series) else None, "frame": frame if _is_int(frame) else None}
    if not _is_int(series) or not _is_int(frame) or frame < 0:
        raise EigerProtocolError(
            "bad_parts", f"image part 1 needs integer 'series' and 'frame': {_clip(first)}", **where
        )
    digest = first.get("hash", "")
    if not isinstance(digest, str):
        digest = str(digest)
    if len(parts) < 3:
        raise EigerProtocolError(
            "bad_parts", f"image has {len(parts)} parts, needs at least 3 (a part is missing)", **where
        )
    desc = load_json_part(parts[1], "the dimage_d descriptor (part 2)", **where)
    if desc.get("htype") != IMAGE_DATA:
        raise EigerProtocolError(
            "bad_parts", f"part 2 should be {IMAGE_DATA!r}, got htype {desc.get('htype')!r}", **where
        )
    x, y = _shape_xy(desc.get("shape"), IMAGE_DATA, **where)
    size = desc.get("size")
    if not _is_int(size) or size < 0:
        raise EigerProtocolError("bad_parts", f"{IMAGE_DATA} 'size' {size!r} is not a byte count", **where)
    encoding = desc.get("encoding")
    blob = part_bytes(parts[2])
    if len(blob) != size:
        if _looks_like_dconfig(parts[2]):
            raise EigerProtocolError("bad_parts", "the data blob part (part 3) is missing", **where)
        raise EigerProtocolError(
            "size_mismatch", f"blob of {len(blob)} bytes, {IMAGE_DATA} announced {size}", **where
        )
    if verify_hash and digest and hashlib.md5(blob).hexdigest() != digest:
        raise EigerProtocolError("hash_mismatch", f"md5 of the blob differs from hash {digest!r}", **where)
    try:
        data = decode_blob(blob, (x, y), desc.get("type"), encoding)
    except EigerProtocolError as exc:
        raise EigerProtocolError(exc.reason, f"{encoding!r} blob: {exc.detail}", **where) from exc
    image = EigerImage(series=series, frame=frame, hash=digest, data=data, encoding=encoding)
    if len(parts) < 4:
        image.problems.append(
            EigerProtocolError("bad_parts", "the dconfig part (part 4) is missing", **where)
        )
    else:
        try:
            config = load_json_part(parts[3], "the dconfig part (part 4)", **where)
            if config.get("htype") != IMAGE_CONFIG:
                raise EigerProtocolError(
                    "bad_config",
                    f"part 4 should be {IMAGE_CONFIG!r}, got htype {config.get('htype')!r}",
                    **where,
                )
            image.config = config
        except EigerProtocolError as exc:
            image.problems.append(EigerProtocolError("bad_config", exc.detail, **where))
    if len(parts) == 5:
        image.appendix = _appendix(parts[4])
    elif len(parts) > 5:
        image.problems.append(
            EigerProtocolError("bad_parts", f"image has {len(parts)} parts, at most 5 expected", **where)
        )
    return image


def parse_end(first: dict[str, Any]) -> SeriesEnd:
    series = first.get("series")
    return SeriesEnd(series=series if _is_int(series) else None)


# --------------------------------------------------------------------------- the source

#: every counter in :meth:`EigerStreamSource.stats`, zero from the start
COUNTERS = (
    "messages",
    "bytes",
    "series",
    "frames",
    "bad_json",
    "bad_parts",
    "size_mismatch",
    "decode_errors",
    "unknown_encoding",
    "bad_config",
    "hash_mismatch",
    "wrong_series",
    "duplicate_frames",
    "shape_mismatch",
    "extra_frames",
    "missing_frames",
    "images_without_header",
    "stray_messages",
    "missing_series_end",
    "timeouts",
)

#: describe() keys copied from the detector configuration when present
_DESCRIBED = (
    "description",
    "detector_number",
    "beam_center_x",
    "beam_center_y",
    "count_time",
    "frame_time",
    "nimages",
    "ntrigger",
    "trigger_mode",
    "wavelength",
    "photon_energy",
    "threshold_energy",
    "detector_distance",
    "x_pixel_size",
    "y_pixel_size",
    "x_pixels_in_detector",
    "y_pixels_in_detector",
    "bit_depth_image",
    "sensor_material",
    "sensor_thickness",
    "compression",
    "software_version",
    "eiger_fw_version",
    "data_collection_date",
    "countrate_correction_applied",
    "flatfield_correction_applied",
    "pixel_mask_applied",
)

_POLL_MS = 100
#: a larger jump in frame numbers is a corrupt number, not lost frames
MAX_GAP = 1_000_000


class EigerStreamSource:
    """Frames from an Eiger DCU's stream v1 (the master must be its only consumer).

    The series end ends the master's scan (``ends_scans``).

    ``frames(scan)`` waits for a series header (up to ``timeout_s``, then
    :class:`SourceError`; None waits until :meth:`stop`), yields each good image
    as ``(array (y, x), meta)`` and returns at the series end, at :meth:`stop`,
    when another series header arrives (the end was lost), or after
    ``idle_timeout_s`` of silence within the series (None: no limit; external
    triggers may be far apart). ``scan`` is not consulted: the series header
    says how many frames come, and the detector decides when. Faulty input is counted by reason in
    :meth:`stats` and described in :attr:`last_error`, never raised. Gaps in the
    frame numbers are ``missing_frames``; their numbers are in
    :attr:`missing_frame_numbers`, those of frames that arrived unusable in
    :attr:`bad_frame_numbers` (both for the current or last series).

    ``accept_headerless`` takes images that arrive before any series header as
    a series of their own (off by default: those are usually the leftovers of
    a stopped series). ``check_shape`` drops images whose size differs from
    the header's pixel counts. ``verify_hash`` checks each image's ``hash``
    as the md5 of its blob. The arrays of raw-encoded images are read-only views
    of the received buffer.
    """

    ends_scans = True

    def __init__(
        self,
        endpoint: str = "tcp://127.0.0.1:9999",
        timeout_s: float | None = 10.0,
        *,
        idle_timeout_s: float | None = None,
        rcvhwm: int = 100,
        accept_headerless: bool = False,
        check_shape: bool = True,
        verify_hash: bool = False,
    ):
        if not isinstance(endpoint, str) or "://" not in endpoint:
            raise ValueError(f"eiger endpoint must be a ZMQ address like 'tcp://dcu:9999', got {endpoint!r}")
        for name, value in (("timeout_s", timeout_s), ("idle_timeout_s", idle_timeout_s)):
            if value is not None and (not isinstance(value, int | float) or not value > 0):
                raise ValueError(f"eiger {name} must be a positive number of seconds or None, got {value!r}")
        if not _is_int(rcvhwm) or rcvhwm < 1:
            raise ValueError(f"eiger rcvhwm must be a positive number of messages, got {rcvhwm!r}")
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.rcvhwm = rcvhwm
        self.accept_headerless = bool(accept_headerless)
        self.check_shape = bool(check_shape)
        self.verify_hash = bool(verify_hash)
        self.last_error: str | None = None
        self.header: SeriesHeader | None = None
        self._dtype: str | None = None
        self._image_shape: tuple[int, int] | None = None
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._missing: set[int] = set()
        self._bad: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._socket: zmq.Socket | None = None
        self._pending: SeriesHeader | None = None

    # ---- what the master and the devices read

    def stats(self) -> dict[str, int]:
        """Counters since construction, by reason (all keys always present)."""
        with self._lock:
            return dict(self._counts)

    @property
    def missing_frame_numbers(self) -> list[int]:
        """Frame numbers never received in the current or last series."""
        with self._lock:
            return sorted(self._missing)

    @property
    def bad_frame_numbers(self) -> list[int]:
        """Frame numbers received but unusable in the current or last series."""
        with self._lock:
            return sorted(self._bad)

    @property
    def pixel_mask(self) -> np.ndarray | None:
        """The detector's pixel mask (y, x) from the last header_detail "all" header."""
        return self.header.pixel_mask if self.header else None

    @property
    def flatfield(self) -> np.ndarray | None:
        return self.header.flatfield if self.header else None

    @property
    def countrate_table(self) -> np.ndarray | None:
        return self.header.countrate_table if self.header else None

    def describe(self) -> dict[str, Any]:
        """The detector configuration of the last series header (and the endpoint)."""
        info: dict[str, Any] = {"detector": "eiger", "endpoint": self.endpoint}
        header = self.header
        if header is None:
            return info
        info["series"] = header.series
        info["header_detail"] = header.detail
        for key in _DESCRIBED:
            if key in header.config:
                info[key] = header.config[key]
        if header.frames_expected is not None:
            info["frames_expected"] = header.frames_expected
        shape = self._image_shape or header.image_shape
        if shape is not None:
            info["shape"] = list(shape)
        dtype = self._dtype or _dtype_from_bits(header.config.get("bit_depth_image"))
        if dtype is not None:
            info["dtype"] = dtype
        size = header.config.get("x_pixel_size")
        if isinstance(size, int | float) and not isinstance(size, bool):
            info["pixel_size_um"] = size * 1e6
        for _, name in DETAIL_TABLES:
            table = getattr(header, name)
            if table is not None:
                info[f"{name}_shape"] = list(table.shape)
        if header.appendix is not None:
            info["appendix"] = header.appendix
        info["config"] = dict(header.config)
        return info

    # ---- control

    def connect(self) -> None:
        """Connect now (else the first :meth:`frames` does); messages queue from then on."""
        if self._socket is None:
            sock = zmq.Context.instance().socket(zmq.PULL)
            sock.setsockopt(zmq.RCVHWM, self.rcvhwm)
            sock.setsockopt(zmq.LINGER, 0)
            try:
                sock.connect(self.endpoint)
            except zmq.ZMQError as exc:
                sock.close(0)
                raise SourceError(f"eiger endpoint {self.endpoint!r} cannot be connected: {exc}") from exc
            self._socket = sock

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        """Stop a running :meth:`frames` and release the socket."""
        self._stop.set()
        self._idle.wait(2.0)
        if self._socket is not None:
            self._socket.close(0)
            self._socket = None

    def __enter__(self) -> EigerStreamSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the stream

    def frames(self, scan: Mapping[str, Any]) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
        self._stop.clear()
        self._idle.clear()
        try:
            self.connect()
            header, first_image = self._wait_for_header()
            if header is None:
                return
            self._start_series(header)
            yield from self._series(header, first_image)
        finally:
            self._idle.set()

    def _receive(self, timeout_s: float | None) -> list[zmq.Frame] | str:
        """The next message, or "stopped" / "timeout"."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        sock = self._socket
        assert sock is not None
        while True:
            if self._stop.is_set():
                return "stopped"
            wait_ms = _POLL_MS
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return "timeout"
                wait_ms = max(1, min(_POLL_MS, int(left * 1000)))
            if sock.poll(wait_ms, zmq.POLLIN):
                parts = sock.recv_multipart(copy=False)
                with self._lock:
                    self._counts["messages"] += 1
                    self._counts["bytes"] += sum(len(p) for p in parts)
                return parts

    def _count(self, reason: str, text: str, n: int = 1) -> None:
        with self._lock:
            self._counts[reason] += n
            seen = self._counts[reason]
        self.last_error = text
        if seen == n or seen % 1000 < n:
            log.warning("eiger %s (%d so far): %s", reason, seen, text)
        else:
            log.debug("eiger %s: %s", reason, text)

    def _fault(self, exc: EigerProtocolError) -> None:
        self._count(exc.reason, f"{exc.where()}{exc.detail}")

    def _wait_for_header(self) -> tuple[SeriesHeader | None, EigerImage | None]:
        """Skip to the next series header; (None, None) when stopped."""
        if self._pending is not None:
            header, self._pending = self._pending, None
            return header, None
        while True:
            parts = self._receive(self.timeout_s)
            if parts == "stopped":
                return None, None
            if parts == "timeout":
                self.last_error = f"no series header from {self.endpoint} within {self.timeout_s} s"
                raise SourceError(
                    f"eiger: no series header from {self.endpoint} within {self.timeout_s} s; is the detector "
                    "armed, its stream interface enabled and this the only consumer?"
                )
            try:
                htype, first = message_htype(parts)
                if htype == HEADER:
                    return parse_header(parts, first), None
                if htype == IMAGE:
                    if not self.accept_headerless:
                        self._count(
                            "images_without_header",
                            f"frame {first.get('frame')!r} of series {first.get('series')!r} arrived before "
                            "any series header (left from a stopped series?); dropped",
                        )
                        continue
                    image = parse_image(parts, first, verify_hash=self.verify_hash)
                    self._count(
                        "images_without_header",
                        f"series {image.series} started without a header; its images are taken as they come",
                    )
                    return SeriesHeader(series=image.series, detail="none"), image
                self._count("stray_messages", f"{htype!r} message while waiting for a series header; ignored")
            except EigerProtocolError as exc:
                self._fault(exc)

    def _start_series(self, header: SeriesHeader) -> None:
        self.header = header
        self._dtype = None
        self._image_shape = None
        with self._lock:
            self._counts["series"] += 1
            self._missing.clear()
            self._bad.clear()
        for problem in header.problems:
            self._fault(problem)
        log.info(
            "eiger series %d started (header_detail %s, %s frames announced)",
            header.series,
            header.detail,
            header.frames_expected,
        )

    def _series(
        self, header: SeriesHeader, first_image: EigerImage | None
    ) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
        series = header.series
        expected = header.frames_expected
        shape = header.image_shape if self.check_shape else None
        next_frame = 0
        pending = first_image
        while True:
            if pending is not None:
                image, pending = pending, None
            else:
                parts = self._receive(self.idle_timeout_s)
                if parts == "stopped":
                    return
                if parts == "timeout":
                    self._count(
                        "timeouts",
                        f"series {series}: nothing received for {self.idle_timeout_s} s; series given up",
                    )
                    self._close_series(series, next_frame, expected, ended=False)
                    return
                try:
                    htype, first = message_htype(parts)
                except EigerProtocolError as exc:
                    self._fault(exc)
                    continue
                if htype == SERIES_END:
                    end = parse_end(first)
                    if end.series == series:
                        self._close_series(series, next_frame, expected, ended=True)
                        return
                    self._count(
                        "stray_messages",
                        f"series end of series {end.series!r} during series {series}; ignored",
                    )
                    continue
                if htype == HEADER:
                    try:
                        new = parse_header(parts, first)
                    except EigerProtocolError as exc:
                        self._fault(exc)
                        continue
                    self._count(
                        "missing_series_end",
                        f"series {new.series} began before series {series} ended; series {series} closed",
                    )
                    self._close_series(series, next_frame, expected, ended=False)
                    self._pending = new
                    return
                if htype != IMAGE:
                    self._count("stray_messages", f"series {series}: unknown htype {htype!r}; ignored")
                    continue
                if first.get("series") != series:
                    self._count(
                        "wrong_series",
                        f"frame {first.get('frame')!r} of series {first.get('series')!r} arrived during series "
                        f"{series}; dropped",
                    )
                    continue
                try:
                    image = parse_image(parts, first, verify_hash=self.verify_hash)
                except EigerProtocolError as exc:
                    self._fault(exc)
                    if exc.frame is not None and exc.frame - next_frame <= MAX_GAP:
                        next_frame = self._account(exc.frame, next_frame, bad=True)
                    continue
            frame = image.frame
            if frame - next_frame > MAX_GAP:
                self._count(
                    "bad_parts",
                    f"frame number {frame} of series {series} jumps more than {MAX_GAP} past {next_frame}; dropped",
                )
                continue
            with self._lock:
                duplicate = frame < next_frame and frame not in self._missing
            if duplicate:
                self._count(
                    "duplicate_frames", f"frame {frame} of series {series} arrived twice; the copy is dropped"
                )
                continue
            if shape is not None and image.data.shape != shape:
                self._count(
                    "shape_mismatch",
                    f"frame {frame} of series {series} is {image.data.shape[1]}x{image.data.shape[0]} (x by y), "
                    f"the header announced {shape[1]}x{shape[0]}; dropped",
                )
                next_frame = self._account(frame, next_frame, bad=True)
                continue
            next_frame = self._account(frame, next_frame, bad=False)
            for problem in image.problems:
                self._fault(problem)
            if expected is not None and frame >= expected:
                self._count(
                    "extra_frames",
                    f"frame {frame} of series {series}: the header announced {expected} frames",
                )
            self._dtype = image.data.dtype.name
            self._image_shape = image.data.shape
            with self._lock:
                self._counts["frames"] += 1
            yield image.data, _frame_meta(image)

    def _account(self, frame: int, next_frame: int, *, bad: bool) -> int:
        """Record that ``frame`` arrived (usable or not); returns the next expected number."""
        with self._lock:
            if bad:
                self._bad.add(frame)
            if frame in self._missing:
                self._missing.discard(frame)
                self._counts["missing_frames"] -= 1
                return next_frame
            if frame < next_frame:
                return next_frame
            gap = frame - next_frame
            if gap:
                self._missing.update(range(next_frame, frame))
        if gap:
            self._count(
                "missing_frames",
                f"series {self.header.series if self.header else '?'}: {_span(next_frame, frame)} never arrived",
                gap,
            )
        return frame + 1

    def _close_series(self, series: int, next_frame: int, expected: int | None, *, ended: bool) -> None:
        if expected is not None and next_frame < expected:
            with self._lock:
                self._missing.update(range(next_frame, expected))
            how = "ended" if ended else "was cut off"
            self._count(
                "missing_frames",
                f"series {series} {how} after {next_frame} frames, the header announced {expected}: "
                f"{_span(next_frame, expected)} never arrived",
                expected - next_frame,
            )
        log.info("eiger series %d %s", series, "ended" if ended else "closed without its end")


def _span(start: int, stop: int) -> str:
    return f"frame {start}" if stop - start == 1 else f"frames {start}..{stop - 1}"


def _dtype_from_bits(bits: Any) -> str | None:
    return {8: "uint8", 16: "uint16", 32: "uint32"}.get(bits) if _is_int(bits) else None


def _frame_meta(image: EigerImage) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "series": image.series,
        "frame": image.frame,
        "hash": image.hash,
        "encoding": image.encoding,
    }
    for key in ("start_time", "stop_time", "real_time"):
        value = image.config.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            meta[key] = value
    real = meta.get("real_time")
    if real is not None:
        meta["exposure_time"] = real * 1e-9
    if image.appendix is not None:
        meta["appendix"] = image.appendix
    return meta
