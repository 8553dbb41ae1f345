"""The wire format: round trips, zero copy, and every kind of malformed input."""

import json

import numpy as np
import pytest
import zmq

from pipelines import message as m

DTYPES = ["bool", "int8", "uint8", "int16", "uint16", ">u2", "int32", "uint32", "int64", "uint64",
          "float16", "float32", ">f8", "float64", "complex64"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_keeps_values_dtype_and_shape(dtype):
    rng = np.random.default_rng(1)
    array = (rng.random((5, 7)) * 100).astype(dtype)
    msg = m.Message(m.RESULT, scan=3, index=41, stream="main", arrays={"img": array},
                    scalars={"s": 1.5, "n": 2, "bad": float("nan")}, meta={"k": [1, 2]}, version=4)
    out = m.decode([bytes(p) for p in m.encode(msg)])
    assert out.arrays["img"].dtype == array.dtype
    np.testing.assert_array_equal(out.arrays["img"], array)
    assert (out.scan, out.index, out.stream, out.version, out.meta) == (3, 41, "main", 4, {"k": [1, 2]})
    assert out.scalars["s"] == 1.5 and out.scalars["n"] == 2 and np.isnan(out.scalars["bad"])


def test_non_contiguous_arrays_are_sent_contiguous():
    array = np.arange(100, dtype=np.uint16).reshape(10, 10)[:, ::2]
    out = m.decode([bytes(p) for p in m.encode(m.Message(m.FRAME, 1, 0, arrays={"data": array}))])
    np.testing.assert_array_equal(out.arrays["data"], array)


def test_buffers_travel_without_copy_through_zmq():
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    port = a.bind_to_random_port("tcp://127.0.0.1")
    b.connect(f"tcp://127.0.0.1:{port}")
    frame = np.arange(2048 * 2048, dtype=np.uint16).reshape(2048, 2048)
    parts = m.encode(m.Message(m.FRAME, 1, 0, arrays={"data": frame}))
    assert np.shares_memory(np.frombuffer(parts[1], np.uint16), frame)  # encode does not copy
    a.send_multipart(parts, copy=False)
    received = b.recv_multipart(copy=False)
    out = m.decode(received)
    assert np.shares_memory(out.arrays["data"], np.frombuffer(received[1].buffer, np.uint16))
    np.testing.assert_array_equal(out.arrays["data"], frame)
    a.close(0)
    b.close(0)


def _header(**changes):
    header = {"protocol": m.PROTOCOL, "kind": "frame", "scan": 1, "index": 0, "stream": "",
              "buffers": [{"name": "d", "dtype": "<u2", "shape": [2, 2]}], "scalars": {}, "meta": {}}
    header.update(changes)
    return json.dumps(header).encode()


GOOD_BUFFER = np.zeros((2, 2), np.uint16).tobytes()


@pytest.mark.parametrize(
    "frames, reason",
    [
        ([], "no_parts"),
        ([b"\xff\xfe not json", GOOD_BUFFER], "bad_json"),
        ([b"[1, 2]", GOOD_BUFFER], "bad_header"),
        ([_header(protocol="other/9"), GOOD_BUFFER], "bad_protocol"),
        ([_header(kind="explode"), GOOD_BUFFER], "bad_kind"),
        ([_header(index=-1), GOOD_BUFFER], "bad_index"),
        ([_header(index=2**60), GOOD_BUFFER], "bad_index"),
        ([_header(index=True), GOOD_BUFFER], "bad_index"),
        ([_header(index=None), GOOD_BUFFER], "bad_index"),
        ([_header(scan=[1]), GOOD_BUFFER], "bad_scan"),
        ([_header(), GOOD_BUFFER, GOOD_BUFFER], "bad_parts"),
        ([_header()], "bad_parts"),
        ([_header(buffers=[{"name": "d", "dtype": "O", "shape": [2, 2]}]), GOOD_BUFFER], "bad_dtype"),
        ([_header(buffers=[{"name": "d", "dtype": "<U4", "shape": [1]}]), b"abcd" * 4], "bad_dtype"),
        ([_header(buffers=[{"name": "d", "dtype": "nonsense", "shape": [2, 2]}]), GOOD_BUFFER], "bad_dtype"),
        ([_header(buffers=[{"name": "d", "dtype": "<u2", "shape": [2, 3]}]), GOOD_BUFFER], "bad_size"),
        ([_header(buffers=[{"name": "d", "dtype": "<u2", "shape": [2**40, 2**40]}]), GOOD_BUFFER], "bad_shape"),
        ([_header(buffers=[{"name": "d", "dtype": "<u2", "shape": [-2, -2]}]), GOOD_BUFFER], "bad_shape"),
        ([_header(buffers=[{"name": "d", "dtype": "<u2", "shape": [1, 1, 1, 1, 1]}]), GOOD_BUFFER], "bad_shape"),
        ([_header(buffers=[{"name": "d", "dtype": "<u2", "shape": "2x2"}]), GOOD_BUFFER], "bad_shape"),
        ([_header(buffers="all"), GOOD_BUFFER], "bad_buffer"),
        ([_header(scalars={"a": [1, 2]}), GOOD_BUFFER], "bad_scalars"),
        ([_header(surprise=1), GOOD_BUFFER], "bad_header"),
        ([b" " * (m.MAX_HEADER_BYTES + 1)], "header_too_big"),
    ],
)
def test_malformed_messages_raise_bad_message_with_reason(frames, reason):
    with pytest.raises(m.BadMessage) as info:
        m.decode(frames)
    assert info.value.reason == reason


def test_pickle_payload_is_never_unpickled():
    import pickle

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    with pytest.raises(m.BadMessage):
        m.decode([pickle.dumps(Boom()), GOOD_BUFFER])


def test_batches_round_trip_and_reject_inconsistent_part_counts():
    msgs = [m.Message(m.RESULT, scan=1, index=i, stream="s", arrays={"a": np.full(3, i)}) for i in range(5)]
    out = m.decode_many([bytes(p) for p in m.encode_batch(msgs)])
    assert [x.index for x in out] == list(range(5))
    np.testing.assert_array_equal(out[4].arrays["a"], [4, 4, 4])
    single = m.encode(msgs[0])
    assert [x.index for x in m.decode_many(single)] == [0]
    frames = [bytes(p) for p in m.encode_batch(msgs)]
    with pytest.raises(m.BadMessage) as info:
        m.decode_many(frames[:-1])
    assert info.value.reason == "bad_batch"
    nested = [json.dumps({"protocol": m.PROTOCOL, "kind": "batch", "body": {"parts": [len(frames)]}}).encode(), *frames]
    with pytest.raises(m.BadMessage):
        m.decode_many(nested)
