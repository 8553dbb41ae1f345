"""Frame sources for the master: where frames come from.

A source yields ``(array, meta)`` pairs for one scan from :meth:`FrameSource.frames`;
the master stamps each with (scan, index) and queues it. The same pipeline runs on
any source: the simulated detector, the Eiger stream, a Tango image attribute, files.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import numpy as np

#: source kind -> "module:class"
SOURCES: dict[str, str] = {
    "simulator": "pipelines.sources.simulator:SimulatedDetector",
    "pipeline": "pipelines.sources.chain:PipelineStreamSource",
    "eiger": "pipelines.sources.eiger:EigerStreamSource",
    "tango_image": "pipelines.sources.tango_image:TangoImageSource",
    "stream": "pipelines.sources.stream:FrameStreamSource",
    "files": "pipelines.sources.files:FileSource",
    "simulator_xrd": "pipelines.sources.simulators:SimulatedDiffraction",
    "simulator_mca": "pipelines.sources.simulators:SimulatedMCA",
    "simulator_dpc": "pipelines.sources.simulators:SimulatedDPC",
    "simulator_hits": "pipelines.sources.simulators:SimulatedHits",
    "simulator_tomo": "pipelines.sources.simulators:SimulatedTomography",
}


class SourceError(RuntimeError):
    """The source cannot deliver (misconfigured, unreachable, broken stream)."""


class FrameSource(Protocol):
    """What the master needs from a source."""

    def frames(self, scan: Mapping[str, Any]) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
        """Yield the frames of one scan. ``scan`` is StartScan's metadata (it may
        hold ``frames``, the number expected). Ends when the scan's frames are done
        or :meth:`stop` was called."""
        ...

    def stop(self) -> None:
        """Make a running :meth:`frames` return soon (called from another thread)."""
        ...

    def describe(self) -> dict[str, Any]:
        """Detector settings for the files' metadata (shape, dtype, pixel size...)."""
        ...


def load_source(spec: Mapping[str, Any]) -> FrameSource:
    """Build a source from ``{"kind": name, ...parameters}``."""
    if not isinstance(spec, Mapping) or "kind" not in spec:
        raise SourceError(f"a source needs a 'kind' ({', '.join(sorted(SOURCES))}), got {spec!r}")
    params = dict(spec)
    kind = params.pop("kind")
    target = SOURCES.get(kind)
    if target is None:
        raise SourceError(f"unknown source kind {kind!r}; expected one of {', '.join(sorted(SOURCES))}")
    module_name, _, cls_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    try:
        return cls(**params)
    except TypeError as exc:
        raise SourceError(f"source {kind!r}: {exc}") from exc
