"""ReorderBuffer: order restored, duplicates dropped, gaps after window or timeout."""

import random

from pipelines import message as m
from pipelines.sorter import ReorderBuffer


def start(scan=1):
    return m.Message(m.SCAN_START, scan=scan, stream="main")


def end(n, scan=1):
    return m.Message(m.SCAN_END, scan=scan, stream="main", body={"frames": n})


def result(i, scan=1):
    return m.Message(m.RESULT, scan=scan, index=i, stream="main", scalars={"i": i})


def kinds_and_indices(out):
    return [(x.kind, x.index) for x in out]


def test_shuffled_results_come_out_in_order_between_start_and_end():
    buf = ReorderBuffer(window=1000)
    items = [start(), end(200)] + [result(i) for i in range(200)]
    random.Random(3).shuffle(items)
    out = []
    for item in items:
        out += buf.push(item, now=0)
    assert out[0].kind == m.SCAN_START and out[-1].kind == m.SCAN_END
    assert [x.index for x in out[1:-1]] == list(range(200))
    assert buf.missing == 0 and buf.duplicates == 0


def test_duplicates_are_dropped_and_counted():
    buf = ReorderBuffer()
    out = buf.push(start(), 0) + buf.push(result(1), 0) + buf.push(result(1), 0)
    out += buf.push(result(0), 0) + buf.push(result(0), 0) + buf.push(start(), 0)
    assert kinds_and_indices(out) == [("scan_start", None), ("result", 0), ("result", 1)]
    assert buf.duplicates == 2 and buf.late == 1
    out = buf.push(end(2), 0)
    assert kinds_and_indices(out) == [("scan_end", None)]
    assert buf.push(result(1), 0) == []  # a result for a finished scan
    assert buf.duplicates == 3


def test_missing_index_becomes_one_gap_after_timeout():
    buf = ReorderBuffer(window=100, gap_timeout_s=5)
    buf.push(start(), now=0)
    for i in (0, 1, 3, 4):
        buf.push(result(i), now=1)
    assert buf.expire(now=5.5) == []  # head became index 2 at t=1: not yet 5 s
    out = buf.expire(now=6.5)
    assert kinds_and_indices(out) == [("gap", 2), ("result", 3), ("result", 4)]
    assert buf.missing == 1 and list(buf.missing_indices) == [(1, 2)]
    assert out[0].stream == "main"


def test_full_window_forces_a_gap_without_waiting():
    buf = ReorderBuffer(window=4, gap_timeout_s=1e9)
    out = buf.push(start(), 0)
    for i in range(1, 5):
        out += buf.push(result(i), 0)
    assert kinds_and_indices(out) == [("scan_start", None), ("gap", 0)] + [("result", i) for i in range(1, 5)]
    assert buf.missing == 1


def test_end_waits_for_missing_tail_then_gaps_it():
    buf = ReorderBuffer(window=10, gap_timeout_s=2)
    buf.push(start(), 0)
    buf.push(result(0), 0)
    assert buf.push(end(3), 0) == []
    out = buf.expire(now=2.5)
    assert kinds_and_indices(out) == [("gap", 1)]
    out = buf.expire(now=5)
    assert kinds_and_indices(out) == [("gap", 2), ("scan_end", None)]


def test_next_scan_waits_for_the_current_one():
    buf = ReorderBuffer()
    out = buf.push(start(1), 0) + buf.push(start(2), 0) + buf.push(result(0, 2), 0)
    assert kinds_and_indices(out) == [("scan_start", None)]
    out = buf.push(end(0, 1), 0)
    assert [(x.scan, x.kind, x.index) for x in out] == [(1, "scan_end", None), (2, "scan_start", None), (2, "result", 0)]


def test_gaps_from_upstream_are_emitted_in_place_and_counted():
    buf = ReorderBuffer()
    gap = m.Message(m.GAP, scan=1, index=0, stream="main", body={"reason": "dropped"})
    out = buf.push(start(), 0) + buf.push(result(1), 0) + buf.push(gap, 0)
    assert kinds_and_indices(out) == [("scan_start", None), ("gap", 0), ("result", 1)]
    assert buf.missing == 1


def test_lost_scan_start_is_replaced_after_the_timeout():
    buf = ReorderBuffer(gap_timeout_s=2)
    assert buf.push(result(0), now=0) == []
    out = buf.expire(now=3)
    assert kinds_and_indices(out) == [("scan_start", None), ("result", 0)]
    assert out[0].meta == {"start_missing": True} and buf.missing_starts == 1
