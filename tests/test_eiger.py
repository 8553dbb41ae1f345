"""Eiger stream v1: blob codecs, message parsing, and the source against the simulated DCU.

The wire tests run a real ZMQ PUSH (the simulated DCU, in a thread) against the
source's PULL socket; the bitshuffle-LZ4 format is checked against the HDF5
bitshuffle filter of hdf5plugin, an independent implementation of the same chunk format.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest

from pipelines.sources import SourceError, load_source
from pipelines.sources.eiger import (
    COUNTERS,
    EigerProtocolError,
    EigerStreamSource,
    decode_blob,
    encode_blob,
    parse_header,
    parse_image,
)
from pipelines.sources.eiger_simulator import (
    FAULTS,
    SimulatedEigerDCU,
    default_tables,
    detector_config,
    image_parts,
    main,
    series_end_parts,
    series_header_parts,
)
from pipelines.sources.simulator import SimulatedDetector

REPO = Path(__file__).resolve().parents[1]
SHAPE = (257, 311)  # (y, x); 79927 pixels: not a multiple of 8, so the bitshuffle tail is exercised


def pixels(dtype: str, shape=SHAPE, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    top = min(np.iinfo(dtype).max, 1 << 20)
    image = rng.poisson(30, shape).astype(dtype)
    image[::7, ::5] = top  # some hot pixels use the high bits
    return image


def receive(source: EigerStreamSource, scan=None) -> list[tuple[np.ndarray, dict]]:
    return list(source.frames(scan or {}))


@pytest.fixture
def dcu():
    with SimulatedEigerDCU(0, send_timeout_s=10.0) as dcu:
        yield dcu


@pytest.fixture
def source(dcu):
    with EigerStreamSource(dcu.endpoint, timeout_s=10.0) as source:
        source.connect()  # so that messages sent before frames() is called have somewhere to go
        yield source


# --------------------------------------------------------------------------- pure codecs

ENCODINGS = [
    ("uint16", "<"),
    ("uint32", "<"),
    ("uint16", "lz4<"),
    ("uint32", "lz4<"),
    ("uint8", "bs8-lz4<"),
    ("uint16", "bs16-lz4<"),
    ("uint32", "bs32-lz4<"),
]


@pytest.mark.parametrize(("dtype", "encoding"), ENCODINGS)
def test_blob_round_trip_is_exact(dtype, encoding):
    image = pixels(dtype)
    blob = encode_blob(image, encoding)
    decoded = decode_blob(blob, (SHAPE[1], SHAPE[0]), dtype, encoding)
    assert decoded.shape == SHAPE
    assert decoded.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(decoded, image)
    if encoding != "<":
        assert len(blob) < image.nbytes  # it really is compressed


@pytest.mark.parametrize("block_bytes", [256, 4096, 65536])
def test_bitshuffle_other_block_sizes_decode(block_bytes):
    image = pixels("uint32")
    blob = encode_blob(image, "bs32-lz4<", block_bytes)
    assert int.from_bytes(blob[8:12], "big") == block_bytes
    np.testing.assert_array_equal(decode_blob(blob, (SHAPE[1], SHAPE[0]), "uint32", "bs32-lz4<"), image)


def test_bitshuffle_header_is_total_bytes_and_block_bytes_big_endian():
    image = pixels("uint16")
    blob = encode_blob(image, "bs16-lz4<")
    assert int.from_bytes(blob[0:8], "big") == image.nbytes
    assert int.from_bytes(blob[8:12], "big") == 8192  # bitshuffle's default, as the DCU sends


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_bitshuffle_blob_is_the_hdf5_bitshuffle_chunk(tmp_path, dtype):
    """Both ways against hdf5plugin's filter: a chunk it writes decodes, a blob we write reads back."""
    image = pixels(dtype)
    bits = np.dtype(dtype).itemsize * 8
    path = tmp_path / "chunks.h5"
    with h5py.File(path, "w") as f:
        written = f.create_dataset(
            "by_filter", data=image[None], chunks=(1, *SHAPE), **hdf5plugin.Bitshuffle(cname="lz4")
        )
        _, chunk = written.id.read_direct_chunk((0, 0, 0))
        ours = f.create_dataset(
            "by_us", shape=(1, *SHAPE), dtype=dtype, chunks=(1, *SHAPE), **hdf5plugin.Bitshuffle(cname="lz4")
        )
        ours.id.write_direct_chunk((0, 0, 0), encode_blob(image, f"bs{bits}-lz4<"))
    np.testing.assert_array_equal(decode_blob(chunk, (SHAPE[1], SHAPE[0]), dtype, f"bs{bits}-lz4<"), image)
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["by_us"][0], image)


