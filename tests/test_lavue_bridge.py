"""The Lavue publisher, checked with Lavue's own ZMQ client (``lavuelib``) on real sockets."""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # lavuelib imports Qt; no display here

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import zmq  # noqa: E402
from lavuelib.imageSource import NXSFileSource, ZMQSource  # noqa: E402

from lavue_bridge import (  # noqa: E402
    LavuePublisher,
    axislabels_for_image,
    axisscales_for_image,
    encode_datasources,
    encode_image,
    lavue_layout,
)

TIMEOUT_S = 10.0  # bound on every wait; only reached when something is broken


class Bridge:
    """Publishers and the clients watching them, closed in the order Lavue needs."""

    def __init__(self):
        self.publishers: list[LavuePublisher] = []
        self.lavues: list[ZMQSource] = []
        self.context = zmq.Context()
        self.subs: list[zmq.Socket] = []

    def publisher(self, **kwargs) -> LavuePublisher:
        pub = LavuePublisher(**kwargs)
        self.publishers.append(pub)
        return pub

    def lavue(self, address: str, topic: str) -> ZMQSource:
        source = ZMQSource()
        source.setConfiguration(f"{address}/{topic}")
        assert source.connect()
        self.lavues.append(source)
        return source

    def sub(self, pub: LavuePublisher, *topics: str) -> zmq.Socket:
        sock = self.context.socket(zmq.SUB)
        for topic in topics:
            sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        sock.connect(f"tcp://127.0.0.1:{pub.port}")
        self.subs.append(sock)
        return sock

    def close(self):
        for pub in self.publishers:
            pub.close()
        for source in self.lavues:
            source.disconnect()
        for sock in self.subs:
            sock.close(linger=0)
        self.context.term()


@pytest.fixture
def bridge():
    b = Bridge()
    yield b
    b.close()


def poll_lavue(source: ZMQSource, want, timeout: float = TIMEOUT_S, offer=None):
    """getData() until ``want(result)`` holds; ``offer()`` is called now and then
    (a SUB socket misses what was sent before it joined)."""
    deadline = time.monotonic() + timeout
    next_offer = 0.0
    while time.monotonic() < deadline:
        if offer is not None and time.monotonic() >= next_offer:
            offer()
            next_offer = time.monotonic() + 0.15
        result = source.getData()
        if result[1] == "__ERROR__":
            raise AssertionError(f"Lavue could not read the message: {result[0]}")
        if result[0] is not None and want(result):
            return result
        if result[0] is None:
            time.sleep(0.01)
    raise AssertionError(f"Lavue's client saw nothing matching within {timeout} s")


def is_image(result) -> bool:
    return isinstance(result[0], np.ndarray)


def receive_image(source, pub, topic, image, meta=None, name=None):
    """Offer ``image`` until Lavue's client returns a frame: (array, name, metadata dict)."""
    img, got_name, meta_json = poll_lavue(source, is_image, offer=lambda: pub.offer(topic, image, meta, name))
    return img, got_name, json.loads(meta_json)


def datasources_of(result) -> list[str] | None:
    """The topic list of a datasources message as Lavue's client returns it, else None."""
    if isinstance(result[0], str) and result[0] == "" and result[2]:
        return json.loads(result[2]).get("datasources")
    return None


def sample_image(dtype: str, rows: int = 5, cols: int = 7) -> np.ndarray:
    rng = np.random.default_rng(7)
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return rng.random((rows, cols)) > 0.5
    if dt.kind in "iu":
        info = np.iinfo(dt)
        image = rng.integers(info.min, info.max, size=(rows, cols), endpoint=True, dtype=dt.newbyteorder("="))
        image[0, 0], image[0, 1] = info.min, info.max
        return image.astype(dt)
    image = (rng.standard_normal((rows, cols)) * 1e3).astype(dt)
    image[0, :4] = [np.inf, -np.inf, np.nan, np.finfo(dt).tiny]
    return image


DTYPES = ["uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float32", "float64"]


@pytest.mark.parametrize("dtype", [*DTYPES, "bool", ">u2", ">i4", ">f8"])
def test_every_dtype_reaches_lavue_exactly(bridge, dtype):
    pub = bridge.publisher()
    lavue = bridge.lavue(f"localhost:{pub.port}", "det")
    image = sample_image(dtype)
    received, _, _ = receive_image(lavue, pub, "det", image)
    expected_dtype = np.dtype(np.uint8) if image.dtype == bool else image.dtype
    assert received.dtype == expected_dtype  # byte order included
    np.testing.assert_array_equal(received, image.T.astype(expected_dtype))


