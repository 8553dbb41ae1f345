"""The sink's query token: refused queries get an error reply and are counted, never
answered; accepted ones lose nothing; the token lives in a private file, never in a
device property; the query port and the Lavue stream bind where configured."""

import json
import logging
import os
from pathlib import Path

import pytest
import tango
import yaml
import zmq

from devices.deploy import prepare_secrets
from devices.sink import PipelineSink
from pipelines import message as m
from pipelines.definition import DefinitionError, PipelineDefinition, load_definition
from pipelines.master import MasterEngine
from pipelines.query import QueryRefused, SinkClient
from pipelines.security import SecurityError, read_token_file, write_token_file
from pipelines.sink import SinkEngine
from pipelines.sorter import SorterEngine
from pipelines.sources.simulator import SimulatedDetector
from pipelines.transport import receive, send
from pipelines.worker import WorkerEngine
from tests.servers import ServerContext
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "correct-horse-battery-staple-42"
FRAMES = 60


@pytest.fixture(autouse=True)
def no_token_in_the_environment(monkeypatch):
    monkeypatch.delenv("TANGOPIPE_QUERY_TOKEN", raising=False)
    monkeypatch.delenv("TANGOPIPE_QUERY_TOKEN_FILE", raising=False)


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "query.token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


class TokenPipeline:
    """Master, worker, sorter and a sink whose query port wants TOKEN."""

    def __init__(self):
        self.master = MasterEngine(SimulatedDetector(shape=[32, 32], rate_hz=200, frames=FRAMES))
        self.master.bind_now()
        self.sorter = SorterEngine()
        self.sorter.bind_now()
        self.worker = WorkerEngine([{"roi_stats": {"rois": {"corner": [0, 8, 0, 8]}}}], name="w1")
        self.worker.start()
        self.worker.connect(self.master.endpoint, self.sorter.collect_endpoint)
        self.sink = SinkEngine(name="sink", query_token=TOKEN)
        self.sink.start()
        self.sink.connect(self.sorter.endpoint)
        wait_for(lambda: self.master.worker_names() == ["w1"] and self.sorter.consumers and self.sink.endpoint,
                 what="wiring")

    def stop(self):
        for engine in (self.master, self.worker, self.sorter, self.sink):
            engine.stop()


@pytest.fixture
def pipeline():
    p = TokenPipeline()
    yield p
    p.stop()


