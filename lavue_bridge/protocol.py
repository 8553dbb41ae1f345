"""Lavue's ZMQ stream: the only module that knows its message layout.

Lavue (``lavuelib.imageSource.ZMQSource``) connects a SUB socket to a PUB socket
we bind, subscribes to one topic (matched exactly) and to ``datasources``, and
reads two kinds of multipart message:

- an image: ``[topic, raw_bytes, json_header, b"JSON"]``. The header carries
  ``shape`` and ``dtype`` (a numpy dtype string, the only source of the byte
  order), ``name`` and any further keys, which Lavue hands on as the frame's
  metadata (``axisscales``, ``axislabels``, ``channellabels``, ``wavelength``,
  ``detector_distance``, ``beam_center_x``/``_y``, ``pixel_size``...). The
  trailing ``b"JSON"`` stops Lavue from trying to unpickle the header first.
- the list of topics on offer: ``[b"datasources", {"datasources": [...]}, b"JSON"]``;
  Lavue fills its topic box from it when automatic topics are on.

Lavue redraws only when a frame's name or metadata changed, so every frame
needs a name of its own. Raw bytes must be C-contiguous and uncompressed.

Orientation (see :func:`lavue_layout`): Lavue draws axis 0 of ZMQ data as x
(horizontal), unlike its other sources, which transpose what they read. A
detector image is (rows, cols) with rows running down the sensor, so we send
its transpose (cols, rows): it then shows upright, exactly as the same image
read from a Tango attribute or a file. Stacks are channel-first: (C, rows, cols)
is sent as (C, cols, rows).

Axis metadata follows Lavue's convention, x first: ``axisscales`` is
``[x0, y0, x_step, y_step]`` and ``axislabels`` ``[x_text, y_text, x_units,
y_units]``, where x runs along the columns of the (rows, cols) image and y along
its rows. Callers pass them that way; :func:`axisscales_for_image` and
:func:`axislabels_for_image` build them from the image's own (row, col) terms.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

#: Topic Lavue subscribes to besides its own; it carries the list of topics.
DATASOURCES_TOPIC = "datasources"
#: Last part of every message: tells Lavue the header is JSON (not pickle).
JSON_MARKER = b"JSON"
#: Header keys the protocol fills in itself; callers may not set them in ``meta``.
RESERVED_KEYS = frozenset({"shape", "dtype", "name"})
#: Numpy dtype kinds Lavue can draw: bool (sent as uint8), ints, unsigned ints, floats.
NUMERIC_KINDS = frozenset("biuf")
#: Characters a topic may not hold: Lavue splits its "host:port/topic" string on them.
_TOPIC_FORBIDDEN = frozenset("/:")


def check_topic(topic: Any) -> bytes:
    """Return ``topic`` as bytes, or raise if Lavue could not subscribe to it.

    Lavue matches topics exactly and reads them from a "host:port/topic" string,
    so a topic is a non-empty printable ASCII string without "/" or ":", and not
    the reserved ``datasources``.
    """
    if not isinstance(topic, str):
        raise TypeError(f"topic must be a str, got {type(topic).__name__} {topic!r}")
    if not topic:
        raise ValueError("topic must not be empty")
    if not (topic.isascii() and topic.isprintable()) or _TOPIC_FORBIDDEN.intersection(topic):
        raise ValueError(f"topic {topic!r} must be printable ASCII without '/' or ':'")
    if topic == DATASOURCES_TOPIC:
        raise ValueError(f"topic {topic!r} is reserved for Lavue's list of topics")
    return topic.encode("ascii")


def check_image(image: Any) -> None:
    """Raise unless ``image`` is a non-empty 2D or 3D numeric array Lavue can show."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy.ndarray, got {type(image).__name__}")
    if image.ndim not in (2, 3):
        raise ValueError(
            f"image has shape {image.shape}: expected (rows, cols) or channel-first (C, rows, cols)"
        )
    if image.size == 0:
        # Lavue reads an empty array as "no image" and drops the frame.
        raise ValueError(f"image has shape {image.shape}: expected no empty axis")
    if image.dtype.kind not in NUMERIC_KINDS:
        raise ValueError(f"image dtype {image.dtype} is not supported: expected bool, int, uint or float")