def _bslz4_with_first_block_size(blob: bytes, size: int) -> bytes:
    return blob[:12] + size.to_bytes(4, "big") + blob[16:]


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("bslz4 truncated", "decode_errors"),
        ("bslz4 shorter than its header", "decode_errors"),
        ("bslz4 total bytes wrong", "size_mismatch"),
        ("bslz4 block size not a multiple of 8 elements", "decode_errors"),
        ("bslz4 block size field past the end", "decode_errors"),
        ("bslz4 block content damaged", "decode_errors"),
        ("lz4 garbage", "decode_errors"),
        ("lz4 decompresses to fewer bytes", "size_mismatch"),
        ("raw wrong size", "size_mismatch"),
        ("unknown encoding", "unknown_encoding"),
        ("unknown pixel type", "bad_parts"),
    ],
)
def test_bad_blobs_raise_a_protocol_error_with_a_reason(case, reason):
    image = pixels("uint16")
    xy = (SHAPE[1], SHAPE[0])
    bs = encode_blob(image, "bs16-lz4<")
    lz = encode_blob(image, "lz4<")
    calls = {
        "bslz4 truncated": (bs[:-5], xy, "uint16", "bs16-lz4<"),
        "bslz4 shorter than its header": (bs[:10], xy, "uint16", "bs16-lz4<"),
        "bslz4 total bytes wrong": ((1).to_bytes(8, "big") + bs[8:], xy, "uint16", "bs16-lz4<"),
        "bslz4 block size not a multiple of 8 elements": (
            bs[:8] + (100).to_bytes(4, "big") + bs[12:],
            xy,
            "uint16",
            "bs16-lz4<",
        ),
        "bslz4 block size field past the end": (
            _bslz4_with_first_block_size(bs, 1 << 30),
            xy,
            "uint16",
            "bs16-lz4<",
        ),
        "bslz4 block content damaged": (bs[:16] + b"\xff" * (len(bs) - 16), xy, "uint16", "bs16-lz4<"),
        "lz4 garbage": (b"\xff" * len(lz), xy, "uint16", "lz4<"),
        "lz4 decompresses to fewer bytes": (encode_blob(image[:-1], "lz4<"), xy, "uint16", "lz4<"),
        "raw wrong size": (image.tobytes()[:-2], xy, "uint16", "<"),
        "unknown encoding": (bs, xy, "uint16", "zstd<"),
        "unknown pixel type": (image.tobytes(), xy, "object", "<"),
    }
    with pytest.raises(EigerProtocolError) as caught:
        decode_blob(*calls[case])
    assert caught.value.reason == reason


def test_damaged_bitshuffle_blobs_never_crash_the_decoder():
    """Random byte damage anywhere: either the same-shaped image or a protocol error, never worse."""
    image = pixels("uint32", shape=(64, 48))
    blob = encode_blob(image, "bs32-lz4<", 1024)
    rng = np.random.default_rng(11)
    outcomes = {"decoded": 0, "rejected": 0}
    for _ in range(300):
        damaged = bytearray(blob)
        for at in rng.integers(0, len(blob), size=int(rng.integers(1, 4))):
            damaged[at] = int(rng.integers(0, 256))
        try:
            decoded = decode_blob(bytes(damaged), (48, 64), "uint32", "bs32-lz4<")
        except EigerProtocolError:
            outcomes["rejected"] += 1
        else:
            assert decoded.shape == (64, 48)
            outcomes["decoded"] += 1
    assert outcomes["rejected"] > 0


# --------------------------------------------------------------------------- message parsing


