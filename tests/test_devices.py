"""The Tango faces of the engines, each in a real device server without database (tests/servers.py)."""

import json

import pytest
import tango
import zmq

from devices.master import PipelineMaster
from devices.sorter import PipelineSorter
from devices.worker import PipelineWorker
from pipelines.consumer import ConsumerEngine
from pipelines.sorter import SorterEngine
from pipelines.worker import WorkerEngine
from tests.servers import DeviceServerContext, ServerContext
from tests.waiting import wait_for

SMALL_SOURCE = json.dumps({"kind": "simulator", "shape": [32, 32], "rate_hz": 0, "frames": 20})



def test_sorter_device_publishes_endpoints_units_and_counts_bad_messages():
    with DeviceServerContext(PipelineSorter, properties={"ReorderWindow": 32}) as dev:
        assert dev.state() == tango.DevState.ON
        assert dev.DataEndpoint.startswith("tcp://127.0.0.1:")
        assert dev.CollectEndpoint.startswith("tcp://127.0.0.1:")
        assert dev.QueueCapacity == 32
        assert dev.get_attribute_config("FramesIn").unit == "frames"
        assert dev.get_attribute_config("InputRateHz").unit == "Hz"
        push = zmq.Context.instance().socket(zmq.DEALER)
        push.linger = 0
        push.connect(dev.CollectEndpoint)
        for _ in range(7):
            push.send_multipart([b"{broken"])
        wait_for(lambda: dev.BadMessages == 7, what="BadMessages == 7")
        assert "bad_json" in json.loads(dev.BadMessageReasons())
        assert "bad_json" in dev.LastBadMessage
        push.close(0)


def test_master_device_runs_a_scan_through_real_engines():
    props = {"Source": SMALL_SOURCE, "MaxQueueFrames": 8}
    with DeviceServerContext(PipelineMaster, properties=props) as master:
        assert master.state() == tango.DevState.ON
        sorter = SorterEngine()
        sorter.bind_now()
        worker = WorkerEngine([{"roi_stats": {"bin": 2}}], name="w1")
        worker.start()
        worker.connect(master.DataEndpoint, sorter.collect_endpoint)
        consumer = ConsumerEngine("reader")
        seen = []
        consumer.handle = seen.append
        consumer.start()
        consumer.connect(sorter.endpoint)
        try:
            wait_for(lambda: master.Workers == 1 and sorter.consumers, what="wiring")
            events = []
            event_id = master.subscribe_event("ScanFrames", tango.EventType.CHANGE_EVENT,
                                              lambda e: events.append(e.attr_value.value if e.attr_value else None))
            scan_id = master.StartScan(json.dumps({"frames": 20, "sample": "Si"}))
            assert scan_id == "1" and master.ScanOpen
            with pytest.raises(tango.DevFailed, match="still open"):
                master.StartScan("{}")
            wait_for(lambda: not master.Acquiring, what="acquisition")
            assert master.EndScan() == 20
            wait_for(lambda: any(x.kind == "scan_end" for x in seen), what="scan end")
            assert [x.index for x in seen if x.kind == "result"] == list(range(20))
            assert seen[0].meta["sample"] == "Si"
            wait_for(lambda: 20 in events, what="ScanFrames change event")
            master.unsubscribe_event(event_id)
            assert master.FramesIn == 20 and master.FramesOut == 20
        finally:
            for engine in (consumer, worker, sorter):
                engine.stop()


@pytest.mark.parametrize(
    "props, words",
    [
        ({"OverflowPolicy": "sometimes"}, ["OverflowPolicy 'sometimes'", "block", "Jive"]),
        ({"Source": '{"kind": "simulator", "shape": [32, 32'}, ["Source is not valid JSON"]),
        ({"Source": '{"kind": "camera"}'}, ["unknown source kind 'camera'"]),
        ({"MaxQueueFrames": 0}, ["MaxQueueFrames must be >= 1"]),
    ],
)
def test_bad_properties_give_fault_and_a_status_that_says_what_to_fix(props, words):
    with DeviceServerContext(PipelineMaster, properties=props) as dev:
        assert dev.state() == tango.DevState.FAULT
        for word in words:
            assert word in dev.status()
        with pytest.raises(tango.DevFailed):
            dev.StartScan("{}")


def test_worker_without_a_database_reports_unknown_naming_the_upstream():
    devices = [
        {"class": PipelineWorker, "devices": [
            {"name": "test/worker/1", "properties": {"Upstream": "test/master/9", "Sorter": "test/sorter/9"}},
        ]},
        {"class": PipelineSorter, "devices": [{"name": "test/sorter/1", "properties": {}}]},
    ]
    with ServerContext(devices) as ctx:
        worker = ctx.get_device("test/worker/1")
        sorter = ctx.get_device("test/sorter/1")
        wait_for(lambda: "test/master/9" in worker.status(), what="status naming the upstream")
        assert worker.state() == tango.DevState.UNKNOWN
        assert sorter.state() == tango.DevState.ON
        assert json.loads(worker.StepChain) == []


def test_worker_rejects_a_bad_reconfiguration_and_keeps_its_chain():
    props = {"Steps": json.dumps([{"roi_stats": {"bin": 2}}])}
    with DeviceServerContext(PipelineWorker, properties=props) as dev:
        with pytest.raises(tango.DevFailed, match="unknown parameter 'binning'"):
            dev.Reconfigure(json.dumps([{"roi_stats": {"binning": 2}}]))
        assert dev.ConfigVersion == 1
        assert dev.Reconfigure(json.dumps(["passthrough"])) == 2
        assert json.loads(dev.StepChain) == ["passthrough"]