def lavue_layout(image: np.ndarray) -> np.ndarray:
    """Return ``image`` laid out as Lavue draws ZMQ data upright: the one orientation rule.

    (rows, cols) becomes (cols, rows) and (C, rows, cols) becomes (C, cols, rows),
    always as a new C-contiguous array. bool becomes uint8 (0/1); every other
    dtype, byte order included, is kept.
    """
    check_image(image)
    if image.dtype.kind == "b":
        image = image.view(np.uint8)
    return np.ascontiguousarray(np.swapaxes(image, -1, -2))


def axisscales_for_image(row_values: Sequence[float], col_values: Sequence[float]) -> list[float]:
    """Lavue ``axisscales`` ``[x0, y0, x_step, y_step]`` for a (rows, cols) image.

    ``row_values`` and ``col_values`` are the evenly spaced positions of the rows
    and columns (e.g. motor positions of a map); x runs along the columns. An
    axis with one value gets a step of 1.
    """
    scales = []
    for label, values in (("col_values", col_values), ("row_values", row_values)):
        axis = np.asarray(values, dtype=np.float64)
        if axis.ndim != 1 or axis.size == 0 or not np.all(np.isfinite(axis)):
            raise ValueError(f"{label} must be a non-empty sequence of finite numbers, got {values!r}")
        step = 1.0 if axis.size == 1 else float(axis[1] - axis[0])
        if axis.size > 1 and (
            step == 0.0 or not np.allclose(np.diff(axis), step, rtol=1e-6, atol=1e-12 * abs(step))
        ):
            raise ValueError(f"{label} must be evenly spaced and not constant, got {values!r}")
        scales.append((float(axis[0]), step))
    (x0, x_step), (y0, y_step) = scales
    return [x0, y0, x_step, y_step]


def axislabels_for_image(
    row_label: str, col_label: str, row_units: str = "", col_units: str = ""
) -> list[str]:
    """Lavue ``axislabels`` ``[x_text, y_text, x_units, y_units]`` for a (rows, cols) image."""
    return [col_label, row_label, col_units, row_units]


def _json_safe(value: Any) -> Any:
    """Return ``value`` with numpy types made plain and NaN/inf made null (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def image_header(shape: Sequence[int], dtype: np.dtype, name: str, meta: dict | None = None) -> bytes:
    """The JSON header of one image message; ``meta`` keys go in as they are."""
    header: dict[str, Any] = {}
    if meta:
        if not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
        clash = RESERVED_KEYS.intersection(meta)
        if clash:
            raise ValueError(
                f"meta keys {sorted(clash)} are reserved: the protocol sets shape, dtype and name"
            )
        header.update(_json_safe(meta))
    header["shape"] = [int(n) for n in shape]
    header["dtype"] = np.dtype(dtype).str
    header["name"] = str(name)
    return json.dumps(header, allow_nan=False).encode()


def encode_image(topic: str, image: np.ndarray, name: str, meta: dict | None = None) -> list:
    """The multipart message showing the (rows, cols) or (C, rows, cols) ``image`` upright.

    The image bytes go out as a memoryview of a fresh array (no further copy).
    """
    topic_bytes = check_topic(topic)
    data = lavue_layout(image)
    header = image_header(data.shape, data.dtype, name, meta)
    return [topic_bytes, memoryview(data).cast("B"), header, JSON_MARKER]


def encode_datasources(topics: Sequence[str]) -> list[bytes]:
    """The message that tells Lavue which topics are on offer."""
    names = [check_topic(t).decode("ascii") for t in topics]
    body = json.dumps({DATASOURCES_TOPIC: names}).encode()
    return [DATASOURCES_TOPIC.encode("ascii"), body, JSON_MARKER]
