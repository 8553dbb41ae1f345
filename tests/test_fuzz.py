"""Every data and query port survives floods of malformed messages (seeded), counts
each one, logs each kind rarely, and the next scan loses nothing."""

import logging

import h5py
import zmq

from pipelines.fuzz import malformed_messages

from .test_flow import Pipeline, wait_for

PER_PORT = 10_000


def test_10000_malformed_messages_per_port_are_counted_and_nothing_is_lost(tmp_path, caplog):
    p = Pipeline(tmp_path)
    caplog.set_level(logging.WARNING, logger="tangopipe")
    try:
        ports = {
            "master data": (p.master, zmq.DEALER, p.master.endpoint),
            "sorter collect": (p.sorter, zmq.DEALER, p.sorter.collect_endpoint),
            "sorter data": (p.sorter, zmq.DEALER, p.sorter.endpoint),
            "sink query": (p.sink, zmq.DEALER, p.sink.endpoint),
        }
        for seed, (name, (engine, kind, endpoint)) in enumerate(ports.items()):
            before = engine.stats.bad.total
            sock = zmq.Context.instance().socket(kind)
            sock.linger = 0
            sock.connect(endpoint)
            for parts in malformed_messages(PER_PORT, seed=seed):
                sock.send_multipart(parts)
            wait_for(lambda e=engine, b=before: e.stats.bad.total == b + PER_PORT, timeout=120, what=f"{name} counted")
            sock.close(0)
        logged = [r for r in caplog.records if "bad message" in r.getMessage()]
        reasons = set(p.master.stats.bad.by_reason) | set(p.sorter.stats.bad.by_reason) | set(p.sink.stats.bad.by_reason)
        assert len(logged) <= 3 * len(reasons) + 3, "bad messages are logged once per kind, rate limited"
        path = p.scan(50)
        with h5py.File(path) as f:
            assert list(f["entry/main/index"][:]) == list(range(50)) and f["entry/main/valid"][:].all()
    finally:
        p.stop()
