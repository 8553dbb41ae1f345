"""CURVE on the data plane: keys, an encrypted scan with nothing lost, and clients
with keys the pipeline does not know get nothing (and are counted)."""

import json
import os
import shutil
import stat
import subprocess

import pytest
import yaml
import zmq

from devices.cli import main
from pipelines import message as m
from pipelines.consumer import ConsumerEngine
from pipelines.definition import DefinitionError, PipelineDefinition
from pipelines.master import MasterEngine
from pipelines.query import QueryRefused, SinkClient
from pipelines.security import create_keys, curve_counters, load_keys, use_curve
from pipelines.sink import SinkEngine
from pipelines.sorter import SorterEngine
from pipelines.sources.simulator import SimulatedDetector
from pipelines.transport import UpstreamLink, bind_socket, connect_socket
from pipelines.worker import WorkerEngine
from tests.waiting import wait_for

from .conftest import ROOT, tangopipe, user_env

STEPS = [{"roi_stats": {"rois": {"corner": [0, 8, 0, 8]}, "bin": 2}}]


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def keys(tmp_path):
    folder = tmp_path / "keys"
    create_keys(folder)
    return folder


def stranger_folder(tmp_path, keys):
    """A client's key folder as a stranger would make it: the pipeline's public key (public
    indeed) and a well-formed pair of its own that the pipeline never authorised."""
    folder = tmp_path / "stranger"
    create_keys(folder)
    (folder / "clients").mkdir()
    os.replace(folder / "pipeline.key_secret", folder / "clients" / "me.key_secret")
    shutil.copyfile(keys / "pipeline.key", folder / "pipeline.key")
    return folder


def test_keys_command_makes_private_keys_and_authorised_clients(tmp_path, capsys):
    folder = tmp_path / "keys"
    assert main(["keys", str(folder)]) == 0
    assert mode(folder / "pipeline.key_secret") == 0o600 and (folder / "authorized").is_dir()
    pipeline = load_keys(folder)
    assert main(["keys", str(folder)]) == 0  # kept, not replaced
    assert load_keys(folder) == pipeline and "kept" in capsys.readouterr().err
    assert main(["keys", str(folder), "--client", "alice"]) == 0
    assert mode(folder / "clients" / "alice.key_secret") == 0o600
    assert (folder / "authorized" / "alice.key").exists()
    alice = load_keys(folder, "alice")
    assert alice.server_public == pipeline.public and alice.public != pipeline.public
    assert "key_secret" not in capsys.readouterr().out.replace(".key_secret", "")  # paths only, no key printed
    assert main(["keys", str(tmp_path / "nowhere"), "--client", "bob"]) == 1


def test_a_missing_or_open_key_folder_is_refused_naming_the_key(tmp_path, keys):
    data = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    (tmp_path / "p.yaml").write_text("")
    data["security"] = {"curve_keys": "nokeys"}
    with pytest.raises(DefinitionError, match=r"security.curve_keys: .*tangopipe keys"):
        PipelineDefinition(data, str(tmp_path / "p.yaml"))
    data["security"] = {"curve_keys": "keys"}  # relative to the definition's folder
    os.chmod(keys / "pipeline.key_secret", 0o640)
    with pytest.raises(DefinitionError, match=r"security.curve_keys: .*open to group or others.*chmod 600"):
        PipelineDefinition(data, str(tmp_path / "p.yaml"))
    os.chmod(keys / "pipeline.key_secret", 0o600)
    definition = PipelineDefinition(data, str(tmp_path / "p.yaml"))
    assert {spec.properties.get("CurveKeys") for spec in definition.devices()} == {str(keys)}


class CurvePipeline:
    """Master, worker, sorter, sink and an ordered reader on one private, CURVE-keyed context."""

    def __init__(self, keys):
        self.context = zmq.Context()
        self.guard = use_curve(keys, self.context)
        ctx = self.context
        self.master = MasterEngine(SimulatedDetector(shape=[32, 32], rate_hz=0, frames=40), context=ctx,
                                   use_shm=False)
        self.master.bind_now()
        self.sorter = SorterEngine(context=ctx)
        self.sorter.bind_now()
        self.worker = WorkerEngine(STEPS, name="w1", context=ctx, use_shm=False)
        self.worker.start()
        self.worker.connect(self.master.endpoint, self.sorter.collect_endpoint)
        self.sink = SinkEngine(context=ctx)
        self.reader = ConsumerEngine("reader", context=ctx)
        self.seen = []
        self.reader.handle = self.seen.append
        for consumer in (self.sink, self.reader):
            consumer.start()
            consumer.connect(self.sorter.endpoint)
        wait_for(lambda: self.master.worker_names() == ["w1"] and len(self.sorter.consumers) == 2
                 and self.sink.endpoint, what="the pipeline wired through CURVE")

    def stop(self):
        for engine in (self.master, self.worker, self.sorter, self.sink, self.reader):
            engine.stop()
        use_curve(None, self.context)
        self.context.term()