@pytest.mark.parametrize("detail", ["none", "basic", "all"])
@pytest.mark.parametrize("appendix", [None, {"scan": 12, "sample": "Si"}])
def test_series_header_parses_at_every_detail_level(detail, appendix):
    config = detector_config(SHAPE, "uint32", 9, "bs32-lz4<")
    tables = default_tables(SHAPE)
    parts = series_header_parts(7, detail, config, appendix=appendix, **tables)
    header = parse_header(parts)
    assert (header.series, header.detail, header.problems) == (7, detail, [])
    assert header.appendix == appendix
    if detail == "none":
        assert header.config == {} and header.frames_expected is None
    else:
        assert header.config == config
        assert header.frames_expected == 9
        assert header.image_shape == SHAPE
    for name in ("flatfield", "pixel_mask", "countrate_table"):
        table = getattr(header, name)
        if detail == "all":
            np.testing.assert_array_equal(table, tables[name])
            assert table.dtype == tables[name].dtype
        else:
            assert table is None


def test_header_with_broken_later_parts_still_starts_the_series():
    config = detector_config(SHAPE, "uint32", 4, "<")
    parts = series_header_parts(3, "all", config, **default_tables(SHAPE))
    missing_mask_blob = parts[:5] + parts[6:]
    header = parse_header(missing_mask_blob)
    assert header.series == 3 and header.config == config
    assert header.flatfield is not None
    assert {p.reason for p in header.problems} >= {"bad_parts"}
    bad_config = parse_header([parts[0], b"{not json"] + parts[2:])
    assert [p.reason for p in bad_config.problems] == ["bad_json"]
    assert bad_config.pixel_mask is not None and bad_config.config == {}


def test_image_parses_with_its_meta_and_problems():
    image = pixels("uint16")
    parts = image_parts(5, 2, image, "bs16-lz4<", start_time=10, stop_time=20, real_time=10, appendix="note")
    parsed = parse_image(parts, verify_hash=True)
    assert (parsed.series, parsed.frame, parsed.appendix, parsed.problems) == (5, 2, "note", [])
    assert parsed.config["real_time"] == 10 and len(parsed.hash) == 32
    np.testing.assert_array_equal(parsed.data, image)
    without_config = parse_image(parts[:3])
    assert [p.reason for p in without_config.problems] == ["bad_parts"]
    np.testing.assert_array_equal(without_config.data, image)
    with pytest.raises(EigerProtocolError) as caught:
        parse_image([parts[0], parts[1], parts[3]])  # the blob is missing
    assert (caught.value.reason, caught.value.frame) == ("bad_parts", 2)
    assert "missing" in str(caught.value)
    with pytest.raises(EigerProtocolError) as caught:
        blob = bytearray(parts[2])
        blob[-1] ^= 0x01  # the raw tail: still decodable, but not what was sent
        parse_image([parts[0], parts[1], bytes(blob), parts[3]], verify_hash=True)
    assert caught.value.reason == "hash_mismatch"


# --------------------------------------------------------------------------- over ZMQ


@pytest.mark.parametrize(
    ("dtype", "encoding"),
    [("uint16", "<"), ("uint32", "lz4<"), ("uint16", "bs16-lz4<"), ("uint32", "bs32-lz4<")],
)
def test_each_encoding_arrives_exact_over_zmq(dcu, source, dtype, encoding):
    dcu.start_series(4, encoding=encoding, shape=SHAPE, dtype=dtype, rate_hz=0)
    got = receive(source)
    series = dcu.wait(10)
    reference = SimulatedDetector(shape=SHAPE, dtype=dtype, rate_hz=0, frames=4)
    assert [meta["frame"] for _, meta in got] == [0, 1, 2, 3]
    for i, (array, meta) in enumerate(got):
        assert array.dtype == np.dtype(dtype) and array.shape == SHAPE
        np.testing.assert_array_equal(array, reference.frame(i))
        assert meta["series"] == series and meta["encoding"] == encoding
        assert len(meta["hash"]) == 32
        assert meta["stop_time"] - meta["start_time"] == meta["real_time"] > 0
    stats = source.stats()
    assert stats["frames"] == 4 and stats["series"] == 1
    assert all(stats[key] == 0 for key in COUNTERS if key not in ("messages", "bytes", "series", "frames"))
    assert source.last_error is None


