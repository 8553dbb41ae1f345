"""The PipelineWriter device: its properties, and FAULT naming the property that is wrong."""

import pytest
import tango

from devices.writer import PipelineWriter
from tests.servers import DeviceServerContext


@pytest.mark.parametrize(
    ("properties", "message"),
    [
        ({"Kind": "hdf4"}, "property Kind: expected one of nexus, tiff, graphs, cube, got 'hdf4'"),
        ({"Kind": "cube", "CubeBy": "delay", "CubeBins": "[0, 1"}, "property CubeBins is not valid JSON"),
        ({"Kind": "cube", "CubeBy": "delay", "CubeBins": "[1, 0]"}, "property CubeBins: expected at least 2"),
        ({"Compression": "zip"}, "property Compression: expected one of none, gzip, bslz4"),
        (
            {"Kind": "tiff", "FilePattern": "{scan}.tif"},
            "property FilePattern: FilePattern '{scan}.tif' must contain",
        ),
    ],
)
def test_a_wrong_property_gives_fault_naming_it(tmp_path, properties, message):
    props = {"Directory": str(tmp_path), **properties}
    with DeviceServerContext(PipelineWriter, properties=props) as dev:
        assert dev.state() == tango.DevState.FAULT
        assert message in dev.status() and "Fix the device properties" in dev.status()


def test_a_good_writer_has_no_storage_fault_and_retry_answers(tmp_path):
    props = {"Directory": str(tmp_path), "Kind": "graphs", "Maps": "roi_sum, total", "PlotEvery": 5}
    with DeviceServerContext(PipelineWriter, properties=props) as dev:
        assert dev.state() != tango.DevState.FAULT or "Upstream" in dev.status()
        assert dev.StorageFault == "" and dev.Retry() is True
        assert dev.HeldMessages == 0 and dev.get_attribute_config("HeldMessages").unit == "messages"


def test_the_sink_device_answers_from_the_scan_file_what_it_does_not_hold(tmp_path):
    import json

    import numpy as np

    from devices.sink import PipelineSink
    from pipelines import message as m
    from pipelines.writers.nexus import NexusScanFile

    f = NexusScanFile(tmp_path / "demo_scan00005.h5", m.Message(m.SCAN_START, scan=5, stream="main"), "demo")
    for i in range(3):
        f.write(
            m.Message(
                m.RESULT,
                scan=5,
                index=i,
                stream="main",
                scalars={"roi_sum": 10.0 * i},
                arrays={"profile": np.arange(4, dtype=np.float32) + i},
                version=1,
            )
        )
    f.close()
    props = {"LavuePort": -1, "ScanFileDirectory": str(tmp_path), "Pipeline": "demo"}
    with DeviceServerContext(PipelineSink, properties=props) as sink:
        answer = json.loads(sink.GetResult(json.dumps({"scan": 5, "stream": "main", "index": 2})))
        assert (
            answer["roi_sum"] == 20.0 and answer["profile"] == [2.0, 3.0, 4.0, 5.0] and answer["index"] == 2
        )
        with pytest.raises(tango.DevFailed, match="no file"):
            sink.GetResult(json.dumps({"scan": 6, "stream": "main", "index": 0}))