@pytest.fixture
def pipeline(keys):
    p = CurvePipeline(keys)
    yield p
    p.stop()


def test_encrypted_scan_loses_nothing_and_strangers_get_nothing(pipeline, keys, tmp_path):
    stranger_keys = stranger_folder(tmp_path, keys)
    stranger = load_keys(stranger_keys, "me")
    outsider = zmq.Context()
    snoops, clients = [], []

    def client(**options):
        clients.append(SinkClient(pipeline.sink.endpoint, context=outsider, **options))
        return clients[-1]

    try:
        # a worker and a consumer with a key the pipeline does not know, and one without CURVE
        for endpoint, keys_used in ((pipeline.master.endpoint, stranger), (pipeline.sorter.endpoint, stranger),
                                    (pipeline.sorter.endpoint, None), (pipeline.master.endpoint, None)):
            link = UpstreamLink(outsider, "snoop", credit=8)
            link.sock = outsider.socket(zmq.DEALER)
            link.sock.linger = 0
            if keys_used is not None:
                keys_used.make_client(link.sock)
            link.sock.connect(endpoint)
            link.endpoint = endpoint
            link.hello()
            snoops.append(link)
        refusals = pipeline.guard.refusals
        wait_for(lambda: refusals.by_reason.get("unauthorised_key", 0) >= 2, what="strangers refused")
        # ... and the clients without CURVE, which never reach ZAP: counted from the sockets' handshakes
        wait_for(lambda: refusals.by_reason.get("handshake_failed", 0) >= 2, what="plain clients refused")
        assert curve_counters(pipeline.context)["CurveRefused"] == refusals.total

        pipeline.master.start_scan({"frames": 40})
        wait_for(lambda: not pipeline.master.acquiring, what="acquisition")
        pipeline.master.end_scan()
        wait_for(lambda: any(x.kind == m.SCAN_END for x in pipeline.seen), what="scan end")

        assert [x.index for x in pipeline.seen if x.kind == m.RESULT] == list(range(40))
        assert pipeline.sink.stats.frames_in == 40 and pipeline.sorter.reorder.missing == 0
        assert pipeline.master.worker_names() == ["w1"] and len(pipeline.sorter.consumers) == 2
        for link in snoops:
            assert link.sock.poll(0) == 0, f"a stranger at {link.endpoint} got data"
        assert pipeline.guard.refusals.by_reason["unauthorised_key"] >= 2

        # the query port: the pipeline's own key and an authorised client's get answers
        indices, _ = client(curve_keys=keys).slice(1, "main", "corner_sum")
        assert list(indices) == list(range(40))
        create_keys(keys, client="alice")  # authorised while running: no restart needed
        assert client(curve_keys=keys, curve_client="alice").datasets()[0]["frames"] == 40
        # ... a stranger's key gets a refusal that says what to do, and a plain client nothing
        with pytest.raises(QueryRefused, match="authorized"):
            client(timeout_s=1.0, curve_keys=stranger_keys, curve_client="me").datasets()
        with pytest.raises(TimeoutError):
            client(timeout_s=0.5).datasets()
        assert pipeline.sink.query_server.answered == 2
    finally:
        for link in snoops:
            link.close()
        for each in clients:
            each.close()
        outsider.term()