def test_full_size_bs16_frame_round_trip(dcu, source):
    image = pixels("uint16", shape=(2048, 2048), seed=5)
    dcu.start_series([image, image[::-1].copy()], encoding="bs16-lz4<")
    got = receive(source)
    dcu.wait(30)
    assert len(got) == 2
    np.testing.assert_array_equal(got[0][0], image)
    np.testing.assert_array_equal(got[1][0], image[::-1])


@pytest.mark.parametrize("detail", ["none", "basic", "all"])
def test_describe_follows_the_header_detail(dcu, source, detail):
    assert source.describe() == {"detector": "eiger", "endpoint": dcu.endpoint}
    dcu.start_series(2, detail=detail, shape=SHAPE, dtype="uint32", header_appendix={"proposal": 20240001})
    got = receive(source)
    dcu.wait(10)
    assert len(got) == 2
    info = source.describe()
    json.dumps(info)  # goes into files' metadata
    assert info["header_detail"] == detail and info["appendix"] == {"proposal": 20240001}
    assert info["shape"] == list(SHAPE) and info["dtype"] == "uint32"
    if detail == "none":
        assert "nimages" not in info and "pixel_mask_shape" not in info
    else:
        config = detector_config(SHAPE, "uint32", 2, "bs32-lz4<")
        for key in ("beam_center_x", "beam_center_y", "count_time", "wavelength", "nimages"):
            assert info[key] == config[key]
        assert (info["x_pixels_in_detector"], info["y_pixels_in_detector"]) == (SHAPE[1], SHAPE[0])
        assert info["frames_expected"] == 2 and info["pixel_size_um"] == pytest.approx(75.0)
    if detail == "all":
        tables = default_tables(SHAPE)
        assert info["pixel_mask_shape"] == list(SHAPE)
        np.testing.assert_array_equal(source.pixel_mask, tables["pixel_mask"])
        np.testing.assert_array_equal(source.flatfield, tables["flatfield"])
        np.testing.assert_array_equal(source.countrate_table, tables["countrate_table"])
    else:
        assert source.pixel_mask is None


FAULT_COUNTERS = {
    "drop": "missing_frames",
    "duplicate": "duplicate_frames",
    "missing_part": "bad_parts",
    "corrupt_blob": "decode_errors",
    "bad_json": "bad_json",
    "wrong_size": "size_mismatch",
    "wrong_series": "wrong_series",
    "unknown_encoding": "unknown_encoding",
    "bad_config": "bad_config",
}


def test_every_simulated_fault_has_a_counter():
    assert set(FAULT_COUNTERS) == set(FAULTS)


@pytest.mark.parametrize("fault", sorted(FAULT_COUNTERS))
def test_a_fault_is_counted_and_reported_and_good_frames_still_arrive(dcu, source, fault):
    dcu.start_series(6, shape=SHAPE, dtype="uint16", faults={2: fault})
    got = receive(source)
    dcu.wait(10)
    reference = SimulatedDetector(shape=SHAPE, dtype="uint16", rate_hz=0, frames=6)
    delivered = [meta["frame"] for _, meta in got]
    # a damaged dconfig leaves the pixels good, so that frame is still delivered
    assert delivered == ([0, 1, 2, 3, 4, 5] if fault in ("bad_config", "duplicate") else [0, 1, 3, 4, 5])
    for array, meta in got:
        np.testing.assert_array_equal(array, reference.frame(meta["frame"]))
    stats = source.stats()
    counter = FAULT_COUNTERS[fault]
    assert stats[counter] == 1
    errors = {
        key: n for key, n in stats.items() if key not in ("messages", "bytes", "series", "frames") and n
    }
    # an image claiming another series leaves frame 2 of this one missing
    assert errors == ({counter: 1, "missing_frames": 1} if fault == "wrong_series" else {counter: 1})
    assert "frame 2" in source.last_error
    assert source.missing_frame_numbers == ([2] if fault in ("drop", "wrong_series") else [])
    unusable = fault in ("missing_part", "corrupt_blob", "bad_json", "wrong_size", "unknown_encoding")
    assert source.bad_frame_numbers == ([2] if unusable else [])


def test_raw_corruption_is_caught_by_the_hash_when_asked(dcu):
    with EigerStreamSource(dcu.endpoint, verify_hash=True) as source:
        dcu.start_series(4, encoding="<", shape=SHAPE, dtype="uint32", faults={1: "corrupt_blob"})
        got = receive(source)
        dcu.wait(10)
    assert [meta["frame"] for _, meta in got] == [0, 2, 3]
    assert source.stats()["hash_mismatch"] == 1 and "frame 1" in source.last_error


