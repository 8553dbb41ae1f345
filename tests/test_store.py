"""SinkStore: least-recently-touched eviction and the memory bound."""

import numpy as np
import pytest

from pipelines import message as m
from pipelines.store import SinkStore, StoreQueries, message_cost


def result(scan, index, stream="main", kb=100):
    return m.Message(m.RESULT, scan=scan, index=index, stream=stream,
                     arrays={"img": np.full(kb * 256, index, np.float32)}, scalars={"x": index})


def test_evicts_least_recently_touched_dataset_first():
    one = message_cost(result(0, 0))
    store = SinkStore(memory_limit=one * 25)
    for scan in (1, 2, 3):
        for i in range(8):
            store.add(result(scan, i))
    assert store.evictions == 0
    store.get(1, "main", 0)  # touch scan 1: scan 2 is now the least recently touched
    for i in range(8):
        store.add(result(4, i))
    assert store.evicted[0] == (2, "main")
    assert (1, "main") in store.datasets and (2, "main") not in store.datasets


def test_memory_stays_under_limit_plus_one_dataset():
    one = message_cost(result(0, 0))
    limit = one * 30
    store = SinkStore(memory_limit=limit)
    biggest = 0
    for scan in range(12):
        for i in range(10 + scan):
            store.add(result(scan, i))
            biggest = max(biggest, max(ds.nbytes for ds in store.datasets.values()))
            assert store.nbytes <= limit + biggest
    assert store.evictions > 0
    assert store.nbytes == sum(ds.nbytes for ds in store.datasets.values())


def test_current_dataset_is_never_evicted_and_latest_is_kept():
    one = message_cost(result(0, 0))
    store = SinkStore(memory_limit=one * 2)
    for i in range(10):
        store.add(result(7, i))
    assert list(store.datasets) == [(7, "main")]
    assert store.latest["main"].index == 9
    assert store.get(7, "main", 3).scalars["x"] == 3


def test_stored_arrays_do_not_pin_received_buffers():
    raw = bytearray(np.arange(1000, dtype=np.float32).tobytes())
    msg = m.Message(m.RESULT, scan=1, index=0, stream="s", arrays={"a": np.frombuffer(raw, np.float32)})
    store = SinkStore()
    store.add(msg)
    assert not np.shares_memory(store.get(1, "s", 0).arrays["a"], np.frombuffer(raw, np.float32))


def test_a_long_scan_alone_over_the_limit_stays_under_it():
    """The dataset being written is never evicted; a scan longer than the memory lets go
    of its oldest arrays, then of its oldest results, and says so in its counters."""
    frame = np.zeros(1024, dtype=np.float64)  # 8 KiB a result
    store = SinkStore(memory_limit=100 * 8192)
    queries = StoreQueries(store)
    for i in range(1000):
        store.add(m.Message(m.RESULT, scan=1, index=i, stream="main", arrays={"profile": frame + i},
                            scalars={"total": float(i)}))  # fmt: skip
        assert store.nbytes <= store.memory_limit
    assert store.thinned > 800 and store.trimmed == 0
    assert queries.get(1, "main", 999).arrays["profile"][0] == 999
    with pytest.raises(KeyError, match="let go"):
        queries.get(1, "main", 0)
    indices, totals = queries.slice(1, "main", "total")
    assert list(indices) == list(range(1000)) and totals[0] == 0.0  # the scalars stay
    store.memory_limit = 50_000  # now the scalars alone are too many: the oldest results go
    store.add(m.Message(m.RESULT, scan=1, index=1000, stream="main", scalars={"total": 1000.0}))
    assert store.nbytes <= store.memory_limit and store.trimmed > 0
    indices, _ = queries.slice(1, "main", "total")
    assert indices[-1] == 1000 and indices[0] == store.trimmed