def test_non_square_image_arrives_transposed_as_lavue_shows_files(bridge, tmp_path):
    rows, cols = 3, 8
    image = np.arange(rows * cols, dtype=np.int32).reshape(rows, cols)
    pub = bridge.publisher()
    lavue = bridge.lavue(f"localhost:{pub.port}", "det")
    received, _, _ = receive_image(lavue, pub, "det", image)
    assert received.shape == (cols, rows)
    assert received[5, 2] == image[2, 5]
    # Lavue's file source draws the same (rows, cols) image this way: our view is upright like it.
    path = tmp_path / "frame.h5"
    with h5py.File(path, "w") as f:
        f.create_group("entry").create_dataset("data", data=image)
    files = NXSFileSource()
    files.setConfiguration(f"{path},/entry/data,-1,0,False,False")
    assert files.connect()
    from_file = files.getData()[0]
    np.testing.assert_array_equal(received, from_file)


def test_channel_first_stack_keeps_channels_and_transposes_each(bridge):
    stack = np.arange(3 * 4 * 6, dtype=np.uint16).reshape(3, 4, 6)
    pub = bridge.publisher()
    lavue = bridge.lavue(f"localhost:{pub.port}", "rgb")
    received, _, _ = receive_image(lavue, pub, "rgb", stack, meta={"channellabels": ["r", "g", "b"]})
    assert received.shape == (3, 6, 4)
    for channel in range(3):
        np.testing.assert_array_equal(received[channel], stack[channel].T)


def test_metadata_and_name_reach_lavue(bridge):
    pub = bridge.publisher()
    lavue = bridge.lavue(f"localhost:{pub.port}", "map")
    image = np.ones((4, 6), dtype=np.float32)
    rows_mm = [10.0, 10.5, 11.0, 11.5]
    cols_mm = [-1.0, -0.8, -0.6, -0.4, -0.2, 0.0]
    meta = {
        "axisscales": axisscales_for_image(rows_mm, cols_mm),
        "axislabels": axislabels_for_image("sample y", "sample x", "mm", "mm"),
        "wavelength": np.float64(0.7293),
        "detector_distance": 0.215,
        "beam_center_x": 1024.5,
        "beam_center_y": np.int64(998),
        "pixel_size": [7.5e-05, 7.5e-05],
        "pressure": math.nan,
    }
    _, name, got = receive_image(lavue, pub, "map", image, meta=meta, name="scan 3 #41")
    assert name == "scan 3 #41"
    assert got["axisscales"] == pytest.approx([-1.0, 10.0, 0.2, 0.5])
    assert got["axislabels"] == ["sample x", "sample y", "mm", "mm"]
    assert got["wavelength"] == pytest.approx(0.7293)
    assert got["beam_center_y"] == 998
    assert got["pixel_size"] == [7.5e-05, 7.5e-05]
    assert got["pressure"] is None  # NaN is not JSON: sent as null
    for key in ("detector_distance", "beam_center_x"):
        assert got[key] == meta[key]


def test_frames_without_a_name_get_a_new_name_each(bridge):
    pub = bridge.publisher(max_rate_hz=50.0)
    lavue = bridge.lavue(f"localhost:{pub.port}", "det")
    image = np.zeros((2, 2), dtype=np.uint8)
    names = set()
    deadline = time.monotonic() + TIMEOUT_S
    while len(names) < 3 and time.monotonic() < deadline:
        names.add(receive_image(lavue, pub, "det", image)[1])
    assert len(names) == 3
    assert all(n.startswith("det #") for n in names)


def test_lavue_sees_the_topic_list_change_at_once(bridge):
    # A long period: every list seen below is the immediate one, sent on the change.
    pub = bridge.publisher(datasources_period_s=60.0)
    lavue = bridge.lavue(f"localhost:{pub.port}", "alpha")
    image = np.zeros((2, 3), dtype=np.uint8)
    receive_image(lavue, pub, "alpha", image)  # the subscription is live from here on

    pub.offer("beta", image)
    seen = poll_lavue(lavue, lambda r: datasources_of(r) == ["alpha", "beta"], timeout=5.0)
    assert datasources_of(seen) == ["alpha", "beta"]
    pub.set_topics(["beta", "gamma"])
    poll_lavue(lavue, lambda r: datasources_of(r) == ["beta", "gamma"], timeout=5.0)
    assert pub.topics == ["beta", "gamma"]
    pub.set_topics(["gamma"])
    poll_lavue(lavue, lambda r: datasources_of(r) == ["gamma"], timeout=5.0)