def test_frame_count_against_the_header(dcu, source):
    dcu.start_series(3, shape=SHAPE, dtype="uint16", config={"nimages": 5})
    assert len(receive(source)) == 3
    dcu.wait(10)
    assert source.stats()["missing_frames"] == 2
    assert source.missing_frame_numbers == [3, 4]
    assert "after 3 frames" in source.last_error and "announced 5" in source.last_error

    dcu.start_series(4, shape=SHAPE, dtype="uint16", config={"nimages": 2})
    assert [meta["frame"] for _, meta in receive(source)] == [0, 1, 2, 3]  # nothing good is lost
    dcu.wait(10)
    assert source.stats()["extra_frames"] == 2 and source.missing_frame_numbers == []


def test_images_of_another_shape_than_announced_are_dropped(dcu, source):
    dcu.start_series(3, shape=SHAPE, dtype="uint16", config={"x_pixels_in_detector": 300})
    assert receive(source) == []
    dcu.wait(10)
    assert source.stats()["shape_mismatch"] == 3 and source.bad_frame_numbers == [0, 1, 2]


def test_series_end_ends_each_scan_and_series_follow_each_other(dcu, source):
    dcu.start_series(3, shape=SHAPE, dtype="uint16")
    first = receive(source)
    first_series = dcu.wait(10)
    dcu.start_series(2, shape=SHAPE, dtype="uint16")
    second = receive(source)
    second_series = dcu.wait(10)
    assert [m["series"] for _, m in first] == [first_series] * 3
    assert [m["series"] for _, m in second] == [second_series] * 2 and second_series == first_series + 1
    assert source.stats()["series"] == 2


def test_a_lost_series_end_is_noticed_at_the_next_header(dcu, source):
    dcu.start_series(3, shape=SHAPE, dtype="uint16", send_end=False)
    dcu.wait(10)
    dcu.start_series(2, shape=SHAPE, dtype="uint16")
    first = receive(source)
    assert len(first) == 3 and source.stats()["missing_series_end"] == 1
    second = receive(source)  # the header that closed the first series opens the second
    dcu.wait(10)
    assert [m["frame"] for _, m in second] == [0, 1]
    assert second[0][1]["series"] == first[0][1]["series"] + 1


def test_images_before_any_header_are_dropped_unless_accepted(dcu):
    image = pixels("uint16")
    with EigerStreamSource(dcu.endpoint) as source:
        source.connect()
        for frame in range(2):
            dcu.send_parts(image_parts(40, frame, image, "bs16-lz4<"))
        dcu.send_parts(series_end_parts(40))
        dcu.start_series(2, shape=SHAPE, dtype="uint16", series=41)
        got = receive(source)
        dcu.wait(10)
        assert [m["series"] for _, m in got] == [41, 41]
        assert source.stats()["images_without_header"] == 2 and source.stats()["stray_messages"] == 1
    # a fresh DCU: the closed consumer's connection may still hold messages
    with SimulatedEigerDCU(0) as other, EigerStreamSource(other.endpoint, accept_headerless=True) as source:
        source.connect()
        for frame in range(3):
            other.send_parts(image_parts(42, frame, image, "bs16-lz4<"))
        other.send_parts(series_end_parts(42))
        got = receive(source)
        assert [(m["series"], m["frame"]) for _, m in got] == [(42, 0), (42, 1), (42, 2)]
        np.testing.assert_array_equal(got[2][0], image)


def test_garbage_messages_between_images_do_not_stop_the_series(dcu, source):
    image = pixels("uint32")
    dcu.send_parts(series_header_parts(9, "basic", detector_config(SHAPE, "uint32", 3, "<")))
    dcu.send_parts(image_parts(9, 0, image, "<"))
    dcu.send_parts([b"\x80\x04\x95 not json, and never unpickled"])
    dcu.send_parts([b'{"htype": "dunknown-1.0"}'])
    dcu.send_parts([b"[1, 2, 3]"])
    dcu.send_parts(image_parts(9, 1, image, "<") + [b"appendix", b"one part too many"])
    dcu.send_parts(image_parts(9, 2, image, "<"))
    dcu.send_parts(series_end_parts(9))
    got = receive(source)
    assert [m["frame"] for _, m in got] == [0, 1, 2]
    stats = source.stats()
    assert stats["bad_json"] == 2 and stats["stray_messages"] == 1 and stats["bad_parts"] == 1


