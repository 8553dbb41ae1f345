"""The Lavue ZMQ stream: its message layout and the publisher that feeds Lavue."""

from lavue_bridge.protocol import (
    DATASOURCES_TOPIC,
    axislabels_for_image,
    axisscales_for_image,
    check_image,
    check_topic,
    encode_datasources,
    encode_image,
    lavue_layout,
)
from lavue_bridge.publisher import LavuePublisher

__all__ = [
    "DATASOURCES_TOPIC",
    "LavuePublisher",
    "axislabels_for_image",
    "axisscales_for_image",
    "check_image",
    "check_topic",
    "encode_datasources",
    "encode_image",
    "lavue_layout",
]