def test_topic_list_is_repeated_for_late_viewers(bridge):
    pub = bridge.publisher(datasources_period_s=0.1)
    pub.set_topics(["det", "roi"])
    sub = bridge.sub(pub, "datasources")
    lists = []
    deadline = time.monotonic() + TIMEOUT_S
    while len(lists) < 3 and time.monotonic() < deadline:
        if sub.poll(100):
            topic, body, marker = sub.recv_multipart()
            assert (topic, marker) == (b"datasources", b"JSON")
            lists.append(json.loads(body)["datasources"])
    assert lists == [["det", "roi"]] * 3
    assert pub.stats()["datasources_sent"] >= 3


def count_published(pub, sub, topics, offer_s: float) -> tuple[dict[str, int], float]:
    """Offer to every topic at about 200 Hz for ``offer_s``; count what the SUB gets.

    Returns the counts and the span from first to last offer: a publisher that
    keeps its rate sends at most ``rate * span + 2`` messages per topic (sends
    start at the first offer, end one interval after the last, and are at least
    1/rate apart), whatever the delivery delay.
    """
    image = np.zeros((16, 16), dtype=np.uint16)
    counts = dict.fromkeys(topics, 0)
    first = time.monotonic()
    last = first
    while time.monotonic() - first < offer_s:
        for topic in topics:
            pub.offer(topic, image)
        last = time.monotonic()
        while sub.poll(0):
            counts[sub.recv_multipart()[0].decode()] += 1
        time.sleep(0.005)
    quiet_until = time.monotonic() + 0.5  # drain until nothing came for 0.5 s
    while time.monotonic() < quiet_until:
        if sub.poll(50):
            counts[sub.recv_multipart()[0].decode()] += 1
            quiet_until = time.monotonic() + 0.5
    return counts, last - first


def test_rate_limit_holds_per_topic_and_can_change(bridge):
    pub = bridge.publisher(max_rate_hz=10.0)
    topics = ["cam", "roi"]
    sub = bridge.sub(pub, *topics)
    image = np.zeros((16, 16), dtype=np.uint16)
    for topic in topics:  # warm up until the subscription is live
        deadline = time.monotonic() + TIMEOUT_S
        while not sub.poll(100) and time.monotonic() < deadline:
            pub.offer(topic, image)
        while sub.poll(300):
            sub.recv_multipart()

    for rate in (10.0, 4.0):
        pub.max_rate_hz = rate
        before = pub.stats()["topics"]
        counts, span = count_published(pub, sub, topics, offer_s=1.0)
        after = pub.stats()["topics"]
        for topic in topics:
            assert 1 <= counts[topic] <= rate * span + 2, (rate, topic, counts, span)
            published = after[topic]["published"] - before[topic]["published"]
            assert published == counts[topic]
            assert after[topic]["skipped"] - before[topic]["skipped"] > 0  # 200 Hz in, <= rate out