def test_stop_ends_frames_while_waiting_and_mid_series(dcu):
    with EigerStreamSource(dcu.endpoint, timeout_s=None) as source:
        waiting = threading.Thread(target=receive, args=(source,))
        waiting.start()
        threading.Event().wait(0.3)
        source.stop()
        waiting.join(2.0)
        assert not waiting.is_alive()

        dcu.start_series(10_000, shape=(64, 64), dtype="uint16", rate_hz=100)
        got = []
        for _, meta in source.frames({}):
            got.append(meta["frame"])
            if len(got) == 3:
                source.stop()
        assert got == [0, 1, 2]
        dcu.stop()
        assert dcu.wait(5) == 1


def test_no_header_within_the_timeout_is_a_source_error(dcu):
    with EigerStreamSource(dcu.endpoint, timeout_s=0.3) as source:
        with pytest.raises(SourceError, match="no series header"):
            receive(source)


def test_idle_timeout_gives_up_a_silent_series(dcu):
    with EigerStreamSource(dcu.endpoint, idle_timeout_s=0.3) as source:
        dcu.start_series(2, shape=SHAPE, dtype="uint16", send_end=False)
        got = receive(source)
        dcu.wait(10)
    assert len(got) == 2 and source.stats()["timeouts"] == 1


def test_registered_as_a_source_kind(dcu):
    source = load_source({"kind": "eiger", "endpoint": dcu.endpoint, "timeout_s": 5})
    try:
        assert isinstance(source, EigerStreamSource) and source.timeout_s == 5
    finally:
        source.close()
    with pytest.raises(SourceError, match="eiger"):
        load_source({"kind": "eiger", "no_such_option": 1})


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"endpoint": "localhost:9999"}, "endpoint"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"idle_timeout_s": -1}, "idle_timeout_s"),
        ({"rcvhwm": 0}, "rcvhwm"),
    ],
)
def test_bad_source_parameters_are_named(kwargs, names):
    with pytest.raises(ValueError, match=names):
        EigerStreamSource(**kwargs)


def test_bad_simulator_parameters_are_named(dcu):
    with pytest.raises(ValueError, match="port"):
        SimulatedEigerDCU(70000)
    with pytest.raises(ValueError, match="no_such_fault"):
        dcu.send_series(2, faults={0: "no_such_fault"})
    with pytest.raises(ValueError, match="header detail"):
        series_header_parts(1, "most", {})


def test_simulator_waits_for_a_consumer_and_gives_up(dcu):
    dcu.send_timeout_s = 0.3
    with pytest.raises(TimeoutError, match="no consumer"):
        dcu.send_series(1, shape=(8, 8))


def test_command_line_simulator(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    command = [
        sys.executable,
        "-m",
        "pipelines.sources.eiger_simulator",
        "--frames",
        "3",
        "--encoding",
        "bs32-lz4",
        "--port",
        "0",
        "--shape",
        "64",
        "80",
        "--detail",
        "all",
        "--send-timeout",
        "20",
    ]
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        banner = process.stdout.readline()
        assert "pushing on tcp://" in banner, process.stderr.read()
        endpoint = banner.split("pushing on ")[1].strip()
        with EigerStreamSource(endpoint, timeout_s=20) as source:
            got = receive(source)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert "3 frames sent" in out
    reference = SimulatedDetector(shape=(64, 80), dtype="uint32", rate_hz=0, frames=3)
    assert [m["encoding"] for _, m in got] == ["bs32-lz4<"] * 3
    for array, meta in got:
        np.testing.assert_array_equal(array, reference.frame(meta["frame"]))
    assert source.describe()["pixel_mask_shape"] == [64, 80]


def test_command_line_rejects_a_bad_encoding(capsys):
    with pytest.raises(SystemExit):
        main(["--encoding", "gzip", "--port", "0"])
    assert "--encoding" in capsys.readouterr().err