def test_refused_queries_are_counted_never_answered_and_nothing_accepted_is_lost(pipeline):
    good = SinkClient(pipeline.sink.endpoint, token=TOKEN)
    wrong = SinkClient(pipeline.sink.endpoint, token="x" * len(TOKEN))
    missing = SinkClient(pipeline.sink.endpoint)
    answered = refused = 0
    pipeline.master.start_scan({"frames": FRAMES})
    while pipeline.master.acquiring or refused < 6:  # queries while results flow in
        for client in (wrong, missing):
            with pytest.raises(QueryRefused, match="query refused: missing or wrong token"):
                client.datasets()
            refused += 1
        good.datasets()
        answered += 1
    pipeline.master.end_scan()
    wait_for(lambda: pipeline.sink.current_scan == 1 and pipeline.sink.scans_done == 1, what="scan end at the sink")

    indices, sums = good.slice(1, "main", "corner_sum")
    answered += 1
    assert list(indices) == list(range(FRAMES)) and len(sums) == FRAMES
    counters = pipeline.sink.counters()
    assert counters["RefusedQueries"] == refused and counters["QueriesAnswered"] == answered
    assert pipeline.sink.query_server.refusals.by_reason == {"wrong_token": refused // 2, "missing_token": refused // 2}
    assert counters["FramesIn"] == FRAMES and counters["BadMessages"] == 0
    assert pipeline.sorter.reorder.missing == 0 and pipeline.master.scan_dropped == 0
    for client in (good, wrong, missing):
        client.close()


def test_a_refusal_carries_no_data_whatever_the_token_looks_like(pipeline):
    pipeline.master.start_scan({"frames": 5})
    wait_for(lambda: pipeline.sink.stats.frames_in == 5, what="5 results at the sink")
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(pipeline.sink.endpoint)
    try:
        for token in (None, "", 12345, ["list"], TOKEN[:-1], TOKEN + " ", TOKEN.upper()):
            body = {"op": "get", "id": "q", "scan": 1, "stream": "main", "index": 0}
            if token is not None:
                body["token"] = token
            send(sock, m.Message(m.QUERY, body=body))
            assert sock.poll(5000), "no reply"
            _, reply = receive(sock)
            assert reply.kind == m.REPLY and reply.body["refused"] in ("missing_token", "wrong_token")
            assert reply.arrays == {} and reply.scalars == {} and reply.index is None
            assert TOKEN not in json.dumps(reply.body)
        send(sock, m.Message(m.QUERY, body={"op": "get", "id": "q", "scan": 1, "stream": "main", "index": 0,
                                            "token": TOKEN}))
        assert sock.poll(5000)
        _, reply = receive(sock)
        assert "error" not in reply.body and reply.index == 0 and "corner_sum" in reply.scalars
    finally:
        sock.close(0)
    assert pipeline.sink.counters()["RefusedQueries"] == 7
    pipeline.master.end_scan()


def test_refusals_are_logged_once_per_kind_within_the_rate_limit(pipeline, caplog):
    caplog.set_level(logging.WARNING, logger="tangopipe")
    clients = [SinkClient(pipeline.sink.endpoint, token="wrong-token-wrong-token"), SinkClient(pipeline.sink.endpoint)]
    for _ in range(5):
        for client in clients:
            with pytest.raises(QueryRefused):
                client.latest()
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 2, lines
    assert any("wrong_token" in line for line in lines) and any("missing_token" in line for line in lines)
    assert all(TOKEN not in line for line in lines)
    for client in clients:
        client.close()


def test_the_client_reads_the_token_from_a_file_or_the_environment(pipeline, token_file, monkeypatch):
    assert SinkClient(pipeline.sink.endpoint, token_file=token_file).datasets() == []
    monkeypatch.setenv("TANGOPIPE_QUERY_TOKEN_FILE", str(token_file))
    assert SinkClient(pipeline.sink.endpoint).datasets() == []
    monkeypatch.setenv("TANGOPIPE_QUERY_TOKEN", TOKEN)
    monkeypatch.delenv("TANGOPIPE_QUERY_TOKEN_FILE")
    assert SinkClient(pipeline.sink.endpoint).datasets() == []
    token_file.chmod(0o644)
    with pytest.raises(SecurityError, match="chmod 600"):
        SinkClient(pipeline.sink.endpoint, token_file=token_file)


def test_without_a_token_queries_work_as_before():
    sink = SinkEngine()
    sink.start()
    try:
        wait_for(lambda: sink.endpoint, what="query port")
        assert SinkClient(sink.endpoint).datasets() == []
        assert SinkClient(sink.endpoint, token="anything-at-all-here").datasets() == []
        assert sink.counters()["RefusedQueries"] == 0
    finally:
        sink.stop()


# -- the definition --------------------------------------------------------------------------
def demo_with(tmp_path, **security):
    data = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    data["security"] = security
    return data, str(tmp_path / "pipeline.yaml")


def test_the_token_file_must_be_private_and_long_enough(tmp_path, token_file):
    data, path = demo_with(tmp_path, query_token_file="query.token")  # relative to the definition's folder
    token_file.chmod(0o640)
    with pytest.raises(DefinitionError, match=r"pipeline.yaml: security.query_token_file: .*mode 640.*chmod 600"):
        PipelineDefinition(data, path)
    token_file.chmod(0o600)
    token_file.write_text("short\n")
    with pytest.raises(DefinitionError, match="security.query_token_file: .*5 characters, at least 16"):
        PipelineDefinition(data, path)
    data["security"] = {"query_token_fle": "x"}
    with pytest.raises(DefinitionError, match="security.query_token_fle: unknown key; expected one of"):
        PipelineDefinition(data, path)
    data["security"] = {"query_token_file": 7}
    with pytest.raises(DefinitionError, match="security.query_token_file: expected a string, got 7"):
        PipelineDefinition(data, path)
    data["security"] = {"query_token_file": "query.token"}
    del data["sink"]
    with pytest.raises(DefinitionError, match="security.query_token_file: the pipeline has no sink"):
        PipelineDefinition(data, path)


def test_the_sink_gets_the_path_of_the_token_never_the_token(tmp_path, token_file):
    data, path = demo_with(tmp_path, query_token_file="query.token")
    definition = PipelineDefinition(data, path)
    specs = {spec.name: spec for spec in definition.devices()}
    assert specs["demo/sink/1"].properties["QueryTokenFile"] == str(token_file)
    assert all(TOKEN not in json.dumps(spec.tango_properties()) for spec in specs.values())
    assert all("QueryTokenFile" not in spec.properties for name, spec in specs.items() if name != "demo/sink/1")


def test_up_makes_a_missing_token_file_private_and_random(tmp_path, capsys):
    data, path = demo_with(tmp_path, query_token_file="secrets/sink.token")
    definition = PipelineDefinition(data, path)  # a missing file is fine: up makes it
    prepare_secrets(definition)
    made = tmp_path / "secrets" / "sink.token"
    assert os.stat(made).st_mode & 0o777 == 0o600 and len(read_token_file(made)) >= 32
    assert "made the query token file" in capsys.readouterr().err
    first = read_token_file(made)
    prepare_secrets(definition)  # kept
    assert read_token_file(made) == first and not write_token_file(made)
    assert write_token_file(made, force=True) and read_token_file(made) != first


def test_binding_anywhere_without_a_token_is_warned_about(tmp_path):
    data, path = demo_with(tmp_path)
    data["bind"] = "*"
    warnings = PipelineDefinition(data, path).security_warnings()
    assert any("query_token_file" in w for w in warnings) and any("curve_keys" in w for w in warnings)
    assert load_definition(ROOT / "config" / "demo.yaml").security_warnings() == []


# -- the Tango device -------------------------------------------------------------------------
def listening_hosts(port: int) -> set[str]:
    """Addresses (hex, as in /proc/net/tcp) with a socket listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def test_sink_device_refuses_counts_and_binds_the_demo_on_loopback(tmp_path, token_file):
    demo = {spec.name: spec for spec in load_definition(ROOT / "config" / "demo.yaml").devices()}
    # the demo's binding properties (the file database of the test context cannot hold them all)
    props = {k: v for k, v in demo["demo/sink/1"].properties.items() if k in ("BindAddress", "QueryPort")}
    assert props["BindAddress"] == "127.0.0.1"
    props.update(LavuePort=0, QueryTokenFile=str(token_file))
    open_file = tmp_path / "open.token"
    open_file.write_text(TOKEN)
    open_file.chmod(0o644)
    devices = [{"class": PipelineSink, "devices": [
        {"name": "demo/sink/1", "properties": props},
        {"name": "demo/sink/2", "properties": {"LavuePort": -1, "QueryTokenFile": str(open_file)}},
    ]}]
    with ServerContext(devices) as ctx:
        sink, broken = ctx.get_device("demo/sink/1"), ctx.get_device("demo/sink/2")
        endpoint = sink.QueryEndpoint
        # the demo's query port and Lavue stream listen on loopback only
        assert endpoint.startswith("tcp://127.0.0.1:") and sink.LavueAddress.startswith("127.0.0.1:")
        for port in (int(endpoint.rsplit(":", 1)[1]), int(sink.LavueAddress.rsplit(":", 1)[1])):
            assert listening_hosts(port) == {"0100007F"}
        with pytest.raises(QueryRefused):
            SinkClient(endpoint).datasets()
        with pytest.raises(QueryRefused):
            SinkClient(endpoint, token="not-the-token-at-all").datasets()
        assert SinkClient(endpoint, token_file=token_file).datasets() == []
        wait_for(lambda: sink.RefusedQueries == 2 and sink.QueriesAnswered == 1, what="query counters")
        assert json.loads(sink.Counters)["RefusedQueries"] == 2 and sink.BadMessages == 0
        assert json.loads(sink.ListDatasets()) == []  # Tango commands: Tango access control, no token

        assert broken.state() == tango.DevState.FAULT
        assert "QueryTokenFile" in broken.status() and f"chmod 600 {open_file}" in broken.status()