def test_every_offered_image_is_published_skipped_or_pending(bridge):
    pub = bridge.publisher(max_rate_hz=50.0)
    image = np.zeros((8, 8), dtype=np.float32)

    def offer_many(topic):
        for _ in range(5000):
            pub.offer(topic, image)

    threads = [threading.Thread(target=offer_many, args=(t,)) for t in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    def consistent(stats):
        assert stats["failed"] == 0
        assert stats["offered"] == stats["published"] + stats["skipped"] + stats["pending"]
        for c in stats["topics"].values():
            assert c["offered"] == c["published"] + c["skipped"] + c["failed"] + c["pending"]

    stats = pub.stats()
    consistent(stats)
    assert stats["offered"] == 10000
    assert stats["topics"]["a"]["offered"] == stats["topics"]["b"]["offered"] == 5000
    assert stats["skipped"] > 0
    # the last image of each topic still goes out
    deadline = time.monotonic() + TIMEOUT_S
    while pub.stats()["pending"] and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = pub.stats()
    consistent(stats)
    assert stats["pending"] == 0
    assert stats["topics"]["a"]["published"] >= 1 and stats["topics"]["b"]["published"] >= 1
    # dropping a topic keeps the totals whole
    pub.offer("a", image)
    pub.set_topics(["b"])
    stats = pub.stats()
    consistent(stats)
    assert stats["offered"] == 10001
    assert list(stats["topics"]) == ["b"]


def test_address_is_what_a_lavue_user_types(bridge):
    local = bridge.publisher(bind="127.0.0.1")
    assert local.address == f"127.0.0.1:{local.port}"
    everywhere = bridge.publisher(bind="*")
    assert everywhere.address == f"{socket.gethostname()}:{everywhere.port}"
    lavue = bridge.lavue(everywhere.address, "det")
    image = np.arange(6, dtype=np.uint8).reshape(2, 3)
    np.testing.assert_array_equal(receive_image(lavue, everywhere, "det", image)[0], image.T)


def test_close_stops_the_thread_and_is_idempotent(bridge):
    pub = bridge.publisher()
    thread_name = f"lavue-publisher:{pub.port}"
    assert thread_name in {t.name for t in threading.enumerate()}
    pub.close()
    pub.close()
    assert thread_name not in {t.name for t in threading.enumerate()}
    with pytest.raises(RuntimeError, match="closed"):
        pub.offer("det", np.zeros((2, 2)))
    # the port is free again
    again = bridge.publisher(port=pub.port)
    assert again.port == pub.port


def test_bad_parameters_say_what_was_expected(bridge):
    pub = bridge.publisher()
    image = np.zeros((2, 2), dtype=np.uint8)
    for topic, match in [
        ("", "empty"),
        ("déjà", "ASCII"),
        ("a/b", "'/'"),
        ("host:1", "':'"),
        ("datasources", "reserved"),
    ]:
        with pytest.raises(ValueError, match=match):
            pub.offer(topic, image)
    with pytest.raises(TypeError, match="topic must be a str"):
        pub.offer(b"det", image)
    for bad, match in [
        (np.zeros(5), r"shape \(5,\)"),
        (np.zeros((1, 2, 3, 4)), "shape"),
        (np.zeros((0, 3)), "empty"),
        (np.zeros((2, 2), dtype=complex), "complex128"),
    ]:
        with pytest.raises(ValueError, match=match):
            pub.offer("det", bad)
    with pytest.raises(TypeError, match="numpy.ndarray"):
        pub.offer("det", [[1, 2], [3, 4]])
    with pytest.raises(ValueError, match=r"\['shape'\] are reserved"):
        pub.offer("det", image, meta={"shape": [2, 2]})
    for value in (0, -1.0, math.nan, "10"):
        with pytest.raises(ValueError, match="max_rate_hz must be a finite number > 0"):
            pub.max_rate_hz = value
    with pytest.raises(ValueError, match="port must be an integer"):
        LavuePublisher(port=70000)
    with pytest.raises(OSError, match=f"port={pub.port}"):
        LavuePublisher(port=pub.port)
    assert pub.stats()["offered"] == 0


def test_protocol_messages_and_axis_helpers():
    image = np.arange(12, dtype="<u2").reshape(3, 4)
    topic, raw, header, marker = encode_image("det", image, "f #1", {"wavelength": 1.0})
    assert (topic, marker) == (b"det", b"JSON")
    head = json.loads(header)
    assert head == {"wavelength": 1.0, "shape": [4, 3], "dtype": "<u2", "name": "f #1"}
    np.testing.assert_array_equal(np.frombuffer(raw, dtype="<u2").reshape(4, 3), image.T)
    laid = lavue_layout(image[:, ::2])  # a strided view comes out contiguous
    assert laid.flags.c_contiguous and laid.shape == (2, 3)
    assert encode_datasources(["a", "b"]) == [b"datasources", b'{"datasources": ["a", "b"]}', b"JSON"]
    assert axisscales_for_image([5.0], [0.0, 2.0, 4.0]) == [0.0, 5.0, 2.0, 1.0]
    with pytest.raises(ValueError, match="col_values must be evenly spaced"):
        axisscales_for_image([0.0, 1.0], [0.0, 1.0, 3.0])
    with pytest.raises(ValueError, match="row_values must be a non-empty"):
        axisscales_for_image([], [0.0, 1.0])