def test_transport_helpers_make_curve_servers_and_clients_only_on_a_keyed_context(keys):
    keyed, plain = zmq.Context(), zmq.Context()
    use_curve(keys, keyed)
    sockets = []
    try:
        server, endpoint = bind_socket(keyed, zmq.ROUTER)
        client = keyed.socket(zmq.DEALER)
        other, _ = bind_socket(plain, zmq.ROUTER)
        sockets += [server, client, other]
        connect_socket(client, endpoint)
        assert server.mechanism == zmq.CURVE and server.curve_server
        assert client.mechanism == zmq.CURVE and not client.curve_server
        assert other.mechanism == zmq.NULL and curve_counters(plain) == {}
    finally:
        for sock in sockets:
            sock.close(0)
        use_curve(None, keyed)
        keyed.term()
        plain.term()


@pytest.mark.slow
def test_deployed_pipeline_with_curve_and_a_token(tmp_path):
    """``tangopipe up`` with a security section: the keys and the token file reach the
    devices through their properties, a scan loses nothing, strangers get nothing."""
    create_keys(tmp_path / "keys")
    data = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    data["master"]["source"].update(shape=[64, 64], rate_hz=100, frames=30)
    data["groups"]["main"].update(workers=1)
    data["groups"]["main"]["steps"] = STEPS
    data["sink"]["lavue"]["port"] = 0
    data["writers"]["hdf5"]["directory"] = str(tmp_path / "data")
    data["security"] = {"curve_keys": "keys", "query_token_file": "secret/query.token"}
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(data))
    env = user_env(tmp_path / "state")
    up = tangopipe("up", str(config), env=env, cwd=tmp_path)
    try:
        assert "made the query token file" in up.stderr and mode(tmp_path / "secret" / "query.token") == 0o600
        scan = tangopipe("scan", "--frames", "30", env=env, cwd=tmp_path)
        assert json.loads(scan.stdout)["acquired"] == 30
        status = json.loads(tangopipe("status", "--json", env=env, cwd=tmp_path).stdout)
        counters = {d["name"]: d["counters"] for d in status["devices"]}
        assert counters["demo/sorter/main"]["FramesOut"] == 30 and counters["demo/sink/1"]["FramesIn"] == 30
        assert all("CurveRefused" in c for c in counters.values())
        token = (tmp_path / "secret" / "query.token").read_text().strip()
        assert token not in json.dumps(status) and token not in subprocess.run(
            ["grep", "-r", token, str(tmp_path / "state")], capture_output=True, text=True).stdout
        endpoint = next(d["endpoint"] for d in status["devices"] if d["name"] == "demo/sink/1")
        client = SinkClient(endpoint, curve_keys=tmp_path / "keys", token_file=tmp_path / "secret" / "query.token")
        assert list(client.slice(1, "main", "corner_sum")[0]) == list(range(30))
        client.close()
        no_token = SinkClient(endpoint, curve_keys=tmp_path / "keys", token="")
        with pytest.raises(QueryRefused, match="missing or wrong token"):
            no_token.datasets()
        no_token.close()
        stranger = SinkClient(endpoint, timeout_s=1.0, curve_keys=stranger_folder(tmp_path, tmp_path / "keys"),
                              curve_client="me", token_file=tmp_path / "secret" / "query.token")
        with pytest.raises(QueryRefused, match="authorized"):
            stranger.datasets()  # even with the token: its key is not authorised
        stranger.close()
        import tango

        sink = tango.DeviceProxy(f"tango://{json.loads((tmp_path / 'state' / 'session.json').read_text())['tango_host']}"
                                 "/demo/sink/1")
        assert sink.RefusedQueries == 1 and sink.QueriesAnswered == 1
        assert json.loads(sink.Counters)["CurveRefused"] >= 1
        assert json.loads(sink.GetResult(json.dumps({"scan": 1, "stream": "main", "index": 3})))["index"] == 3
    finally:
        tangopipe("down", env=env, cwd=tmp_path, check=False)


def test_security_settings_survive_dsconfig_export_and_import(tmp_path, keys):
    from devices.dsconfig_json import from_dsconfig, to_dsconfig

    token = tmp_path / "sink.token"
    token.write_text("t" * 40)
    token.chmod(0o600)
    data = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    data["security"] = {"curve_keys": str(keys), "query_token_file": str(token)}
    definition = PipelineDefinition(data, str(tmp_path / "p.yaml"))
    back, warnings = from_dsconfig(to_dsconfig(definition))
    assert warnings == [] and back["security"] == data["security"]
    assert [s.tango_properties() for s in PipelineDefinition(back, "imported").devices()] == [
        s.tango_properties() for s in definition.devices()]
