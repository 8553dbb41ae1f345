"""LavueBridge: the Tango face of :class:`lavue_bridge.bridge.LavueBridgeEngine`.

A bridge attaches to one sorter (property ``Upstream``) as a consumer and
publishes that group's image-like results on Lavue's ZMQ stream, latest only.
It is never attached to the master: taking frames there would hold them away
from the workers. Raw frames are shown by a worker group whose step is
``passthrough`` (or ``binning``) and a bridge on that group's sorter, see
``config/lavue_raw.yaml``.
"""

from __future__ import annotations

from typing import Any

import tango
from tango import AttrWriteType, DevState
from tango.server import attribute, device_property, run

from lavue_bridge.bridge import LavueBridgeEngine
from pipelines.engine import Engine

from .base import PipelineDevice, UpstreamError, counter, rate

#: The class of device a bridge can take results from.
SORTER_CLASS = "PipelineSorter"


class LavueBridge(PipelineDevice):
    """Publishes a worker group's image-like results (and live maps) for Lavue."""

    Upstream = device_property(
        dtype=str,
        default_value="",
        doc="the sorter device whose ordered results are shown (for raw frames: the sorter of a "
        "passthrough group)",
    )
    Port = device_property(dtype=int, default_value=0, doc="TCP port Lavue connects to (0: any free port)")
    MaxRateHz = device_property(
        dtype=float,
        default_value=10.0,
        doc="images per second and topic at first start; PublishRateHz (memorized) wins afterwards",
    )
    Topics = device_property(
        dtype=(str,),
        default_value=[],
        doc="results to publish, RESULT or GROUP.RESULT (map.NAME for live maps); empty: every image-like result",
    )

    Published = counter("Published", "images", "images sent to Lavue")
    Skipped = counter(
        "Skipped", "images", "images replaced by a newer one before they were sent (latest only)"
    )
    PublishedRateHz = rate("PublishedRateHz", "Hz", "images sent per second, all topics")

    engine: LavueBridgeEngine

    def create_engine(self) -> Engine:
        self._checked_upstream = ""  # whose class was found to be a sorter (Init may change Upstream)
        return LavueBridgeEngine(
            name=self.get_name(),
            bind=self.BindAddress,
            port=self.Port,
            max_rate_hz=self.MaxRateHz,
            topics=list(self.Topics or []),
        )

    def delete_device(self) -> None:
        engine = self.engine
        super().delete_device()
        if engine is not None:
            engine.publisher.close()  # also when the loop never ran

    # -- upstream: a sorter, nothing else ------------------------------------------------
    def upstreams(self) -> list[tuple[str, str, str]]:
        return [("Upstream", self.Upstream, "DataEndpoint")]

    def connect_upstream(self, endpoints: list[str]) -> None:
        self.engine.connect(endpoints[0])

    def resolve_endpoint(self, prop: str, device: str, attr: str) -> str:
        endpoint = PipelineDevice.resolve_endpoint(prop, device, attr)
        if self._checked_upstream != device:
            try:
                cls = tango.Database().get_class_for_device(device)
            except tango.DevFailed as exc:
                reason = exc.args[0].desc.strip() if exc.args else str(exc)
                raise UpstreamError(
                    DevState.UNKNOWN, f"cannot look up the class of '{device}': {reason}"
                ) from None
            if cls != SORTER_CLASS:
                hint = (
                    "raw frames are never taken from the master (it would hold them from the workers): add a "
                    "worker group with the passthrough step and attach to its sorter (config/lavue_raw.yaml)"
                    if cls == "PipelineMaster"
                    else "attach to a worker group's sorter"
                )
                raise UpstreamError(
                    DevState.FAULT,
                    f"Upstream '{device}' is a {cls}, not a {SORTER_CLASS}: {hint}. Fix it in Jive",
                )
            self._checked_upstream = device  # a sorter: no need to ask again
        return endpoint

    # -- events --------------------------------------------------------------------------
    def extra_event_value(self, name: str) -> Any:
        if name == "Topics":  # declared as TopicsNow: the property Topics has the name
            return self._read_topics()
        return None

    # -- attributes ----------------------------------------------------------------------
    @attribute(
        dtype=float,
        access=AttrWriteType.READ_WRITE,
        memorized=True,
        hw_memorized=True,
        unit="Hz",
        format="%.1f",
        min_value=0.01,
        max_value=1000,
        doc="images per second and topic at most (Lavue polls at 10 Hz and never skips ahead)",
    )
    def PublishRateHz(self) -> float:
        return self.engine.max_rate_hz if self.engine is not None else 0.0

    @PublishRateHz.write
    def PublishRateHz(self, value: float) -> None:
        if self.engine is None:
            raise RuntimeError(f"cannot set the rate: {self.dev_status()}")
        self.engine.set_max_rate(value)

    def _read_topics(self) -> list[str]:
        return list(self.engine.topics) if self.engine is not None else []

    # the property of the same name says what may be published; this says what is
    TopicsNow = attribute(
        name="Topics", dtype=(str,), max_dim_x=1024, fget=_read_topics,
        doc="topics published now (lavue -s zmq -c ADDRESS/TOPIC)",
    )  # fmt: skip

    @attribute(dtype=str, doc="where Lavue connects: host:port (lavue -s zmq -c HOST:PORT/TOPIC)")
    def Address(self) -> str:
        return self.engine.address if self.engine is not None else ""


def main(args: list[str] | None = None) -> None:
    run((LavueBridge,), args=args)


if __name__ == "__main__":
    main()
